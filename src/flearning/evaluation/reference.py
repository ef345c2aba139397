"""Reference-model predictions for Locality, computed once per (model fingerprint, records hash).

Locality compares the evaluated model's argmax tokens at locality answer positions with those of the
model before the update. These reference argmaxes depend only on the reference weights and on the
locality probes, so they are cached in memory and, optionally, on disk as JSON (never pickle).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flearning.data.templates import PLAIN
from flearning.errors import FlearnError
from flearning.evaluation.definitions import DEFAULT_BATCH_SIZE
from flearning.evaluation.probes import pad_token_id, probe_key, probes_hash, record_probes, unique_probes
from flearning.evaluation.scoring import Probe, score_probes
from flearning.io.atomic import atomic_write_text

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from flearning.data.records import KnowledgeRecord

log = logging.getLogger(__name__)

FORMAT = "flearning.reference-predictions"
VERSION = 1
_MEMORY_ENTRIES = 16
_memory: OrderedDict[tuple[str, str], ReferencePredictions] = OrderedDict()


@dataclass(frozen=True)
class ReferencePredictions:
    """Argmax token ids of the reference model at the answer positions of every locality probe."""

    model_fingerprint: str
    records_hash: str
    predictions: dict[str, tuple[int, ...]]  # probe_key(probe) -> argmax ids

    def lookup(self, probe: Probe) -> tuple[int, ...] | None:
        """The reference argmaxes of a locality probe, or None if it was not computed."""
        return self.predictions.get(probe_key(probe))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model_fingerprint": self.model_fingerprint,
            "records_hash": self.records_hash,
            "predictions": {k: list(v) for k, v in sorted(self.predictions.items())},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReferencePredictions:
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} v{VERSION} document")
        preds = {str(k): tuple(int(t) for t in v) for k, v in data["predictions"].items()}
        return cls(str(data["model_fingerprint"]), str(data["records_hash"]), preds)

    def save(self, path: Path) -> None:
        """Write as JSON, atomically (``io.atomic.atomic_write_text``)."""
        atomic_write_text(Path(path), json.dumps(self.to_json(), separators=(",", ":")))

    @classmethod
    def load(cls, path: Path) -> ReferencePredictions:
        with open(path) as fh:
            return cls.from_json(json.load(fh))


def locality_probes(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[KnowledgeRecord], template: str = PLAIN
) -> list[Probe]:
    """The distinct locality probes of ``records`` under ``template``, in first-seen order."""
    probes, _ = unique_probes(record_probes(tokenizer, r, template).locality for r in records)
    return probes


def cache_file(cache_dir: Path, fingerprint: str, records_hash: str) -> Path:
    return Path(cache_dir) / f"reference-{fingerprint}-{records_hash[:32]}.json"


def clear_memory_cache() -> None:
    """Forget the in-memory reference predictions (tests, benchmarks)."""
    _memory.clear()


def _remember(key: tuple[str, str], value: ReferencePredictions) -> None:
    _memory[key] = value
    _memory.move_to_end(key)
    while len(_memory) > _MEMORY_ENTRIES:
        _memory.popitem(last=False)


def reference_predictions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[KnowledgeRecord],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    pack: bool = True,
    cache_dir: Path | str | None = None,
    use_cache: bool = True,
    progress: bool = False,
    template: str = PLAIN,
) -> ReferencePredictions:
    """Argmax predictions of ``model`` (the model before the update) on every locality probe.

    Args:
        model: the reference model θ.
        tokenizer: its tokenizer (the evaluated model must share it).
        records: the records whose locality pairs will be evaluated.
        batch_size: rows per forward pass.
        pack: share rows between probes with the same prompt (see ``scoring``).
        cache_dir: also cache on disk here (JSON); None for memory only.
        use_cache: look up / store the caches at all (False always recomputes).
        progress: show a progress bar.
        template: the prompt template of the probes (``data.templates``); the predictions are keyed by
            the probes' tokens, so another template's are other entries.
    Returns:
        ``ReferencePredictions`` keyed by probe.
    """
    from flearning.models import model_fingerprint

    probes = locality_probes(tokenizer, records, template)
    rhash = probes_hash(probes)
    fingerprint = model_fingerprint(model)
    key = (fingerprint, rhash)
    if use_cache and key in _memory:
        _memory.move_to_end(key)
        return _memory[key]
    path = cache_file(Path(cache_dir), fingerprint, rhash) if cache_dir is not None else None
    if use_cache and path is not None and path.is_file():
        try:
            cached = ReferencePredictions.load(path)
        except (OSError, ValueError, KeyError, TypeError) as ex:
            log.warning("ignoring unreadable reference cache %s: %s", path, ex)
        else:
            if (cached.model_fingerprint, cached.records_hash) == key:
                _remember(key, cached)
                return cached
    result = ReferencePredictions(fingerprint, rhash, {})
    if probes:
        was_training = model.training
        model.eval()
        try:
            pad_id = pad_token_id(tokenizer)
            scores = score_probes(
                model,
                probes,
                pad_id=pad_id,
                batch_size=batch_size,
                pack=pack,
                progress=progress,
                desc="reference",
            )
        finally:
            model.train(was_training)
        result = ReferencePredictions(
            fingerprint, rhash, {probe_key(p): s.argmax for p, s in zip(probes, scores, strict=True)}
        )
    if use_cache:
        _remember(key, result)
        if path is not None:
            result.save(path)
    return result


def require_prediction(reference: ReferencePredictions, probe: Probe) -> tuple[int, ...]:
    """The reference argmaxes of ``probe``, or a clear error when the reference was made for other data."""
    found = reference.lookup(probe)
    if found is None:
        raise FlearnError(
            "the reference predictions do not cover this dataset's locality prompts (they were computed "
            "for other records or with another tokenizer); recompute them with reference_predictions()"
        )
    if len(found) != len(probe.target_ids):
        raise FlearnError("the reference predictions do not match the locality answers' token counts")
    return found
