"""f-learning: update the factual knowledge of causal LMs by forgetting before learning.

Nothing heavy is imported here: ``import flearning`` must stay cheap so that the CLI starts fast.
The public API is re-exported lazily.
"""

from __future__ import annotations

from flearning._version import __version__

__all__ = ["__version__", "update", "evaluate", "KnowledgeVector", "load_records"]


def __getattr__(name: str):
    if name == "update":
        from flearning.recipes.update import update

        return update
    if name == "evaluate":
        from flearning.evaluation.evaluate import evaluate

        return evaluate
    if name == "KnowledgeVector":
        from flearning.vectors import KnowledgeVector

        return KnowledgeVector
    if name == "load_records":
        from flearning.data import load_records

        return load_records
    raise AttributeError(f"module 'flearning' has no attribute {name!r}")
