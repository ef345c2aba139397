"""Batched execution: teacher-forced scoring of many (prompt, target) probes and greedy generation.

Scoring pads on the right with an attention mask, so every real position is computed as for the record
alone. Targets after the same prompt are packed into one row (a 4D mask lets each see the prompt and
itself only, position ids restart per target), so the prompt is computed once; a prompt prefix every
row of a batch shares (a template's preamble) runs once for the batch; only predicting positions are
projected onto the vocabulary. Generation pads on the left, so every row's next token
follows its own prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from flearning.evaluation.definitions import DEFAULT_BATCH_SIZE
from flearning.evaluation.metrics import group_mean, score_predictions
from flearning.logits import MIN_SHARED_PREFIX, can_share_prefix, logits_after_prefix, logits_at

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

MAX_SEGMENTS_PER_ROW = 8


@dataclass(frozen=True)
class Probe:
    """One teacher-forced input: prompt tokens followed by target tokens (from ``encode_pair``)."""

    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("a probe needs at least one prompt token to predict its first target token")
        if not self.target_ids:
            raise ValueError("a probe needs at least one target token")


@dataclass(frozen=True)
class ProbeScore:
    """Teacher-forced results of one probe."""

    accuracy: float  # fraction of target tokens that are the argmax
    nll: float  # mean per-token negative log-likelihood, nats
    argmax: tuple[int, ...]  # argmax token at each target position


@dataclass
class PackedRow:
    """One model input row: a prompt and one or more target segments that follow it."""

    prompt_ids: tuple[int, ...]
    segments: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)  # (probe index, target ids)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + sum(len(t) for _, t in self.segments)


@dataclass
class ModelBatch:
    """Tensors for one forward pass and the bookkeeping to map predictions back to probes."""

    input_ids: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] (one segment per row) or additive [B, 1, T, T]
    keep: torch.Tensor  # [B, T] bool: positions whose logits are needed
    pred_index: torch.Tensor  # [N] index into the kept (row-major flattened) logits
    labels: torch.Tensor  # [N] token predicted there
    probe_of: torch.Tensor  # [N] batch-local probe number of each label
    probes: list[int]  # global probe index of each batch-local probe number


def pack_probes(
    probes: Sequence[Probe], *, pack: bool = True, max_segments: int = MAX_SEGMENTS_PER_ROW
) -> list[PackedRow]:
    """Group probes into rows; with ``pack`` the probes sharing a prompt share a row.

    Args:
        probes: the probes to score.
        pack: share prompts (otherwise one probe per row).
        max_segments: at most this many targets per row (bounds the row length).
    Returns:
        Rows covering every probe exactly once.
    """
    if not pack:
        return [PackedRow(p.prompt_ids, [(i, p.target_ids)]) for i, p in enumerate(probes)]
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(probes):
        by_prompt.setdefault(p.prompt_ids, []).append(i)
    rows = []
    for prompt_ids, members in by_prompt.items():
        for start in range(0, len(members), max_segments):
            chunk = members[start : start + max_segments]
            rows.append(PackedRow(prompt_ids, [(i, probes[i].target_ids) for i in chunk]))
    return rows


def length_batches(lengths: Sequence[int | tuple[int, ...]], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted), so little padding is computed.

    Args:
        lengths: one sort key per item: a length, or a tuple compared element by element.
        batch_size: items per batch.
    Returns:
        Batches of item indices; longest first so memory trouble shows up at once.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], -i), reverse=True)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate_rows(rows: Sequence[PackedRow], pad_id: int, *, dtype: torch.dtype = torch.float32) -> ModelBatch:
    """Right-pad rows into one batch.

    Rows with a single segment get a plain ``[B, T]`` padding mask (the model builds the causal mask);
    if any row holds several segments, an additive ``[B, 1, T, T]`` mask is built in which a token sees
    earlier tokens of the prompt and of its own segment only. Padding positions see only themselves,
    which keeps their (ignored) outputs finite.

    Args:
        rows: the rows of this batch.
        pad_id: token id used for padding (never attended to, never scored).
        dtype: the model's floating dtype, for the additive mask.
    Returns:
        A ``ModelBatch``.
    """
    width = max(r.length for r in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    segment = torch.full((n, width), -1, dtype=torch.long)  # 0 = prompt, k = k-th target, -1 = pad
    keep = torch.zeros((n, width), dtype=torch.bool)
    # (row, position that predicts, label, batch-local probe)
    predictions: list[tuple[int, int, int, int]] = []
    probes: list[int] = []
    for b, row in enumerate(rows):
        p = len(row.prompt_ids)
        input_ids[b, :p] = torch.tensor(row.prompt_ids)
        position_ids[b, :p] = torch.arange(p)
        segment[b, :p] = 0
        offset = p
        for k, (probe, target) in enumerate(row.segments, start=1):
            local = len(probes)
            probes.append(probe)
            t = len(target)
            input_ids[b, offset : offset + t] = torch.tensor(target)
            position_ids[b, offset : offset + t] = torch.arange(p, p + t)
            segment[b, offset : offset + t] = k
            # The first target token is predicted from the last prompt token, the others from the
            # previous token of the same segment.
            sources = [p - 1, *range(offset, offset + t - 1)]
            for src, label in zip(sources, target, strict=True):
                predictions.append((b, src, label, local))
                keep[b, src] = True
            offset += t
    # Row-major rank of every kept position = its row in the flattened selected logits.
    rank = torch.cumsum(keep.view(-1).long(), 0).view(n, width) - 1
    pred_index = torch.tensor([int(rank[b, s]) for b, s, _, _ in predictions], dtype=torch.long)
    labels = torch.tensor([lab for _, _, lab, _ in predictions], dtype=torch.long)
    probe_of = torch.tensor([loc for _, _, _, loc in predictions], dtype=torch.long)

    if all(len(r.segments) == 1 for r in rows):
        attention_mask = (segment >= 0).long()
    else:
        idx = torch.arange(width)
        causal = idx[None, :] <= idx[:, None]  # [T(query), T(key)]
        seg_q = segment[:, :, None]
        seg_k = segment[:, None, :]
        allowed = causal[None] & (seg_k >= 0) & (seg_q >= 0) & ((seg_k == 0) | (seg_k == seg_q))
        allowed |= torch.eye(width, dtype=torch.bool)[None]  # padding sees itself: no all-masked rows
        attention_mask = torch.zeros((n, 1, width, width), dtype=dtype)
        attention_mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return ModelBatch(input_ids, position_ids, attention_mask, keep, pred_index, labels, probe_of, probes)


def shared_prompt_length(rows: Sequence[PackedRow], minimum: int = MIN_SHARED_PREFIX) -> int:
    """How many leading prompt tokens every row shares, stopping before any row's last prompt token
    (which predicts its first target); 0 when fewer than ``minimum`` or fewer than two rows."""
    if len(rows) < 2:
        return 0
    first = rows[0].prompt_ids
    limit = min(len(r.prompt_ids) for r in rows) - 1
    shared = 0
    while shared < limit and all(r.prompt_ids[shared] == first[shared] for r in rows):
        shared += 1
    return shared if shared >= minimum else 0


def selected_logits(model: PreTrainedModel, batch: ModelBatch, shared: int = 0) -> torch.Tensor:
    """Forward one batch and return the logits at ``batch.keep`` positions, ``[K, vocab]`` row-major
    (the vocabulary projection runs only there: ``flearning.logits``); with ``shared`` the rows' first
    ``shared`` tokens (the same in every row: ``shared_prompt_length``) run once for the batch."""
    device = next(model.parameters()).device
    inputs = {
        "input_ids": batch.input_ids.to(device),
        "attention_mask": batch.attention_mask.to(device),
        "position_ids": batch.position_ids.to(device),
    }
    keep = batch.keep.to(device)
    if shared:
        return logits_after_prefix(model, keep, shared, **inputs)
    return logits_at(model, keep, **inputs, use_cache=False)


def _batched(batches: list[list[int]], progress: bool, desc: str) -> Iterator[list[int]]:
    from flearning.io.progress import progress_bar

    yield from progress_bar(batches, desc=desc, unit="batch", enabled=progress, leave=False)


def score_probes(
    model: PreTrainedModel,
    probes: Sequence[Probe],
    *,
    pad_id: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    pack: bool = True,
    share_prefix: bool = True,
    progress: bool = False,
    desc: str = "scoring",
) -> list[ProbeScore]:
    """Teacher-forced accuracy, mean NLL and argmax ids of every probe, batched.

    Args:
        model: a causal LM (put in eval mode by the caller).
        probes: the (prompt, target) token probes.
        pad_id: padding token id.
        batch_size: rows per forward pass.
        pack: share one row between probes with the same prompt.
        share_prefix: run a prompt prefix every row of a batch shares (a template's preamble) once for
            the batch (``logits.logits_after_prefix``; the same scores up to float rounding).
        progress: show a progress bar.
        desc: progress bar label.
    Returns:
        One ``ProbeScore`` per probe, in input order.
    """
    rows = pack_probes(probes, pack=pack)
    dtype = next(model.parameters()).dtype
    share = share_prefix and can_share_prefix(model)
    results: list[ProbeScore | None] = [None] * len(probes)
    batches = length_batches([r.length for r in rows], batch_size)
    with torch.inference_mode():
        for chunk in _batched(batches, progress, desc):
            batch_rows = [rows[i] for i in chunk]
            batch = collate_rows(batch_rows, pad_id, dtype=dtype)
            logits = selected_logits(model, batch, shared_prompt_length(batch_rows) if share else 0)
            device = logits.device
            labels = batch.labels.to(device)
            probe_of = batch.probe_of.to(device)
            correct, nll, argmax = score_predictions(logits[batch.pred_index.to(device)], labels)
            n_local = len(batch.probes)
            acc = group_mean(correct, probe_of, n_local).tolist()
            mean_nll = group_mean(nll, probe_of, n_local).tolist()
            argmax_list = argmax.tolist()
            owners = batch.probe_of.tolist()
            per_probe: list[list[int]] = [[] for _ in range(n_local)]
            for owner, token in zip(owners, argmax_list, strict=True):
                per_probe[owner].append(token)
            for local, global_index in enumerate(batch.probes):
                results[global_index] = ProbeScore(acc[local], mean_nll[local], tuple(per_probe[local]))
    return results  # type: ignore[return-value]


def greedy_generate(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: Sequence[int],
    *,
    pad_id: int,
    eos_id: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
    desc: str = "generating",
) -> list[list[int]]:
    """Greedy continuations of token prompts, batched with left padding.

    A batch generates as many tokens as its largest budget; each row is then cut to its own budget and
    at its first EOS. Greedy decoding is causal, so the cut row equals what the record alone produces.

    Args:
        model: a causal LM.
        prompts: prompt token ids, one list per item (non-empty).
        max_new_tokens: new-token budget per item.
        pad_id: padding token id.
        eos_id: generation stops at this token (excluded from the output).
        batch_size: rows per ``generate`` call.
        progress: show a progress bar.
        desc: progress bar label.
    Returns:
        The new token ids of each item (without prompt, without EOS).
    """
    from transformers import GenerationConfig

    if len(prompts) != len(max_new_tokens):
        raise ValueError("one max_new_tokens value per prompt is needed")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("cannot generate from an empty prompt")
    device = next(model.parameters()).device
    outputs: list[list[int] | None] = [None] * len(prompts)
    # A batch decodes until its largest budget, and each decoding step costs about the same for any
    # number of rows (weights are read once per step), so group by budget first, then prompt length.
    batches = length_batches([(max_new_tokens[i], len(p)) for i, p in enumerate(prompts)], batch_size)
    with torch.inference_mode():
        for chunk in _batched(batches, progress, desc):
            width = max(len(prompts[i]) for i in chunk)
            budget = max(max_new_tokens[i] for i in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for b, i in enumerate(chunk):
                ids = list(prompts[i])
                input_ids[b, width - len(ids) :] = torch.tensor(ids)
                attention_mask[b, width - len(ids) :] = 1
            # Everything that could change a greedy step is pinned explicitly: generate() fills unset
            # fields from the model's own generation_config (which may ask for sampling or penalties).
            config = GenerationConfig(
                max_new_tokens=budget,
                do_sample=False,
                num_beams=1,
                repetition_penalty=1.0,
                no_repeat_ngram_size=0,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
            )
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
            )
            new = out[:, width:].tolist()
            for b, i in enumerate(chunk):
                tokens = new[b][: max_new_tokens[i]]
                if eos_id in tokens:
                    tokens = tokens[: tokens.index(eos_id)]
                outputs[i] = tokens
    return outputs  # type: ignore[return-value]
