"""Reading and changing a module's activations with forward hooks (the role of ROME's ``util/nethook``).

``capture`` runs a batch and keeps the input or output of named modules, stopping the forward once it
has them all (ROME's ``Trace(..., stop=True)``: the layers above are never computed). ``adding`` adds
vectors to a module's output at chosen (row, position) pairs, differentiably: the value optimisation
of ROME (``compute_v``) and MEMIT (``compute_z``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from flearning.editing.requests import Encoded

IN, OUT = "in", "out"


class _Stop(Exception):
    """Raised by a hook once every requested activation is captured, to skip the rest of the forward."""


def _hidden(value):
    """A module's tensor: the first element of a tuple output (decoder blocks of older transformers)."""
    return value[0] if isinstance(value, (tuple, list)) else value


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def capture(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], reads: list[tuple[str, str]]
) -> dict[tuple[str, str], torch.Tensor]:
    """Run ``batch`` without gradients and return each ``(module name, "in" | "out")`` activation
    (``[batch, seq, dim]``, detached); the forward stops as soon as all are captured."""
    import torch

    wanted = set(reads)
    got: dict[tuple[str, str], torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(module, args, output):
            for side, value in ((IN, args[0] if args else None), (OUT, output)):
                if (name, side) in wanted and value is not None:
                    got[(name, side)] = _hidden(value).detach()
            if len(got) == len(wanted):
                raise _Stop

        return hook

    try:
        for name in {name for name, _ in reads}:
            handles.append(model.get_submodule(name).register_forward_hook(make_hook(name)))
        with torch.no_grad(), suppress(_Stop):
            model(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    missing = wanted - set(got)
    if missing:
        raise RuntimeError(f"the forward never reached {sorted(missing)}")
    return got


@contextmanager
def adding(
    model: torch.nn.Module,
    name: str,
    rows: torch.Tensor,
    positions: torch.Tensor,
    values: Callable[[], torch.Tensor],
) -> Iterator[dict[str, torch.Tensor]]:
    """While inside, module ``name``'s output gets ``values()[i]`` added at ``(rows[i], positions[i])``
    (out of place, so gradients reach the values). The yielded dict holds ``"before"``: the output at
    those positions before the addition, of the latest forward, detached."""
    record: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        hidden = _hidden(output)
        record["before"] = hidden[rows, positions].detach()
        changed = hidden.index_put((rows, positions), values().to(hidden.dtype), accumulate=True)
        return (changed, *output[1:]) if isinstance(output, (tuple, list)) else changed

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        yield record
    finally:
        handle.remove()


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode with no parameter requiring gradients; both restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def read_at_lookups(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sequences: Sequence[Encoded],
    reads: list[tuple[str, str]],
    batch_size: int = 32,
) -> dict[tuple[str, str], torch.Tensor]:
    """Each activation of ``reads`` at every sequence's subject token, ``[len(sequences), dim]`` float32
    (ROME's ``get_reprs_at_word_tokens``), in batches of ``batch_size`` padded on the right."""
    import torch

    from flearning.editing.requests import pad_batch

    device = model_device(model)
    parts: dict[tuple[str, str], list[torch.Tensor]] = {read: [] for read in reads}
    with frozen(model):
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            got = capture(model, pad_batch(tokenizer, chunk, device), reads)
            rows = torch.arange(len(chunk), device=device)
            positions = torch.tensor([s.lookup for s in chunk], device=device)
            for read in reads:
                parts[read].append(got[read][rows, positions].float())
    return {read: torch.cat(values) for read, values in parts.items()}
