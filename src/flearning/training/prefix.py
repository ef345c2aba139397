"""A prompt prefix shared by every example of a batch, computed once for the batch instead of once per
example: the Alpaca template's preamble ("Below is an instruction that describes a task. ...", 24
tokens of SmolLM2's tokenizer) is the same for every fact, and more than half of each templated
example's tokens (ZsRE: 43.6 tokens per example under Alpaca, 14.6 plain; CounterFact 38.4 and 9.4).

The prefix runs as a batch of one, its keys and values (``past_key_values``) are repeated over the
batch, and the rest of every example runs on top of them. Causal attention makes each example's
positions after the prefix see exactly the same keys and values as in the whole forward, and gradients
flow back through the repeated keys and values into the prefix's forward, so the loss and its gradients
are those of the whole forward up to float rounding (tested against it, plain and LoRA).

Used when it is safe and pays: one process (DDP's reducer expects one forward per backward), at least
two examples, a shared prefix of ``MIN_SHARED`` tokens or more that predicts no answer token, a model
whose forward takes a key/value cache, and no active dropout. Otherwise the batch runs whole.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from flearning.training.dataset import IGNORE_INDEX

# Below this many shared tokens the second forward costs more than it saves (a plain prompt shares only
# its BOS token).
MIN_SHARED = 8


def shared_prefix_length(batch: dict[str, torch.Tensor], minimum: int = MIN_SHARED) -> int:
    """How many leading tokens every example of ``batch`` shares (same ids, all attended) before its
    first answer-predicting position; 0 when fewer than ``minimum`` or fewer than two examples."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if ids.shape[0] < 2:
        return 0
    same = ((ids == ids[:1]).all(0) & (mask == 1).all(0)).int()
    shared = int(same.cumprod(0).sum())
    answers = (labels != IGNORE_INDEX).any(0).nonzero()
    if len(answers):  # position t predicts token t + 1: the prefix must end before the first prediction
        shared = min(shared, int(answers[0]) - 1)
    return shared if shared >= minimum else 0


def can_share(model: torch.nn.Module) -> bool:
    """Whether the prefix can be shared with ``model``: its forward takes a cache and ``logits_to_keep``
    (or passes ``**kwargs`` on, as peft does), and no dropout is active (a shared prefix would share its
    dropout mask over the batch: Llama-family models have none, GPT-2 has 0.1 while training)."""
    from torch import nn

    params = inspect.signature(model.forward).parameters
    takes = any(p.kind is p.VAR_KEYWORD for p in params.values()) or (
        _cache_argument(model) in params and "logits_to_keep" in params
    )
    if not takes:
        return False
    return not (model.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()))


def _cache_argument(model: torch.nn.Module) -> str:
    """The name transformers gives the key/value cache argument: ``cache`` (5.x from its rename on),
    ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def logits_after_prefix(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], keep: torch.Tensor, shared: int
) -> torch.Tensor:
    """The logits at the ``True`` positions of ``keep`` (``[K, vocab]``, row-major, as
    ``logits.logits_at``), with the first ``shared`` tokens run once for the whole batch. ``keep`` must
    hold no position below ``shared`` (``shared_prefix_length`` makes sure)."""
    from flearning.logits import logits_at

    ids, mask = batch["input_ids"], batch["attention_mask"]
    if bool(keep[:, :shared].any()):
        raise ValueError(f"a kept position lies inside the shared prefix of {shared} tokens")
    first = model(
        input_ids=ids[:1, :shared], attention_mask=mask[:1, :shared], use_cache=True, logits_to_keep=1
    )
    cache = getattr(first, "cache", None) or first.past_key_values
    cache.batch_repeat_interleave(ids.shape[0])
    return logits_at(
        model,
        keep[:, shared:],
        input_ids=ids[:, shared:],
        attention_mask=mask,  # the prefix's columns and the rest's: positions continue after the prefix
        use_cache=True,
        **{_cache_argument(model): cache},
    )
