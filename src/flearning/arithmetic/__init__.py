"""Knowledge vectors: Δ = FT(θ, K) − θ, their algebra, and applying them (θ ± λ·Δ).

Exports are loaded lazily: ``flearn --help`` imports this package (through ``arithmetic.cli``) and must
not pay for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flearning.arithmetic.ops import VectorError
    from flearning.arithmetic.vector import KnowledgeVector, VectorMetadata, VectorStats, forget

__all__ = ["KnowledgeVector", "VectorError", "VectorMetadata", "VectorStats", "forget"]


def __getattr__(name: str):
    if name in ("KnowledgeVector", "VectorMetadata", "VectorStats", "forget"):
        from flearning.arithmetic import vector

        return getattr(vector, name)
    if name == "VectorError":
        from flearning.arithmetic.ops import VectorError

        return VectorError
    raise AttributeError(f"module 'flearning.arithmetic' has no attribute {name!r}")
