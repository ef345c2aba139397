"""Knowledge vectors: Δ = FT(θ, K) − θ, their algebra, and applying them (θ ± λ·Δ).

In memory: ``KnowledgeVector`` (its provenance: ``Provenance``). For checkpoints bigger than RAM
(safetensors, one file or sharded): ``stream_difference``, ``stream_lora_vector``, ``stream_apply`` and
``checkpoint_fingerprint`` from ``vectors.streaming``.

Exports are loaded lazily: ``flearn --help`` imports this package (through ``cli.vector``) and must
not pay for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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

_LAZY = {
    "KnowledgeVector": "flearning.vectors.vector",
    "VectorStats": "flearning.vectors.vector",
    "forget": "flearning.vectors.vector",
    "Provenance": "flearning.vectors.metadata",
    "VectorMetadata": "flearning.vectors.metadata",
    "VectorError": "flearning.vectors.ops",
    "StreamResult": "flearning.vectors.streaming",
    "checkpoint_fingerprint": "flearning.vectors.streaming",
    "stream_apply": "flearning.vectors.streaming",
    "stream_difference": "flearning.vectors.streaming",
    "stream_lora_vector": "flearning.vectors.streaming",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flearning.vectors' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
