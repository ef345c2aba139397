"""The metric math as pure functions on logits, token ids and masks.

Convention: ``target_mask[b, t]`` is true when token ``input_ids[b, t]`` is a target token; it is
predicted by the logits at position ``t - 1`` of the same row (causal LM shift). Padding (left or
right) is simply outside the mask, so these functions do not care where it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def prediction_view(
    logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair every target token with the logits that predict it.

    Args:
        logits: ``[batch, seq, vocab]``.
        input_ids: ``[batch, seq]``.
        target_mask: ``[batch, seq]``, true at target tokens; must be false in column 0 (a first token
            has no prediction).
    Returns:
        ``(pred_logits [n, vocab], labels [n], rows [n])`` for the ``n`` target tokens, in row-major
        order (row by row, left to right).
    """
    mask = target_mask.bool()
    if mask[:, 0].any():
        raise ValueError("a target token at position 0 has no preceding position to predict it")
    shifted = mask[:, 1:]
    pred_logits = logits[:, :-1][shifted]
    labels = input_ids[:, 1:][shifted]
    rows = torch.nonzero(shifted, as_tuple=True)[0]
    return pred_logits, labels, rows


def score_predictions(
    pred_logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token correctness, negative log-likelihood and argmax.

    Args:
        pred_logits: ``[n, vocab]`` logits predicting each label.
        labels: ``[n]`` the tokens that should be predicted.
    Returns:
        ``(correct [n] bool, nll [n] float32 in nats, argmax [n] long)``.
    """
    argmax = pred_logits.argmax(dim=-1)
    nll = F.cross_entropy(pred_logits.float(), labels, reduction="none")
    return argmax == labels, nll, argmax


def group_mean(values: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Mean of ``values`` per group index (float64; nan for empty groups).

    Args:
        values: ``[n]`` numbers (bool is fine).
        groups: ``[n]`` group index of each value, in ``[0, n_groups)``.
        n_groups: number of groups.
    Returns:
        ``[n_groups]`` float64 means.
    """
    sums = torch.zeros(n_groups, dtype=torch.float64, device=values.device)
    counts = torch.zeros(n_groups, dtype=torch.float64, device=values.device)
    sums.index_add_(0, groups, values.to(torch.float64))
    counts.index_add_(0, groups, torch.ones_like(values, dtype=torch.float64))
    return sums / counts


def token_accuracy(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Teacher-forced token accuracy per row (EasyEdit): mean over target tokens of argmax == token.

    Args:
        logits: ``[batch, seq, vocab]``.
        input_ids: ``[batch, seq]``.
        target_mask: ``[batch, seq]`` true at target tokens.
    Returns:
        ``[batch]`` float64 accuracies in [0, 1] (nan for rows without targets).
    """
    pred_logits, labels, rows = prediction_view(logits, input_ids, target_mask)
    correct, _, _ = score_predictions(pred_logits, labels)
    return group_mean(correct, rows, logits.shape[0])


def mean_target_nll(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token negative log-likelihood (nats) of the target tokens per row (ROME's efficacy input).

    Args:
        logits: ``[batch, seq, vocab]``.
        input_ids: ``[batch, seq]``.
        target_mask: ``[batch, seq]`` true at target tokens.
    Returns:
        ``[batch]`` float64 mean NLL (nan for rows without targets).
    """
    pred_logits, labels, rows = prediction_view(logits, input_ids, target_mask)
    _, nll, _ = score_predictions(pred_logits, labels)
    return group_mean(nll, rows, logits.shape[0])


def target_argmax(logits: torch.Tensor, target_mask: torch.Tensor) -> list[list[int]]:
    """Argmax token predicted for every target position, per row (what Locality compares).

    Args:
        logits: ``[batch, seq, vocab]``.
        target_mask: ``[batch, seq]`` true at target tokens.
    Returns:
        One list of token ids per row, in position order.
    """
    mask = target_mask.bool()
    if mask[:, 0].any():
        raise ValueError("a target token at position 0 has no preceding position to predict it")
    predicted = logits[:, :-1].argmax(dim=-1)
    return [predicted[b][mask[b, 1:]].tolist() for b in range(logits.shape[0])]


def argmax_agreement(reference: Sequence[int], current: Sequence[int]) -> float:
    """Fraction of positions where two argmax sequences agree (Locality of one prompt/answer pair).

    Args:
        reference: argmax ids of the model before the update.
        current: argmax ids of the evaluated model at the same positions.
    Returns:
        A fraction in [0, 1].
    """
    if len(reference) != len(current) or not reference:
        raise ValueError(f"cannot compare argmax sequences of lengths {len(reference)} and {len(current)}")
    return sum(int(a == b) for a, b in zip(reference, current, strict=True)) / len(reference)


def nll_prefers_new(nll_new: float, nll_old: float) -> float:
    """ROME efficacy for one prompt: 1.0 if target_new is strictly more likely per token than target_old."""
    return float(nll_new < nll_old)


NO_CATEGORY = "(no category)"  # the name of a record's uncategorised probes beside categorised ones


def category_means(
    values: Sequence[float], categories: Sequence[str | None]
) -> tuple[float | None, dict[str, float]]:
    """A record's Locality or Portability from its per-probe values, by category (EasyEdit's KnowEdit
    rule): the mean within each category, then the mean over the categories.

    Args:
        values: one value per probe.
        categories: each probe's category (None: uncategorised).
    Returns:
        ``(value, by_category)``: the mean over categories of the within-category means (None without
        probes), and those means by category name, empty when no probe has a category. Probes without
        a category are one implicit category (``NO_CATEGORY`` when others have one), so a record without
        categories gets the plain mean over its probes.
    """
    if len(values) != len(categories):
        raise ValueError("one category per value is needed")
    groups: dict[str | None, list[float]] = {}
    for value, category in zip(values, categories, strict=True):
        groups.setdefault(category, []).append(value)
    means = {name: math.fsum(group) / len(group) for name, group in groups.items()}
    overall = mean_or_none(list(means.values()))
    if set(means) <= {None}:
        return overall, {}
    return overall, {NO_CATEGORY if name is None else name: mean for name, mean in means.items()}


def mean_or_none(values: Sequence[float]) -> float | None:
    """Mean of a record's per-probe values, or None when the record has no such probe.

    Args:
        values: e.g. one accuracy per rephrase prompt.
    Returns:
        The arithmetic mean, or None for an empty sequence.
    """
    return math.fsum(values) / len(values) if values else None
