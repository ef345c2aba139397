"""Gradient accumulation as one batch: an optimizer step's micro-batches run as one forward and one
backward when they share a prompt prefix (``fused_accumulation``, one process only).

Accumulation over k micro-batches takes the gradient of (1/k)·Σ_m L_m, L_m the mean cross-entropy over
micro-batch m's answer tokens (accelerate divides each backward by ``grad_accum``). The fused batch
computes every L_m from one forward of all the micro-batches' rows (``answer_losses``: each row's
tokens averaged within its own micro-batch, so no micro-batch weighs more for holding more answer
tokens) and takes the gradient of the same sum in one backward: the same gradient up to float rounding,
the same data in the same steps. What it buys is the shared prefix: the Alpaca preamble runs once for
the 16 rows of the paper's step instead of once for each micro-batch of 4, and at 16 rows the prefix
saves much more than at 4 (benchmarks/shared_prefix.py: ×0.58 against ×0.94 of the time).

When the step's rows share no prefix (a plain prompt) fusing buys nothing (a batch of 16 run whole was
no faster per row than batches of 4) and costs memory: the micro-batches then run one after the other,
exactly as accumulation does. The fused batch holds ``batch_size × grad_accum`` rows' activations:
a memory budget that needs accumulation should leave ``fused_accumulation`` off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from flearning.logits import can_share_prefix
from flearning.training.dataset import IGNORE_INDEX
from flearning.training.loss import answer_loss, answer_losses
from flearning.training.prefix import shared_prefix_length


def concat_batches(
    batches: Sequence[dict[str, torch.Tensor]], pad_id: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The rows of ``batches`` (right-padded, as ``collate`` makes them) as one batch right-padded to the
    longest, and each row's micro-batch index (``[rows]``)."""
    width = max(int(b["input_ids"].shape[1]) for b in batches)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    fused = {
        key: torch.cat(
            [torch.nn.functional.pad(b[key], (0, width - b[key].shape[1]), value=value) for b in batches]
        )
        for key, value in fill.items()
    }
    groups = torch.cat(
        [torch.full((b["input_ids"].shape[0],), m, dtype=torch.long) for m, b in enumerate(batches)]
    )
    return fused, groups.to(fused["input_ids"].device)


def accumulate(
    model: torch.nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    pad_id: int,
    backward: Callable[[torch.Tensor], None],
    check: Callable[[torch.Tensor, int], None],
) -> list[float]:
    """Forward and backward one optimizer step's micro-batches, fused when their rows share a prompt
    prefix, else one after the other. ``backward`` is accelerate's (it divides by ``grad_accum``);
    ``check(loss, m)`` runs before any backward of micro-batch m's loss (it raises for a non-finite
    loss). Returns each micro-batch's loss."""
    fused, groups = concat_batches(batches, pad_id)
    if len(batches) > 1 and can_share_prefix(model) and shared_prefix_length(fused):
        losses = answer_losses(model, fused, groups, len(batches), share_prefix=True)
        for m in range(len(batches)):
            check(losses[m], m)
        backward(losses.sum())
        return losses.detach().tolist()
    out = []
    for m, batch in enumerate(batches):
        loss = answer_loss(model, batch, share_prefix=True)
        check(loss, m)
        backward(loss)
        out.append(loss.item())
    return out
