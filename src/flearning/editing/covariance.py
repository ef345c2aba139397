"""C = E[k kᵀ]: the uncentred second moment of a layer's keys over a text corpus, cached on disk.

ROME, MEMIT and AlphaEdit weigh an edit against the keys the layer already stores through C, the mean of
``k kᵀ`` over every (unpadded) token of a corpus, where ``k`` is the edited module's input (ROME's
``layer_stats`` with ``to_collect=["mom2"]``: ``SecondMoment`` divides the sum of ``k kᵀ`` by the token
count, without centring). The reference collects 100,000 Wikipedia texts; here the corpus is any local
text file (paragraphs separated by blank lines, else one text per line), a ``save_to_disk`` directory
with a ``text`` column, or the shipped sample ``sample:wikitext-2-valid-200.txt``, read in order (not
sampled) up to ``max_tokens`` tokens, each text cut at ``max_length`` tokens.

Sums are accumulated in float64 and stored as ``dtype`` (ROME's ``mom2_dtype``, float32 by default).
The result is cached under ``$FLEARN_CACHE/covariance`` (or ``cache_dir``) as ``<key>.safetensors`` with
``<key>.json`` beside it; the key hashes the model's weights (``models.model_fingerprint``), the
tokenizer, the module name, the corpus's sha256, ``max_tokens``, ``max_length`` and ``dtype``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flearning.errors import FlearnError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_CORPUS = "sample:wikitext-2-valid-200.txt"
CACHE_FORMAT = 1
_DTYPES = ("float32", "float64")
_HOW = (
    "pass a text file (paragraphs separated by blank lines, or one text per line), a datasets directory "
    f"(save_to_disk) with a 'text' column, or the shipped {DEFAULT_CORPUS}"
)


@dataclass(frozen=True)
class Corpus:
    texts: tuple[str, ...]
    name: str
    sha256: str


@dataclass(frozen=True)
class CovarianceSettings:
    """Where C comes from. ``corpus``: a path, ``sample:NAME``, a ``Corpus`` or a list of texts;
    ``split`` picks the split of a ``DatasetDict`` directory; ``cache_dir`` None is
    ``$FLEARN_CACHE/covariance``; ``cache`` False neither reads nor writes it."""

    corpus: str | os.PathLike[str] | Corpus | Sequence[str] = DEFAULT_CORPUS
    max_tokens: int = 100_000
    max_length: int = 512
    batch_size: int = 8
    dtype: str = "float32"
    split: str | None = None
    cache_dir: str | os.PathLike[str] | None = None
    cache: bool = True
    progress: bool = False


def _split_text(text: str) -> list[str]:
    parts = re.split(r"\n[ \t]*\n", text) if re.search(r"\n[ \t]*\n", text) else text.splitlines()
    return [p.strip() for p in parts if p.strip()]


def _texts_digest(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode("utf-8")).hexdigest()


def load_corpus(
    spec: str | os.PathLike[str] | Corpus | Sequence[str] = DEFAULT_CORPUS, split: str | None = None
) -> Corpus:
    """The texts of a corpus, in order.

    Raises:
        FlearnError: no such file, an empty corpus, or a datasets directory without a ``text`` column.
    """
    if isinstance(spec, Corpus):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        texts = tuple(str(t) for t in spec if str(t).strip())
        if not texts:
            raise FlearnError(f"the covariance corpus holds no text; {_HOW}")
        return Corpus(texts, "<texts>", _texts_digest(texts))
    from flearning.resources import resolve_sample

    path = resolve_sample(spec)
    name = str(spec)
    if path.is_dir():
        texts, digest = _read_dataset_dir(path, name, split)
    elif path.is_file():
        try:
            raw = path.read_bytes()
            texts = tuple(_split_text(raw.decode("utf-8")))
        except (OSError, UnicodeDecodeError) as ex:
            raise FlearnError(f"cannot read the covariance corpus {name}: {ex}; {_HOW}") from None
        digest = hashlib.sha256(raw).hexdigest()
    else:
        raise FlearnError(f"the covariance corpus {name} does not exist; {_HOW}")
    if not texts:
        raise FlearnError(f"the covariance corpus {name} holds no text; {_HOW}")
    return Corpus(texts, name, digest)


def _read_dataset_dir(path: Path, name: str, split: str | None) -> tuple[tuple[str, ...], str]:
    from flearning.data.sources import read_table, resolve_source

    table = read_table(resolve_source(path), split)
    if "text" not in table.columns:
        raise FlearnError(
            f"the covariance corpus {name} has no 'text' column (its columns: {', '.join(table.columns)})"
        )
    texts = tuple(str(row["text"]).strip() for row in table.rows if str(row.get("text") or "").strip())
    return texts, table.sha256


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides the tokens: the fast tokenizer's definition (without its truncation and
    padding state, which every call with ``truncation=True`` changes), else its class and vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None)
        definition.pop("padding", None)
        text = json.dumps(definition, sort_keys=True)
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}|{text}".encode()).hexdigest()


def cache_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:40]


def second_moment(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    module: str,
    settings: CovarianceSettings = CovarianceSettings(),
    *,
    fingerprint: str | None = None,
) -> torch.Tensor:
    """C of one module's input, ``[in, in]`` (see ``second_moments``)."""
    return second_moments(model, tokenizer, [module], settings, fingerprint=fingerprint)[module]


def second_moments(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    modules: Sequence[str],
    settings: CovarianceSettings = CovarianceSettings(),
    *,
    fingerprint: str | None = None,
) -> dict[str, torch.Tensor]:
    """C = E[k kᵀ] of the input of each module (by name), from the cache when there, else computed in one
    pass over the corpus for all missing modules (the forward stops at the highest), then cached.

    ``fingerprint``: the model's ``model_fingerprint`` when the caller has it (it costs a read of every
    weight).
    """
    if settings.dtype not in _DTYPES:
        raise FlearnError(f"covariance dtype '{settings.dtype}': choose one of {', '.join(_DTYPES)}")
    if settings.max_tokens < 1 or settings.max_length < 1 or settings.batch_size < 1:
        raise FlearnError("covariance max_tokens, max_length and batch_size must be positive")
    corpus = load_corpus(settings.corpus, settings.split)
    results: dict[str, torch.Tensor] = {}
    keys: dict[str, dict[str, Any]] = {}
    cache_dir = _cache_dir(settings)
    if settings.cache:
        from flearning.models import model_fingerprint

        fingerprint = fingerprint or model_fingerprint(model)
        tok_digest = tokenizer_digest(tokenizer)
        for module in modules:
            keys[module] = {
                "format": CACHE_FORMAT,
                "model_fingerprint": fingerprint,
                "tokenizer_sha256": tok_digest,
                "module": module,
                "corpus_sha256": corpus.sha256,
                "max_tokens": settings.max_tokens,
                "max_length": settings.max_length,
                "dtype": settings.dtype,
            }
            cached = _read_cached(cache_dir, keys[module])
            if cached is not None:
                results[module] = cached
    missing = [m for m in modules if m not in results]
    if missing:
        computed, count = _accumulate(model, tokenizer, missing, corpus, settings)
        for module, moment in computed.items():
            results[module] = moment
            if settings.cache:
                _write_cached(cache_dir, keys[module], moment, count, corpus.name)
    return {m: results[m] for m in modules}


def _cache_dir(settings: CovarianceSettings) -> Path:
    if settings.cache_dir is not None:
        return Path(settings.cache_dir).expanduser()
    from flearning.models import cache_root

    return cache_root() / "covariance"


def _read_cached(cache_dir: Path, key: dict[str, Any]) -> torch.Tensor | None:
    stem = cache_dir / cache_key(key)
    meta_path, tensor_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not meta_path.is_file() or not tensor_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if any(meta.get(k) != v for k, v in key.items()):
            return None
        from safetensors.torch import load_file

        moment = load_file(str(tensor_path))["mom2"]
    except Exception as ex:  # a damaged entry is recomputed, never trusted
        log.warning("ignoring the damaged covariance cache entry %s (%s)", stem, ex)
        return None
    if moment.ndim != 2 or moment.shape[0] != moment.shape[1] or moment.shape[0] != meta.get("dim"):
        return None
    log.info("covariance of %s from the cache (%s tokens)", key["module"], meta.get("tokens"))
    return moment


def _write_cached(
    cache_dir: Path, key: dict[str, Any], moment: torch.Tensor, count: int, corpus: str
) -> None:
    from safetensors.torch import save_file

    from flearning.io.atomic import atomic_write, atomic_write_text

    stem = cache_dir / cache_key(key)
    try:
        atomic_write(
            stem.with_suffix(".safetensors"), lambda tmp: save_file({"mom2": moment.contiguous()}, str(tmp))
        )
        meta = {**key, "tokens": count, "dim": int(moment.shape[0]), "corpus": corpus}
        atomic_write_text(stem.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    except OSError as ex:  # the cache is an optimisation: a full disk costs a recomputation next time
        log.warning("could not cache the covariance of %s in %s: %s", key["module"], cache_dir, ex)


def _accumulate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    modules: Sequence[str],
    corpus: Corpus,
    settings: CovarianceSettings,
) -> tuple[dict[str, torch.Tensor], int]:
    """Σ k kᵀ / count over the corpus's first ``max_tokens`` tokens, for each module's input."""
    import torch

    from flearning.editing.requests import Encoded, pad_batch
    from flearning.editing.tracing import IN, capture, frozen, model_device
    from flearning.io.progress import progress_bar

    sequences: list[Encoded] = []
    total = 0
    for start in range(0, len(corpus.texts), 256):  # tokenise only what the budget needs
        chunk = list(corpus.texts[start : start + 256])
        encoded = tokenizer(chunk, add_special_tokens=True, truncation=True, max_length=settings.max_length)
        for ids in encoded["input_ids"]:
            if total < settings.max_tokens and ids:
                sequences.append(Encoded(ids=list(ids), lookup=0, request=0))
                total += len(ids)
        if total >= settings.max_tokens:
            break
    total = min(total, settings.max_tokens)
    device = model_device(model)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    bar = progress_bar(total=total, desc="covariance", unit="token", enabled=settings.progress)
    try:
        with frozen(model):
            for start in range(0, len(sequences), settings.batch_size):
                batch = pad_batch(tokenizer, sequences[start : start + settings.batch_size], device)
                captured = capture(model, batch, [(m, IN) for m in modules])
                mask = batch["attention_mask"].bool()
                take = min(int(mask.sum()), settings.max_tokens - count)
                for module in modules:
                    keys = captured[(module, IN)][mask][:take].to(torch.float64)  # row-major: texts in order
                    sums[module] = sums.get(module, 0) + keys.T @ keys
                count += take
                bar.update(take)
    finally:
        bar.close()
    dtype = getattr(torch, settings.dtype)
    return {m: (s / count).to(dtype).cpu() for m, s in sums.items()}, count
