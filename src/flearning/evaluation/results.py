"""Evaluation results: per-record values, summaries (means and standard deviations x100) and their
aggregation over seeds.

No torch here: reports, tables and the bench's cache read results without loading a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flearning.evaluation.definitions import METRICS

# Metrics whose probes may come in categories (KnowEdit): their per-record values by category are
# ``<metric>_by_category`` in a record's row.
CATEGORY_METRICS: tuple[str, ...] = ("locality", "portability")


def sample_std(values: Sequence[float]) -> float | None:
    """Sample standard deviation (n - 1 in the denominator), None for fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    mean = math.fsum(values) / n
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def summarize_values(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean and sample std x100 of one metric's per-record values.

    Args:
        values: per-record values in [0, 1] (None already removed).
    Returns:
        ``{"mean": x100 or None, "std": x100 or None, "n": count}``.
    """
    n = len(values)
    mean = math.fsum(values) / n * 100 if n else None
    std = sample_std(values)
    return {"mean": mean, "std": std * 100 if std is not None else None, "n": n}


@dataclass
class EvalResult:
    """Per-record metric values of one model on one dataset (one seed).

    ``records`` holds one dict per record: ``id``, every metric of ``METRICS`` (a float in [0, 1], or
    None when the record has no such probe or the metric was not computed), and ``generated`` (the
    greedy continuation used for exact match, when computed). ``perplexity`` is the model's perplexity on
    held-out text (``perplexity.PerplexityResult.to_json()``), a property of the model, not of a record;
    None when it was not measured.
    """

    records: list[dict[str, Any]]
    seed: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    perplexity: dict[str, Any] | None = None

    def values(self, metric: str) -> list[float]:
        """The non-missing per-record values of ``metric``."""
        if metric not in METRICS:
            raise KeyError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
        return [r[metric] for r in self.records if r.get(metric) is not None]

    def summary(self) -> dict[str, dict[str, float | int | None]]:
        """Every metric: ``{"mean": x100, "std": x100 over records (sample std), "n": records}``.

        Metrics with no value (``n == 0``) have ``mean`` and ``std`` None.
        """
        return {m: summarize_values(self.values(m)) for m in METRICS}

    def category_values(self, metric: str) -> dict[str, list[float]]:
        """The per-record values of ``metric`` (Locality or Portability) within each category, in the
        order the categories are first seen; empty when no record has categories."""
        out: dict[str, list[float]] = {}
        for record in self.records:
            for name, value in (record.get(f"{metric}_by_category") or {}).items():
                if value is not None:
                    out.setdefault(name, []).append(value)
        return out

    def category_summary(self) -> dict[str, dict[str, dict[str, float | int | None]]]:
        """Locality and Portability by category, as ``summary`` gives a metric: ``{metric: {category:
        {"mean": x100, "std": x100, "n": records with that category}}}``; only metrics with categories.

        The mean of a category is the mean over records of the record's mean within it (EasyEdit's
        KnowEdit summary); a metric's overall value stays the mean over records of the record's mean
        over its categories.
        """
        out = {}
        for metric in CATEGORY_METRICS:
            values = self.category_values(metric)
            if values:
                out[metric] = {name: summarize_values(v) for name, v in values.items()}
        return out


def _pooled(per_seed: Sequence[dict[str, float | int | None]]) -> dict[str, Any]:
    """One metric over seeds from its per-seed summaries (``aggregate``'s fields)."""
    present = [s for s in per_seed if s["n"]]
    means = [s["mean"] for s in present]
    stds = [s["std"] for s in present if s["std"] is not None]
    return {
        "mean": math.fsum(means) / len(means) if means else None,
        "std": math.fsum(stds) / len(stds) if stds else None,
        "std_seeds": sample_std(means),
        "n": sum(s["n"] for s in per_seed),
        "n_seeds": len(present),
        "seed_means": means,
    }


def aggregate(results: Sequence[EvalResult]) -> dict[str, dict[str, Any]]:
    """Summary of several results of one method (one per seed).

    For each metric: ``mean`` = mean of the per-seed means (x100); ``std`` = mean over seeds of the
    per-seed std over records (x100); ``std_seeds`` = sample std of the per-seed means (x100; None for
    one seed); ``n`` = number of per-record values pooled over seeds; ``n_seeds`` = seeds with a value;
    ``seed_means`` = the per-seed means (x100).

    Args:
        results: one ``EvalResult`` per seed.
    Returns:
        ``{metric: {...}}`` for every metric of ``METRICS``.
    """
    if not results:
        raise ValueError("aggregate() needs at least one result")
    summaries = [r.summary() for r in results]
    return {metric: _pooled([s[metric] for s in summaries]) for metric in METRICS}


def aggregate_perplexity(results: Sequence[EvalResult]) -> dict[str, Any] | None:
    """Perplexity over seeds: ``mean`` of the per-seed perplexities, ``std_seeds`` (None for one seed),
    ``n_seeds``, ``seed_values``, and what it was measured on (corpus, passages, tokens, max_tokens of the
    first seed); None when no result has one."""
    measured = [r.perplexity for r in results if r.perplexity is not None]
    if not measured:
        return None
    values = [m["perplexity"] for m in measured]
    first = measured[0]
    return {
        "mean": math.fsum(values) / len(values),
        "std_seeds": sample_std(values),
        "n_seeds": len(values),
        "seed_values": values,
        **{k: first.get(k) for k in ("corpus", "passages", "tokens", "max_tokens")},
    }


def perplexity_change(before: EvalResult | None, after: EvalResult | None) -> dict[str, Any] | None:
    """General ability before and after an update (``run.json``'s ``perplexity``): both perplexities, the
    change, what they were measured on and how long each took; None when neither was measured."""
    measured = [r.perplexity for r in (before, after) if r is not None and r.perplexity is not None]
    if not measured:
        return None
    b = before.perplexity if before is not None else None
    a = after.perplexity if after is not None else None
    first = measured[0]
    return {
        **{k: first.get(k) for k in ("corpus", "passages", "tokens", "max_tokens", "truncated")},
        "before": b["perplexity"] if b else None,
        "after": a["perplexity"] if a else None,
        "change": a["perplexity"] - b["perplexity"] if a and b else None,
        "seconds": {"before": b["seconds"] if b else None, "after": a["seconds"] if a else None},
    }


def aggregate_categories(results: Sequence[EvalResult]) -> dict[str, dict[str, dict[str, Any]]]:
    """Locality and Portability by category over seeds, with ``aggregate``'s fields: ``{metric: {category:
    {...}}}``, only for metrics with categories (empty for data without them)."""
    if not results:
        raise ValueError("aggregate_categories() needs at least one result")
    empty = summarize_values([])
    summaries = [r.category_summary() for r in results]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for metric in CATEGORY_METRICS:
        names = list(dict.fromkeys(name for s in summaries for name in s.get(metric, {})))
        if names:
            out[metric] = {
                name: _pooled([s.get(metric, {}).get(name, empty) for s in summaries]) for name in names
            }
    return out
