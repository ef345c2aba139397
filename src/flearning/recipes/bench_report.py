"""What ``flearn bench`` reports: the paper's table and the paired comparisons with the baselines.

Pure functions of the finished runs (``RunRecord``s); ``Bench`` writes their output beside the
per-dataset evaluation reports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flearning.recipes.bench_cache import RunRecord

PRIMED = "primed (θ)"  # the label of the primed model's own evaluation
PAPER_METRICS = ("reliability", "generality", "locality")
# F-Learning method -> the baseline it is compared with (paired, same records and seeds).
COMPARISONS = {
    "flearning-ft": "ft",
    "flearning-lora": "lora",
    "flearning-lora-ft": "flearning-ft",
    "flearning-memit": "memit",
    "flearning-alphaedit": "alphaedit",
}


def dataset_report(directory: Path, dataset: str, runs: Sequence[RunRecord]) -> dict[str, Any]:
    """Write one dataset's evaluation report (tables, plots, a λ sweep when a method ran at several λ)
    into ``directory``; returns its ``methods`` (aggregated metrics by label), ``perplexity`` (by label,
    when measured: general ability on held-out text) and ``paired`` comparisons."""
    from flearning.evaluation import aggregate, write_report
    from flearning.evaluation.results import aggregate_perplexity

    by_label: dict[str, list] = {}
    sweep: dict[str, dict[float, list]] = {}
    for r in runs:
        by_label.setdefault(label(r), []).append(r.result())
        if r.lam is not None:
            sweep.setdefault(r.method, {}).setdefault(r.lam, []).append(r.result())
    multi_lambda = {m: v for m, v in sweep.items() if len(v) > 1}
    write_report(
        by_label,
        directory,
        title=f"flearn bench: {dataset}",
        sweep=multi_lambda or None,
        # ft, lora, ft-c as reference lines (θ itself would squash the axes)
        sweep_baselines=sorted({label(r) for r in runs if r.lam is None and r.method != PRIMED}),
    )
    methods = {name: aggregate(results) for name, results in by_label.items()}
    perplexity = {name: aggregate_perplexity(results) for name, results in by_label.items()}
    perplexity = {name: entry for name, entry in perplexity.items() if entry is not None}
    return {
        "methods": methods,
        **({"perplexity": perplexity} if perplexity else {}),
        "paired": paired_comparisons(runs),
    }


def label(run: RunRecord) -> str:
    return run.method if run.lam is None else f"{run.method} (λ={run.lam:g})"


def paired_comparisons(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """F-Learning vs its baseline on the same records and seeds: mean per-record difference ×100 and a
    normal-approximation 95 % confidence interval, for Reliability, Generality and Locality."""
    index: dict[tuple[str, float | None], dict[tuple[int, str], dict]] = {}
    for r in runs:
        index.setdefault((r.method, r.lam), {}).update({(r.seed, str(row["id"])): row for row in r.records})
    out = []
    for (method, lam), rows in index.items():
        base_name = COMPARISONS.get(method)
        base_keys = [k for k in index if k[0] == base_name]
        for base_key in base_keys:
            base_rows = index[base_key]
            for metric in PAPER_METRICS:
                diffs = [
                    rows[k][metric] - base_rows[k][metric]
                    for k in rows
                    if k in base_rows
                    and rows[k].get(metric) is not None
                    and base_rows[k].get(metric) is not None
                ]
                if len(diffs) < 2:
                    continue
                mean = sum(diffs) / len(diffs)
                sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
                half = 1.96 * sd / math.sqrt(len(diffs))
                out.append(
                    {
                        "method": method,
                        "lambda": lam,
                        "baseline": base_name,
                        "baseline_lambda": base_key[1],
                        "metric": metric,
                        "n": len(diffs),
                        "diff": 100 * mean,
                        "ci95": [100 * (mean - half), 100 * (mean + half)],
                    }
                )
    return out


def paper_table(
    dataset: str, methods: dict[str, dict[str, Any]], perplexity: dict[str, dict[str, Any]] | None = None
) -> str:
    """Methods × (Reliability, Generality, Locality) and the extra metrics, mean ± std over seeds."""
    cols = [
        "reliability",
        "generality",
        "locality",
        "old_retention",
        "efficacy",
        "paraphrase",
        "gen_exact_match",
    ]
    names = ["Reliability", "Generality", "Locality", "Old retention", "Efficacy", "Paraphrase", "Gen. EM"]
    if perplexity:  # general ability: perplexity on held-out text, lower is better (not ×100)
        names.append("Perplexity ↓")
    lines = [f"**{dataset}**", "", "| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for method, metrics in methods.items():
        cells = []
        for c in cols:
            m = metrics.get(c) or {}
            if m.get("mean") is None:
                cells.append("–")
                continue
            spread = m.get("std_seeds")
            cells.append(f"{m['mean']:.1f}" + (f" ± {spread:.1f}" if spread is not None else ""))
        if perplexity:
            p = perplexity.get(method)
            spread = p.get("std_seeds") if p else None
            cell = "–" if not p else f"{p['mean']:.2f}"
            cells.append(cell + (f" ± {spread:.2f}" if spread is not None else ""))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
