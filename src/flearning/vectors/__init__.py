"""Knowledge vectors: Δ = FT(θ, K) − θ, their algebra, and applying them (θ ± λ·Δ).

In memory: ``KnowledgeVector`` (its provenance: ``Provenance``). For checkpoints bigger than RAM
(safetensors, one file or sharded): ``stream_difference``, ``stream_lora_vector``, ``stream_apply`` and
``checkpoint_fingerprint`` from ``vectors.streaming``.

Exports are loaded lazily: ``flearn --help`` imports this package (through ``cli.vector``) and must
not pay for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flearning.vectors.metadata import Provenance, VectorMetadata
    from flearning.vectors.ops import VectorError
    from flearning.vectors.streaming import (
        StreamResult,
        checkpoint_fingerprint,
        stream_apply,
        stream_difference,
        stream_lora_vector,
    )
    from flearning.vectors.vector import KnowledgeVector, VectorStats, forget

_VECTOR = ("KnowledgeVector", "VectorStats", "forget")
_METADATA = ("Provenance", "VectorMetadata")
_STREAMING = (
    "StreamResult",
    "checkpoint_fingerprint",
    "stream_apply",
    "stream_difference",
    "stream_lora_vector",
)

__all__ = [
    "KnowledgeVector",
    "Provenance",
    "StreamResult",
    "VectorError",
    "VectorMetadata",
    "VectorStats",
    "checkpoint_fingerprint",
    "forget",
    "stream_apply",
    "stream_difference",
    "stream_lora_vector",
]


def __getattr__(name: str):
    if name in _VECTOR:
        from flearning.vectors import vector

        return getattr(vector, name)
    if name in _METADATA:
        from flearning.vectors import metadata

        return getattr(metadata, name)
    if name in _STREAMING:
        from flearning.vectors import streaming

        return getattr(streaming, name)
    if name == "VectorError":
        from flearning.vectors.ops import VectorError

        return VectorError
    raise AttributeError(f"module 'flearning.vectors' has no attribute {name!r}")
