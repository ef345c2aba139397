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
    from flearning.training.prefix import can_share, logits_after_prefix, shared_prefix_length

    labels = batch["labels"]
    predicts = labels[:, 1:] != IGNORE_INDEX
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = predicts
    shared = shared_prefix_length(batch) if share_prefix and can_share(model) else 0
    if shared:
        logits = logits_after_prefix(model, batch, keep, shared)
    else:
        logits = logits_at(
            model, keep, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        )
    # both sides are row-major over the kept positions
    return torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][predicts])
