"""Evaluation: Reliability, Generality, Locality, Portability, Old retention, Efficacy, Paraphrase score,
Generation exact match and Fluency (DESIGN.md §2), batched, with reports.

Typical use::

    from flearning.evaluation import evaluate, reference_predictions, write_report

    ref = reference_predictions(theta, tokenizer, records)          # the model before the update
    result = evaluate(theta_star, tokenizer, records, reference=ref)
    result.summary()["reliability"]  # {"mean": x100, "std": x100, "n": records}
    write_report({"flearning-ft": [result]}, "out/report")

Names are imported lazily: ``import flearning.evaluation`` (done by the CLI at start-up) must not
import torch.
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
