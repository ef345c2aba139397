"""Evaluation: every metric of ``docs/DESIGN.md`` ("Metrics") for a model on knowledge records, batched,
with reports.

``flearning.evaluation.evaluate.evaluate`` scores θ* against the ``reference_predictions`` of θ (the
model before the update); ``write_report`` writes the files. Names are imported lazily:
``import flearning.evaluation`` (done by the CLI at start-up) must not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flearning.evaluation.definitions import METRIC_DEFINITIONS, METRIC_LABELS, METRICS

if TYPE_CHECKING:
    from flearning.evaluation.oracle import evaluate_oracle
    from flearning.evaluation.reference import ReferencePredictions, reference_predictions
    from flearning.evaluation.report import write_report
    from flearning.evaluation.results import EvalResult, aggregate
    from flearning.evaluation.text import compute_n_gram_entropy, exact_match, n_gram_entropy, normalize_text

__all__ = [
    "METRICS",
    "METRIC_DEFINITIONS",
    "METRIC_LABELS",
    "EvalResult",
    "ReferencePredictions",
    "aggregate",
    "compute_n_gram_entropy",
    "evaluate_oracle",
    "exact_match",
    "n_gram_entropy",
    "normalize_text",
    "reference_predictions",
    "write_report",
]

_LAZY = {
    "ReferencePredictions": "flearning.evaluation.reference",
    "reference_predictions": "flearning.evaluation.reference",
    "write_report": "flearning.evaluation.report",
    "EvalResult": "flearning.evaluation.results",
    "aggregate": "flearning.evaluation.results",
    "evaluate_oracle": "flearning.evaluation.oracle",
    "compute_n_gram_entropy": "flearning.evaluation.text",
    "exact_match": "flearning.evaluation.text",
    "n_gram_entropy": "flearning.evaluation.text",
    "normalize_text": "flearning.evaluation.text",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flearning.evaluation' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
