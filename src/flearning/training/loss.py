"""The training loss: cross-entropy over a batch's answer tokens, computed only where answers are
predicted (and, with ``share_prefix``, with a batch-wide prompt prefix run once: ``training.prefix``)."""

from __future__ import annotations

import torch

from flearning.logits import logits_at
from flearning.training.dataset import IGNORE_INDEX


def answer_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, share_prefix: bool = False
) -> torch.Tensor:
    """Mean cross-entropy over a batch's answer tokens (labels other than ``IGNORE_INDEX``): the value
    of ``model(**batch).loss``, with the vocabulary projection and log-softmax computed only at the
    positions that predict an answer token (``flearning.logits``) instead of at every position.

    Position t predicts token t + 1, so the kept positions are those whose next label is an answer.
    What it saves is measured by benchmarks/train_throughput.py (benchmarks/README.md). With
    ``share_prefix`` a prompt prefix common to the whole batch (a template's preamble) runs once for
    the batch (``training.prefix``; the same loss and gradients up to rounding).
    """
    predicts, logits = _answer_logits(model, batch, share_prefix)
    # both sides are row-major over the kept positions
    return torch.nn.functional.cross_entropy(logits.float(), batch["labels"][:, 1:][predicts])


def answer_losses(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    groups: torch.Tensor,
    count: int,
    *,
    share_prefix: bool = False,
) -> torch.Tensor:
    """``answer_loss`` of each group of rows from one forward of the whole batch: ``[count]``, entry g
    the mean cross-entropy over the answer tokens of the rows whose ``groups`` entry is g (the
    micro-batches of a fused optimizer step: ``training.fused``)."""
    predicts, logits = _answer_logits(model, batch, share_prefix)
    per_token = torch.nn.functional.cross_entropy(
        logits.float(), batch["labels"][:, 1:][predicts], reduction="none"
    )
    owner = groups[predicts.nonzero()[:, 0]]  # row-major, as the kept logits
    sums = per_token.new_zeros(count).index_add(0, owner, per_token)
    tokens = per_token.new_zeros(count).index_add(0, owner, torch.ones_like(per_token))
    return sums / tokens


def _answer_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], share_prefix: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which positions predict an answer token (``[rows, len - 1]``) and their logits, row-major."""
    from flearning.logits import can_share_prefix
    from flearning.training.prefix import logits_after_prefix, shared_prefix_length

    labels = batch["labels"]
    predicts = labels[:, 1:] != IGNORE_INDEX
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = predicts
    shared = shared_prefix_length(batch) if share_prefix and can_share_prefix(model) else 0
    if shared:
        return predicts, logits_after_prefix(model, batch, keep, shared)
    logits = logits_at(
        model, keep, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    )
    return predicts, logits
