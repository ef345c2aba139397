"""Logits at chosen positions only: the vocabulary projection where a loss or a score needs it.

A causal LM's last layer projects every position onto the vocabulary (49k entries for SmolLM2: a fifth
of a 135M model's forward FLOPs, plus a log-softmax over each row). Training on facts needs the answer
positions only, evaluation the predicting positions of each target. Transformers (≥ 4.50) takes a
boolean ``[batch, seq]`` mask as ``logits_to_keep`` and returns ``[kept, vocab]``; models that do not
know the argument get the full forward, and the kept positions are selected afterwards (same values).

A prompt prefix every row of a batch shares (a template's preamble) can run once for the whole batch
(``logits_after_prefix``): as a batch of one, its keys and values (the key/value cache) repeated over the
rows, the rest of every row on top of them. Causal attention makes each position after the prefix see
exactly the keys and values of the whole forward, and gradients flow back through the repeated cache
into the prefix's forward: the same logits and gradients up to float rounding (training and evaluation
test it against the whole forward).
"""

from __future__ import annotations

import inspect

import torch

# Below this many shared tokens the prefix's own forward costs more than it saves (a plain prompt shares
# only its BOS token; the Alpaca preamble is 24 tokens of SmolLM2's tokenizer).
MIN_SHARED_PREFIX = 8


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


def can_share_prefix(model: torch.nn.Module) -> bool:
    """Whether a batch's shared prefix can run once with ``model``: its forward takes a cache and
    ``logits_to_keep`` (or passes ``**kwargs`` on, as peft does), and no dropout is active (a shared prefix
    would share its dropout mask over the batch: Llama-family models have none, GPT-2 has 0.1 while
    training)."""
    from torch import nn

    params = inspect.signature(model.forward).parameters
    takes = any(p.kind is p.VAR_KEYWORD for p in params.values()) or (
        cache_argument(model) in params and "logits_to_keep" in params
    )
    if not takes:
        return False
    return not (model.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()))


def cache_argument(model: torch.nn.Module) -> str:
    """The name transformers gives the key/value cache argument: ``cache`` (5.x from its rename on),
    ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def logits_after_prefix(
    model: torch.nn.Module,
    keep: torch.Tensor,
    shared: int,
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """``logits_at`` with the first ``shared`` tokens of every row (the same in each) run once for the
    whole batch. ``keep`` must hold no position below ``shared``. ``attention_mask`` is a ``[B, T]``
    padding mask, or an additive ``[B, 1, T, T]`` one (its rows after the prefix are used); the prefix
    must be attended by every row's every later position, as a prompt's tokens are."""
    if bool(keep[:, :shared].any()):
        raise ValueError(f"a kept position lies inside the shared prefix of {shared} tokens")
    first = model(
        input_ids=input_ids[:1, :shared],
        attention_mask=torch.ones_like(input_ids[:1, :shared]),
        **({"position_ids": position_ids[:1, :shared]} if position_ids is not None else {}),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = getattr(first, "cache", None) or first.past_key_values
    cache.batch_repeat_interleave(input_ids.shape[0])
    rest: dict[str, torch.Tensor] = {
        "input_ids": input_ids[:, shared:],
        # a padding mask covers the prefix's columns and the rest's: positions continue after the prefix
        "attention_mask": attention_mask if attention_mask.ndim == 2 else attention_mask[:, :, shared:, :],
    }
    if position_ids is not None:
        rest["position_ids"] = position_ids[:, shared:]
    return logits_at(model, keep[:, shared:], **rest, use_cache=True, **{cache_argument(model): cache})
