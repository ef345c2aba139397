"""Logits at chosen positions only: the vocabulary projection where a loss or a score needs it.

A causal LM's last layer projects every position onto the vocabulary (49k entries for SmolLM2: a fifth
of a 135M model's forward FLOPs, plus a log-softmax over each row). Training on facts needs the answer
positions only, evaluation the predicting positions of each target. Transformers (≥ 4.50) takes a
boolean ``[batch, seq]`` mask as ``logits_to_keep`` and returns ``[kept, vocab]``; models that do not
know the argument get the full forward, and the kept positions are selected afterwards (same values).
"""

from __future__ import annotations

import inspect

import torch


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (or passes ``**kwargs`` on, as peft and DDP do)."""
    params = inspect.signature(model.forward).parameters
    return "logits_to_keep" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def logits_at(model: torch.nn.Module, keep: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
    """Forward ``inputs`` and return the logits at the ``True`` positions of ``keep``, ``[K, vocab]``
    in row-major order (row 0's positions first).

    Args:
        model: a causal LM (or a peft / DDP wrapper of one).
        keep: boolean ``[batch, seq]`` mask of the positions whose logits are needed.
        inputs: the forward's tensors (``input_ids``, ``attention_mask``, ...), on the model's device.
    """
    if keep.dtype != torch.bool or keep.ndim != 2:
        raise ValueError(f"keep must be a 2D boolean mask, got {keep.dtype} {tuple(keep.shape)}")
    n_keep = int(keep.sum())
    if accepts_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=keep).logits
        if logits.ndim == 2 and logits.shape[0] == n_keep:
            return logits
        if logits.ndim == 3 and tuple(logits.shape[:2]) == tuple(keep.shape):
            return logits[keep]  # the model ignored logits_to_keep and returned everything
        raise RuntimeError(f"unexpected logits shape {tuple(logits.shape)} with a boolean logits_to_keep")
    return model(**inputs).logits[keep]
