"""General ability, measured: token-level perplexity of a model on held-out passages, batched.

perplexity = exp(Σ NLL / N) over the N predicted tokens of all passages (each passage cut to its first
``max_tokens`` tokens; its first token has no prediction). Passages are sorted by length and batched up to
a token budget, right-padded with an attention mask; only predicting positions are projected onto the
vocabulary (``flearning.logits``), so padding never changes a value (tested against one unpadded passage
at a time). With a ``cache_dir`` a result is kept as JSON by (weights fingerprint, encoded passages):
the model before an update is measured once, however many updates, evaluations and benches start from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from flearning.evaluation.definitions import (
    DEFAULT_PERPLEXITY_MAX_TOKENS,
    PERPLEXITY_BATCH_TOKENS,
)
from flearning.evaluation.probes import pad_token_id
from flearning.io.atomic import atomic_write_text
from flearning.logits import logits_at

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)
CACHE_FORMAT = "flearning.perplexity/v1"


@dataclass(frozen=True)
class PerplexityResult:
    """One model's perplexity on a corpus, with what it was measured on."""

    perplexity: float  # exp(nll)
    nll: float  # mean negative log-likelihood per predicted token, nats
    tokens: int  # predicted tokens
    passages: int  # passages scored (those of fewer than 2 tokens have nothing to predict)
    truncated: int  # passages cut to max_tokens
    max_tokens: int
    corpus: str | None = None
    seconds: float = 0.0
    cached: bool = False  # read from the cache (``seconds``: the original measurement's)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def encode_passages(
    tokenizer: PreTrainedTokenizerBase, passages: Sequence[str], max_tokens: int
) -> tuple[list[list[int]], int]:
    """Token ids of each passage (with the tokenizer's special tokens, e.g. a BOS), cut to ``max_tokens``.

    Returns:
        ``(ids, truncated)``: the passages with at least 2 tokens, and how many were cut.
    """
    if max_tokens < 2:
        raise ValueError("max_tokens must be at least 2 (one token predicts the next)")
    encoded, truncated = [], 0
    for text in passages:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) > max_tokens:
            ids, truncated = ids[:max_tokens], truncated + 1
        if len(ids) >= 2:
            encoded.append(list(ids))
    return encoded, truncated


def token_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped by length (longest first) so that rows x longest row <= ``batch_tokens`` (at
    least one row per batch)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def passage_nll(
    model: PreTrainedModel,
    passages: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_tokens: int = PERPLEXITY_BATCH_TOKENS,
    progress: bool = False,
) -> list[tuple[float, int]]:
    """Summed negative log-likelihood (nats, float64) and predicted-token count of each passage.

    Args:
        model: a causal LM (put in eval mode by the caller).
        passages: token ids, each at least 2 long.
        pad_id: padding id (never attended to, never scored).
        batch_tokens: rows x longest row per forward pass.
        progress: show a progress bar.
    Returns:
        ``(nll_sum, tokens)`` per passage, in input order.
    """
    from flearning.io.progress import progress_bar

    if any(len(p) < 2 for p in passages):
        raise ValueError("every passage needs at least 2 tokens")
    device = next(model.parameters()).device
    out: list[tuple[float, int] | None] = [None] * len(passages)
    batches = token_batches([len(p) for p in passages], batch_tokens)
    with torch.inference_mode():
        for chunk in progress_bar(batches, desc="perplexity", unit="batch", enabled=progress, leave=False):
            width = len(passages[chunk[0]])
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, : len(passages[i])] = torch.tensor(passages[i])
                mask[row, : len(passages[i])] = 1
            keep = torch.zeros_like(mask, dtype=torch.bool)
            keep[:, :-1] = mask[:, 1:].bool()  # position t predicts token t + 1 of the same passage
            labels = ids[:, 1:][keep[:, :-1]]
            logits = logits_at(
                model,
                keep.to(device),
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                use_cache=False,
            )
            nll = F.cross_entropy(logits.float(), labels.to(logits.device), reduction="none").double().cpu()
            counts = keep.sum(dim=1).tolist()
            for row, piece in enumerate(torch.split(nll, counts)):
                out[chunk[row]] = (math.fsum(piece.tolist()), counts[row])
    return out  # type: ignore[return-value]


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    passages: Sequence[str],
    *,
    max_tokens: int = DEFAULT_PERPLEXITY_MAX_TOKENS,
    batch_tokens: int = PERPLEXITY_BATCH_TOKENS,
    corpus: str | None = None,
    cache_dir: Path | str | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Token-level perplexity of ``model`` on ``passages`` (``definitions.PERPLEXITY_DEFINITION``).

    Args:
        model: the causal LM (put in eval mode during the call, then restored).
        tokenizer: its tokenizer.
        passages: the texts (``corpus.load_passages``).
        max_tokens: each passage is cut to its first ``max_tokens`` tokens.
        batch_tokens: rows x longest row per forward pass (memory; does not change the value).
        corpus: recorded in the result (where the passages came from).
        cache_dir: keep (and reuse) the result here, keyed by the model's weights and the encoded
            passages (None: always measure).
        progress: show a progress bar.
    Returns:
        ``PerplexityResult``.
    Raises:
        ValueError: no passage has a token to predict.
    """
    start = time.perf_counter()
    encoded, truncated = encode_passages(tokenizer, passages, max_tokens)
    if not encoded:
        raise ValueError("no passage has two tokens: there is nothing to predict")
    path = _cache_file(Path(cache_dir), model, encoded, max_tokens) if cache_dir is not None else None
    if path is not None:
        found = _read_cache(path)
        if found is not None:
            return PerplexityResult(**{**found, "corpus": corpus, "cached": True})
    was_training = model.training
    model.eval()
    try:
        scores = passage_nll(
            model, encoded, pad_id=pad_token_id(tokenizer), batch_tokens=batch_tokens, progress=progress
        )
    finally:
        model.train(was_training)
    tokens = sum(n for _, n in scores)
    nll = math.fsum(s for s, _ in scores) / tokens
    result = PerplexityResult(
        perplexity=math.exp(nll),
        nll=nll,
        tokens=tokens,
        passages=len(encoded),
        truncated=truncated,
        max_tokens=max_tokens,
        corpus=corpus,
        seconds=round(time.perf_counter() - start, 3),
    )
    if path is not None:
        try:
            atomic_write_text(path, json.dumps({"format": CACHE_FORMAT, **result.to_json()}))
        except OSError as ex:  # a cache that cannot be written costs time, not the result
            log.warning("cannot cache the perplexity in %s: %s", path, ex)
    return result


def _cache_file(cache_dir: Path, model: PreTrainedModel, encoded: list[list[int]], max_tokens: int) -> Path:
    from flearning.models import model_fingerprint

    text = json.dumps([max_tokens, encoded], separators=(",", ":"))
    passages = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
    return cache_dir / f"perplexity-{model_fingerprint(model)}-{passages}.json"


def _read_cache(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.pop("format") != CACHE_FORMAT:
            return None
        data.pop("cached", None)
        PerplexityResult(**data)  # every field there, no other
        return data
    except (OSError, ValueError, KeyError, TypeError) as ex:
        log.warning("ignoring unreadable perplexity cache %s: %s", path, ex)
        return None
