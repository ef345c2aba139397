"""What a knowledge vector records about where it comes from.

``Provenance`` is what a caller knows when making a vector (base model, method, data, settings): one
argument of every constructor, in memory (``KnowledgeVector.from_*``) or streamed
(``stream_difference``, ``stream_lora_vector``). ``VectorMetadata`` is the validated record stored in
``vector.json``: the provenance plus what the construction found (kind, fingerprint, zero deltas).
A model changed by a vector records what was applied in ``flearn_vector_applied.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from flearning.errors import format_names
from flearning.vectors.ops import VectorError

Kind = Literal["full", "lora", "mixed"]

PROVENANCE_FILE = "flearn_vector_applied.json"

ALL_ZERO = (
    "every delta is zero: the fine-tuned weights equal the base weights (same model twice, or a "
    "fine-tuning that changed nothing)"
)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _version() -> str:
    from flearning._version import __version__

    return __version__


class VectorMetadata(BaseModel):
    """Where a knowledge vector comes from; stored in ``vector.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind = Field(description="full: difference of two models; lora: B·A·scaling of an adapter")
    base_model: str | None = Field(None, description="id or path of the base model θ")
    base_fingerprint: str | None = Field(None, description="flearning.models.model_fingerprint(θ)")
    method: str | None = Field(None, description="how the fine-tuned side was made, e.g. 'ft' or 'lora'")
    data_hash: str | None = Field(None, description="hash of the training data (K_old)")
    hyperparameters: dict[str, JsonValue] = Field(default_factory=dict)
    dropped_zero: list[str] = Field(default_factory=list, description="parameters left out: Δ was 0")
    history: list[str] = Field(default_factory=list, description="algebra applied after creation")
    created: str = Field(default_factory=now)
    flearning_version: str = Field(default_factory=_version)


@dataclasses.dataclass(frozen=True)
class Provenance:
    """What the caller records about a new vector. Unset fields get each constructor's default: the
    base model's name or path, its fingerprint (checked by ``apply_to``), the method ("ft" for two
    models, "lora" for an adapter).

    Attributes:
        base_model: id or path of θ.
        base_fingerprint: ``model_fingerprint(θ)``.
        method: how the fine-tuned side was made.
        data_hash: hash of the fine-tuning data.
        hyperparameters: fine-tuning settings (JSON values).
    """

    base_model: str | None = None
    base_fingerprint: str | None = None
    method: str | None = None
    data_hash: str | None = None
    hyperparameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def with_defaults(self, **defaults: Any) -> Provenance:
        """A copy with each field that is unset (None) taken from ``defaults`` (a value or a callable)."""
        updates = {}
        for name, default in defaults.items():
            if getattr(self, name) is None:
                updates[name] = default() if callable(default) else default
        return dataclasses.replace(self, **updates)


def build_metadata(
    provenance: Provenance | None,
    *,
    kind: Kind,
    dropped_zero: list[str],
    hyperparameters: Mapping[str, Any] | None = None,
) -> VectorMetadata:
    """The record of a new vector (``VectorError`` for values that are not JSON, e.g. in hyperparameters).

    ``hyperparameters`` replaces the provenance's (a constructor that adds its own settings passes both).
    """
    provenance = provenance or Provenance()
    try:
        return VectorMetadata(
            kind=kind,
            base_model=provenance.base_model,
            base_fingerprint=provenance.base_fingerprint,
            method=provenance.method,
            data_hash=provenance.data_hash,
            hyperparameters=dict(provenance.hyperparameters if hyperparameters is None else hyperparameters),
            dropped_zero=dropped_zero,
        )
    except ValidationError as ex:
        raise VectorError(f"invalid vector metadata: {ex}") from ex


def parse_metadata(path: str | os.PathLike, record: Any) -> VectorMetadata:
    """The ``metadata`` of a ``vector.json`` read from ``path``, validated."""
    try:
        return VectorMetadata.model_validate(record)
    except ValidationError as ex:
        raise VectorError(f"{path}: invalid metadata in vector.json:" + format_names([str(ex)])) from ex


def write_applied_record(
    directory: Path, model: str, source: Mapping[str, Any], lam: float, *, streamed: bool = False
) -> None:
    """Write ``PROVENANCE_FILE`` into a changed model's directory: the input model, what was applied
    (``source``: the vector and its metadata, or the adapter), λ and the operation."""
    record = {"model": model, **source, "lambda": lam, "operation": "theta + lambda * delta"}
    if streamed:
        record["streamed"] = True
    (Path(directory) / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
