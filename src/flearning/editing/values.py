"""The value optimisation shared by ROME (``compute_v``: v* at the MLP output) and MEMIT/AlphaEdit
(``compute_z``: z at the residual stream of the last edited layer).

For each request a vector δ is added to a module's output at the subject's last token of every rewrite
prompt (the prompt alone and after each context prefix) and of the KL prompt "{subject} is a"; Adam
minimises, per request (kmeng01/rome ``rome/compute_v.py``, kmeng01/memit ``memit/compute_z.py``)

    loss = NLL(target_new | rewrite prompts)            mean over prompts of the per-token mean NLL
         + kl_factor · KL(p_δ ‖ p_0)                    next-token distribution at the KL prompt's subject
         + weight_decay · ‖δ‖ / ‖v_0‖²                   v_0: the output at the prompt alone, before δ

stopping when the loss is below ``stop_loss`` (5e-2 in both repositories) and after ``steps``
evaluations (the last one takes no step); after each step δ is projected into the ball of radius
``clamp_norm_factor · ‖v_0‖``. The result is v* = v_0 + δ.

Batched: the requests go through one forward per step, ``requests_per_pass`` of them at a time (the
memory of the backward pass grows with the batch: about 170 MB a request on SmolLM2-135M, measured). A
request's loss depends on its own δ only, Adam is element-wise, and a request that reaches
``stop_loss`` has its δ put back after every later step, so each δ is what optimising that request
alone gives (up to float rounding: tested), whatever ``requests_per_pass``. That leaves the cost free
to be cut without changing a result beyond rounding (tested): passes hold requests of similar length,
a pass's sequences go through in groups of similar length (``length_groups``: one padded batch wasted
35 % of its tokens on CounterFact), and the decoder blocks below the module run once per pass, not at
every step (``tracing.reusing_lower_blocks``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flearning.editing.requests import EditRequest, kl_sequence, pad_batch, rewrite_sequence
from flearning.editing.tracing import adding, frozen, model_device, reusing_lower_blocks
from flearning.editing.value_cache import ValueCache, ValueRow
from flearning.errors import FlearnError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValueSettings:
    """The value optimisation's settings, named as in the reference hyper-parameters; defaults from
    EasyEdit ``hparams/ROME/llama-7b.yaml`` and ``hparams/MEMIT/llama-7b.yaml``."""

    steps: int = 25  # v_num_grad_steps
    lr: float = 5e-1  # v_lr
    weight_decay: float = 1e-3  # v_weight_decay
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    stop_loss: float = 5e-2  # hard-coded in compute_v / compute_z
    # requests optimised together (memory only: each δ is the same whatever it is)
    requests_per_pass: int = 8


# a pass's sequences whose token counts differ by at most this share one padded batch
LENGTH_TOLERANCE = 4


@dataclass(frozen=True)
class Values:
    """Per request (row): ``target`` = ``init`` + ``delta``; ``losses``/``nll`` the loss and its NLL part
    at every evaluation (the last at the final δ); ``steps`` the Adam steps taken."""

    target: torch.Tensor
    init: torch.Tensor
    delta: torch.Tensor
    losses: list[list[float]]
    nll: list[list[float]]
    steps: list[int]


def optimise_values(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    module: str,
    *,
    prefixes: Sequence[str],
    settings: ValueSettings = ValueSettings(),
    cache: ValueCache | None = None,
) -> Values:
    """Optimise one δ per request at the output of ``module`` (a module name), ``requests_per_pass``
    requests at a time (the requests of similar length together); the model is unchanged. Rows of the
    result are in the order of ``requests``. With ``cache`` a request optimised before on the same model
    is read back (``value_cache``), and each pass's requests are stored as soon as it ends."""
    if settings.steps < 1 or settings.lr <= 0 or settings.clamp_norm_factor <= 0:
        raise FlearnError("the value optimisation needs steps >= 1, lr > 0 and clamp_norm_factor > 0")
    if settings.requests_per_pass < 1:
        raise FlearnError("the value optimisation needs requests_per_pass >= 1")
    keys = cache.keys(model, tokenizer, requests, module, prefixes, settings) if cache is not None else None
    rows: dict[int, ValueRow] = {}
    if cache is not None and keys is not None:
        rows = {i: row for i, key in enumerate(keys) if (row := cache.read(key)) is not None}
        if rows:
            log.info("value optimisation: %d of %d requests from the cache", len(rows), len(requests))
    missing = [i for i in range(len(requests)) if i not in rows]
    size = settings.requests_per_pass
    order = _by_length(tokenizer, [requests[i] for i in missing], prefixes) if len(missing) > size else None
    todo = [missing[k] for k in order] if order is not None else missing
    for start in range(0, len(todo), size):
        chunk = todo[start : start + size]
        part = _optimise(
            model, tokenizer, [requests[i] for i in chunk], module, prefixes=prefixes, settings=settings
        )
        for j, i in enumerate(chunk):
            rows[i] = ValueRow(
                part.target[j], part.init[j], part.delta[j], part.losses[j], part.nll[j], part.steps[j]
            )
            if cache is not None and keys is not None:
                cache.write(keys[i], rows[i])
    return _join([rows[i] for i in range(len(requests))])


def _join(rows: Sequence[ValueRow]) -> Values:
    """The rows as one ``Values``, in their order."""
    import torch

    return Values(
        target=torch.stack([r.target for r in rows]),
        init=torch.stack([r.init for r in rows]),
        delta=torch.stack([r.delta for r in rows]),
        losses=[list(r.losses) for r in rows],
        nll=[list(r.nll) for r in rows],
        steps=[r.steps for r in rows],
    )


def _by_length(
    tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest], prefixes: Sequence[str]
) -> list[int]:
    """The requests' indices by the tokens of their sequences, so that a pass holds requests of similar
    length and pads little (each δ is the same whatever the pass: see the module's docstring)."""
    texts = ("", *prefixes)

    def tokens(i: int) -> int:
        r = requests[i]
        return sum(len(rewrite_sequence(tokenizer, r, 0, p).ids) for p in texts) + len(
            kl_sequence(tokenizer, r, 0).ids
        )

    return sorted(range(len(requests)), key=tokens)


def length_groups(lengths: Sequence[int], tolerance: int = LENGTH_TOLERANCE) -> list[list[int]]:
    """Indices of ``lengths`` shortest first, cut into groups whose lengths differ by at most
    ``tolerance``: each group is one padded batch (on CounterFact, 8 requests' 56 sequences pad 35 % of
    their tokens in one batch, about 9 % in the 2 to 4 groups of tolerance 4, measured)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] - lengths[groups[-1][0]] <= tolerance:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@dataclass
class _Group:
    """One padded batch of a pass's sequences: ``members`` their indices in the pass's list; the
    positions of the logits kept and where ``adding`` puts each δ."""

    members: list[int]
    batch: dict
    keep: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor
    owner: torch.Tensor


def _optimise(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    module: str,
    *,
    prefixes: Sequence[str],
    settings: ValueSettings,
) -> Values:
    """``optimise_values`` for one pass of requests: its sequences in groups of similar length, one
    forward each per step, the logits of all groups one loss."""
    import torch

    from flearning.logits import logits_at

    device = model_device(model)
    n = len(requests)
    texts = ("", *prefixes)
    rewrites = [rewrite_sequence(tokenizer, r, i, p) for i, r in enumerate(requests) for p in texts]
    kls = [kl_sequence(tokenizer, r, i) for i, r in enumerate(requests)]
    sequences = [*rewrites, *kls]  # index < len(rewrites): a rewrite prompt; the rest: request i's KL prompt

    # The logits needed, in the order the groups' forwards return them (group by group, row-major):
    # each rewrite sequence's predicting positions, each KL sequence's lookup.
    groups: list[_Group] = []
    kept_seq: list[int] = []  # the sequence of each kept position
    labels: list[int] = []  # the target token of each kept rewrite position
    for members in length_groups([len(s.ids) for s in sequences]):
        chunk = [sequences[g] for g in members]
        batch = pad_batch(tokenizer, chunk, device)
        keep = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
        for row, g in enumerate(members):
            seq = sequences[g]
            if g < len(rewrites):
                keep[row, seq.predict_from : seq.predict_from + len(seq.targets)] = True
                kept_seq += [g] * len(seq.targets)
                labels += seq.targets
            else:
                keep[row, seq.lookup] = True
                kept_seq.append(g)
        groups.append(
            _Group(
                members=members,
                batch=batch,
                keep=keep,
                rows=torch.arange(len(chunk), device=device),
                positions=torch.tensor([s.lookup for s in chunk], device=device),
                owner=torch.tensor([s.request for s in chunk], device=device),
            )
        )
    kept = torch.tensor(kept_seq, device=device)
    is_rewrite = kept < len(rewrites)
    labels_t = torch.tensor(labels, device=device)
    nll_seq = kept[is_rewrite]  # per kept rewrite position: its sequence
    kl_owner = kept[~is_rewrite] - len(rewrites)  # per kept KL position: its request
    target_len = torch.tensor([len(seq.targets) for seq in rewrites], device=device)
    seq_owner = torch.tensor([seq.request for seq in rewrites], device=device)
    first_rows = torch.arange(n, device=device) * len(texts)  # the prompt alone, per request
    member_index = torch.tensor([g for group in groups for g in group.members], device=device)

    delta = torch.zeros((n, _output_width(model, module)), device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=settings.lr)
    active = torch.ones(n, dtype=torch.bool, device=device)
    steps = [0] * n
    losses: list[list[float]] = [[] for _ in range(n)]
    nlls: list[list[float]] = [[] for _ in range(n)]
    init = kl_init = None
    batches = [group.batch for group in groups]
    with frozen(model), reusing_lower_blocks(model, module, batches) as select, torch.enable_grad():
        for it in range(settings.steps):
            opt.zero_grad()
            parts, before = [], []
            for i, group in enumerate(groups):
                select(i)
                with adding(
                    model, module, group.rows, group.positions, lambda g=group: delta[g.owner]
                ) as record:
                    parts.append(logits_at(model, group.keep, **group.batch).float())
                before.append(record["before"])
            log_probs = torch.log_softmax(torch.cat(parts), dim=-1)
            if init is None:
                outputs = torch.empty_like(torch.cat(before)).index_copy_(0, member_index, torch.cat(before))
                init = outputs[first_rows].float()
                kl_init = log_probs[~is_rewrite].detach()
            token_lp = log_probs[is_rewrite].gather(1, labels_t[:, None])[:, 0]
            per_seq = torch.zeros(len(rewrites), device=device).index_add(0, nll_seq, -token_lp) / target_len
            nll = torch.zeros(n, device=device).index_add(0, seq_owner, per_seq) / len(texts)
            kl_lp = log_probs[~is_rewrite]
            kl_each = (kl_lp.exp() * (kl_lp - kl_init)).sum(-1)  # KL(p_δ ‖ p_0), one KL prompt per request
            kl = torch.zeros(n, device=device).index_add(0, kl_owner, kl_each)
            decay = settings.weight_decay * delta.norm(dim=-1) / init.norm(dim=-1) ** 2
            loss = nll + settings.kl_factor * kl + decay
            seen, seen_nll = loss.detach().tolist(), nll.detach().tolist()
            for r in active.nonzero()[:, 0].tolist():
                losses[r].append(seen[r])
                nlls[r].append(seen_nll[r])
            active &= loss.detach() >= settings.stop_loss
            if not bool(active.any()) or it == settings.steps - 1:
                break
            loss[active].sum().backward()
            previous = delta.detach().clone()
            opt.step()
            with torch.no_grad():
                delta[~active] = previous[~active]  # stopped requests keep their δ
                max_norm = settings.clamp_norm_factor * init.norm(dim=-1)
                norm = delta.norm(dim=-1)
                scale = torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm))
                delta.mul_(scale[:, None])
            for r in active.nonzero()[:, 0].tolist():
                steps[r] += 1
    delta = delta.detach()
    return Values(target=init + delta, init=init, delta=delta, losses=losses, nll=nlls, steps=steps)


def _output_width(model: torch.nn.Module, module: str) -> int:
    """The width of the residual stream: the models' ``hidden_size`` (GPT-2 calls it ``n_embd``)."""
    config = model.config
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not width:
        raise ValueError(f"cannot tell the output width of {module} from the model's config")
    return int(width)
