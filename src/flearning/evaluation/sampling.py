"""Top-k sampled continuations, seeded per prompt (the sampled Fluency, ROME/EasyEdit's way).

ROME's ``generate_fast`` (used by EasyEdit's ``test_generation_quality``) samples each new token from the
``top_k`` most likely ones (their probabilities renormalised) until the text is ``max_out_len`` tokens
long, prompt included, without stopping at EOS. Here each prompt draws from its own generator, seeded
from (seed, the prompt's tokens), so a continuation depends only on the model, the prompt and the seed:
not on the batch it ran in or on the other records (``batch_size=1`` gives the same texts).
Batches are left-padded, with a KV cache and explicit position ids.
"""

from __future__ import annotations

import hashlib
import inspect
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from flearning.evaluation.definitions import DEFAULT_BATCH_SIZE
from flearning.evaluation.scoring import length_batches
from flearning.logits import accepts_logits_to_keep

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def _cache_name(model: PreTrainedModel) -> str:
    """The forward's key-value cache argument (and output field): ``cache`` in recent transformers,
    ``past_key_values`` before (a peft wrapper is asked about the model it wraps)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def prompt_seed(seed: int, prompt: Sequence[int]) -> int:
    """The generator seed of one prompt: a hash of (seed, its token ids), below 2**63."""
    payload = f"{seed}:{','.join(map(str, prompt))}".encode()
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "big") >> 1


def sample_top_k(logits: torch.Tensor, top_k: int, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row from the ``top_k`` most likely, with probabilities renormalised over them
    (ROME: softmax, top-k, divide by their sum), by inverse transform of one uniform draw per row.

    Args:
        logits: ``[rows, vocab]``.
        top_k: how many candidates.
        uniforms: ``[rows]`` draws in [0, 1).
    Returns:
        ``[rows]`` token ids.
    """
    top = torch.topk(logits.double(), min(top_k, logits.shape[-1]), dim=-1)
    probs = torch.softmax(top.values, dim=-1)  # = softmax over the vocabulary, renormalised over the top k
    cumulative = probs.cumsum(dim=-1)
    pick = (cumulative < uniforms.to(cumulative)[:, None] * cumulative[:, -1:]).sum(dim=-1)
    pick = pick.clamp(max=top.indices.shape[-1] - 1)
    return top.indices.gather(-1, pick[:, None])[:, 0]


def sample_generate(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: Sequence[int],
    *,
    pad_id: int,
    seed: int = 0,
    top_k: int = 5,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
    desc: str = "sampling",
) -> list[list[int]]:
    """Top-k sampled continuations of token prompts, batched with left padding, seeded per prompt.

    Generation does not stop at EOS (as ROME's ``generate_fast``): every item gets exactly its budget.

    Args:
        model: a causal LM (in eval mode).
        prompts: prompt token ids, one list per item (non-empty).
        max_new_tokens: new-token budget per item (0: nothing is generated).
        pad_id: padding token id.
        seed: with each prompt's tokens, seeds its generator (``prompt_seed``).
        top_k: candidates per step.
        batch_size: rows per batch.
        progress: show a progress bar.
        desc: progress bar label.
    Returns:
        The new token ids of each item.
    """
    from flearning.io.progress import progress_bar

    if len(prompts) != len(max_new_tokens):
        raise ValueError("one max_new_tokens value per prompt is needed")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("cannot generate from an empty prompt")
    device = next(model.parameters()).device
    last_only = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    cache_name = _cache_name(model)
    outputs: list[list[int]] = [[] for _ in prompts]
    todo = [i for i, n in enumerate(max_new_tokens) if n > 0]
    batches = [
        [todo[j] for j in b]
        for b in length_batches([(max_new_tokens[i], len(prompts[i])) for i in todo], batch_size)
    ]
    with torch.inference_mode():
        for chunk in progress_bar(batches, desc=desc, unit="batch", enabled=progress, leave=False):
            width = max(len(prompts[i]) for i in chunk)
            budget = max(max_new_tokens[i] for i in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for b, i in enumerate(chunk):
                input_ids[b, width - len(prompts[i]) :] = torch.tensor(list(prompts[i]))
                mask[b, width - len(prompts[i]) :] = 1
            generators = [torch.Generator().manual_seed(prompt_seed(seed, prompts[i])) for i in chunk]
            positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
            step_ids, past = input_ids, None
            new: list[torch.Tensor] = []
            for _ in range(budget):
                out = model(
                    input_ids=step_ids.to(device),
                    attention_mask=mask.to(device),
                    position_ids=positions.to(device),
                    use_cache=True,
                    **{cache_name: past},
                    **last_only,
                )
                past = getattr(out, cache_name)
                uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
                token = sample_top_k(out.logits[:, -1].float().cpu(), top_k, uniforms)
                new.append(token)
                step_ids = token[:, None]
                mask = torch.cat([mask, torch.ones((len(chunk), 1), dtype=torch.long)], dim=1)
                positions = positions[:, -1:] + 1
            tokens = torch.stack(new, dim=1).tolist()
            for b, i in enumerate(chunk):
                outputs[i] = tokens[b][: max_new_tokens[i]]
    return outputs


def rome_text(text: str) -> str:
    """A decoded generation as ROME's ``generate_fast`` returns it: NFKD-normalised, blank lines turned
    into a space (``<|endoftext|>`` is dropped by decoding without special tokens)."""
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")
