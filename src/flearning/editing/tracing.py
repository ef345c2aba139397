"""Reading and changing a module's activations with forward hooks (the role of ROME's ``util/nethook``).

``capture`` runs a batch and keeps the input or output of named modules, stopping the forward once it
has them all (ROME's ``Trace(..., stop=True)``: the layers above are never computed). ``adding`` adds
vectors to a module's output at chosen (row, position) pairs, differentiably: the value optimisation
of ROME (``compute_v``) and MEMIT (``compute_z``). ``reusing_lower_blocks`` spares that optimisation's
every step the decoder blocks below the changed module, whose result cannot change.
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
def reusing_lower_blocks(
    model: torch.nn.Module, module: str, batches: Sequence[Mapping[str, torch.Tensor]]
) -> Iterator[Callable[[int], None]]:
    """While inside, a forward of one of ``batches`` skips the decoder blocks below ``module`` (and the
    block itself when ``module`` is a whole block): their output on each batch is computed once on entry
    and the skipped blocks hand it on. Yields ``select(i)``: the next forwards are of ``batches[i]``
    (initially 0). Exact as long as the model and the batches do not change, which the value optimisation
    guarantees (frozen weights, the same batches at every step; its hooks sit at ``module`` or above).

    A step's numbers are the same; its cost drops by the skipped blocks' forward (MEMIT's z at block 7
    of SmolLM2-135M's 30: 8 blocks; ROME's v at layer 12: 12 blocks).

    Raises:
        ValueError: ``module`` is not inside a decoder block.
        RuntimeError: a forward whose shape is not the selected batch's (the stored output would be wrong).
    """
    import torch

    from flearning.editing.architectures import architecture_of

    arch = architecture_of(model)
    blocks = model.get_submodule(arch.layers)
    index = next(
        (
            i
            for i in range(len(blocks))
            if module == arch.block_name(i) or module.startswith(f"{arch.block_name(i)}.")
        ),
        None,
    )
    if index is None:
        raise ValueError(f"{module} is not inside a decoder block of {arch.layers}")
    last = index if module == arch.block_name(index) else index - 1  # the highest block skipped
    current = [0]

    def select(i: int) -> None:
        if not 0 <= i < len(batches):
            raise IndexError(f"batch {i} of {len(batches)}")
        current[0] = i

    if last < 0:  # nothing below the module: nothing to skip
        yield select
        return
    outputs: list = []

    def keep(block, args, output):
        outputs.append(output)  # as the block returns it: the model's loop unpacks it itself
        raise _Stop

    handle = blocks[last].register_forward_hook(keep)
    try:
        with torch.no_grad():
            for batch in batches:
                with suppress(_Stop):
                    model(**batch, use_cache=False)
    finally:
        handle.remove()

    def stand_in(hidden_states, *args, **kwargs):
        output = outputs[current[0]]
        if tuple(hidden_states.shape[:2]) != tuple(_hidden(output).shape[:2]):
            raise RuntimeError(
                f"reusing_lower_blocks: a forward of shape {tuple(hidden_states.shape[:2])}, not the "
                f"selected batch's {tuple(_hidden(output).shape[:2])}"
            )
        return output

    for block in blocks[: last + 1]:
        block.forward = stand_in  # an instance attribute: deleting it brings back the class's forward
    try:
        yield select
    finally:
        for block in blocks[: last + 1]:
            del block.forward


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
