"""What ``flearn bench`` reports: the paper's table, the paired comparisons with the baselines, and
``summary.json`` / ``table.md`` (``write_summary``).

Functions of the bench's config and finished runs (``RunRecord``s); ``Bench`` calls ``write_summary``
in the staging directory that replaces its reports at once.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flearning.methods import METHODS
from flearning.recipes.bench_cache import RunRecord

if TYPE_CHECKING:
    from flearning.config import BenchConfig

PRIMED = "primed (θ)"  # the label of the primed model's own evaluation
PAPER_METRICS = ("reliability", "generality", "locality")
# F-Learning method -> the baselines it is compared with (paired, same records and seeds). LoRA
# forgetting + full-FT learning against both plain fine-tuning (the paper's Table 1 reading, the effect
# map of issue #11) and full-FT forgetting (which subtraction is better).
COMPARISONS: dict[str, tuple[str, ...]] = {
    "flearning-ft": ("ft",),
    "flearning-lora": ("lora",),
    "flearning-lora-ft": ("ft", "flearning-ft"),
    "flearning-memit": ("memit",),
    "flearning-alphaedit": ("alphaedit",),
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
    """F-Learning vs its baseline on the same records and seeds, for Reliability, Generality and Locality
    (×100), with two intervals:

    - records as the unit: the mean per-record difference pooled over seeds (``diff``, ``n``) and its
      normal-approximation 95 % interval (``ci95``);
    - the seed as the unit (issue #11): the mean difference over each seed's records (``seed_diffs``),
      their mean (``seed_diff``) and its Student-t 95 % interval over seeds with n_seeds − 1 degrees of
      freedom (``seed_ci95``, ``seed_dof``). With one seed there is no such interval (None, and
      ``seed_note`` says so): the records of one seed share one training run, so they are not
      independent evidence about the method.
    """
    index: dict[tuple[str, float | None], dict[tuple[int, str], dict]] = {}
    for r in runs:
        index.setdefault((r.method, r.lam), {}).update({(r.seed, str(row["id"])): row for row in r.records})
    out = []
    for (method, lam), rows in index.items():
        base_keys = [k for base in COMPARISONS.get(method, ()) for k in index if k[0] == base]
        for base_key in base_keys:
            base_rows = index[base_key]
            for metric in PAPER_METRICS:
                paired = [
                    (k[0], rows[k][metric] - base_rows[k][metric])
                    for k in rows
                    if k in base_rows
                    and rows[k].get(metric) is not None
                    and base_rows[k].get(metric) is not None
                ]
                diffs = [d for _, d in paired]
                if len(diffs) < 2:
                    continue
                mean = sum(diffs) / len(diffs)
                sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
                half = 1.96 * sd / math.sqrt(len(diffs))
                out.append(
                    {
                        "method": method,
                        "lambda": lam,
                        "baseline": base_key[0],
                        "baseline_lambda": base_key[1],
                        "metric": metric,
                        "n": len(diffs),
                        "diff": 100 * mean,
                        "ci95": [100 * (mean - half), 100 * (mean + half)],
                        **seed_level(paired),
                    }
                )
    return out


def seed_level(paired: Sequence[tuple[int, float]]) -> dict[str, Any]:
    """The seed as the unit of a paired comparison: ``(seed, per-record difference)`` pairs → each seed's
    mean difference (×100, by seed), their mean and the Student-t 95 % interval over seeds."""
    from flearning.evaluation.statistics import t_interval

    by_seed: dict[int, list[float]] = {}
    for seed, diff in paired:
        by_seed.setdefault(seed, []).append(diff)
    seeds = sorted(by_seed)
    means = [100 * math.fsum(by_seed[s]) / len(by_seed[s]) for s in seeds]
    entry: dict[str, Any] = {
        "n_seeds": len(seeds),
        "seed_diffs": dict(zip((str(s) for s in seeds), means, strict=True)),
        "seed_diff": math.fsum(means) / len(means),
        "seed_ci95": None,
        "seed_dof": len(seeds) - 1,
    }
    if len(seeds) < 2:
        entry["seed_note"] = "one seed: no interval over seeds (the seed is the unit; run more seeds)"
        return entry
    _, low, high = t_interval(means)
    entry["seed_ci95"] = [low, high]
    return entry


def settings_line(template: str, zsre_old: str | None) -> str:
    """How a dataset's prompts and old answers were read, under its table (issue #11)."""
    old = {"answers": "answers[0]", "pred": "pred"}.get(zsre_old or "")
    return f"Prompt template: {template}" + (f"; ZsRE old answers from {old}" if old else "") + "."


def paired_table(dataset: str, paired: Sequence[dict[str, Any]]) -> str:
    """The paired comparisons as a markdown table: the difference with the records as the unit (normal
    95 % interval) and with the seed as the unit (Student-t 95 % interval over seeds)."""

    def lam(value: float | None) -> str:
        return "" if value is None else f" (λ={value:g})"

    def interval(ci: Sequence[float] | None) -> str:
        return "–" if ci is None else f"[{ci[0]:+.1f}, {ci[1]:+.1f}]"

    lines = [
        f"**{dataset}: paired differences ×100** (F-Learning − baseline, same records and seeds)",
        "",
        "| comparison | metric | records | diff | 95 % CI (records) | seeds | diff (seed means) | 95 % t-CI (seeds) |",
        "|---|---|---:|---:|---|---:|---:|---|",
    ]
    for p in paired:
        seeds = p.get("n_seeds")
        seed_ci = interval(p.get("seed_ci95")) if seeds is None or seeds > 1 else "one seed: none"
        seed_diff = "–" if p.get("seed_diff") is None else f"{p['seed_diff']:+.1f}"
        lines.append(
            f"| {p['method']}{lam(p['lambda'])} vs {p['baseline']}{lam(p['baseline_lambda'])} | {p['metric']} "
            f"| {p['n']} | {p['diff']:+.1f} | {interval(p['ci95'])} | {seeds if seeds is not None else '–'} "
            f"| {seed_diff} | {seed_ci} |"
        )
    return "\n".join(lines)


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


def write_summary(
    staging: Path,
    cfg: BenchConfig,
    runs: Sequence[RunRecord],
    datasets: Sequence[str],
    *,
    wall: float,
    machine: dict[str, Any],
    base_fingerprint: str,
    counters: dict[str, int],
    old_fields: Mapping[str, str | None],
    primes: Mapping[str, list[dict[str, Any]]],
    chosen_lambda: Mapping[str, Any],
) -> dict[str, Any]:
    """Write each dataset's report (``dataset_report``), ``summary.json`` and ``table.md`` into
    ``staging``; return the summary. ``machine`` is where the bench ran (each run record and
    ``prime.json`` name their own: a resumed bench's runs may come from other machines)."""
    summary: dict[str, Any] = {
        "config": portable_config(cfg.model_dump(mode="json")),
        "wall_seconds": round(wall, 1),
        "machine": machine,
        "base_fingerprint": base_fingerprint,
        "counters": counters,
        "stages": stage_settings(cfg),
        "datasets": {},
    }
    tables = []
    for dataset in datasets:
        evaluated = [r for r in runs if r.dataset == dataset and r.split == "eval"]
        report = dataset_report(staging / dataset, dataset, evaluated)
        summary["datasets"][dataset] = {
            "n": cfg.n,
            "seeds": cfg.seeds,
            "template": cfg.template,
            "zsre_old": old_fields.get(dataset),
            "prime": primes.get(dataset, []),
            "chosen_lambda": chosen_lambda.get(dataset),
            **report,
        }
        tables.append(paper_table(dataset, report["methods"], report.get("perplexity")))
        tables.append(settings_line(cfg.template, old_fields.get(dataset)))
        if report["paired"]:
            tables.append(paired_table(dataset, report["paired"]))
    summary["table_markdown"] = "\n\n".join(tables)
    (staging / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (staging / "table.md").write_text(summary["table_markdown"] + "\n")
    return summary


def stage_settings(cfg: BenchConfig) -> dict[str, Any]:
    """Every stage's resolved settings (the defaults filled in): priming, and each method's forget and
    learning stages, with the λ it runs at per dataset; what the bench's config leaves implicit."""
    methods: dict[str, Any] = {}
    for name in cfg.methods:
        method = METHODS[name]
        plan = cfg.stage_plan(method, 0)
        methods[name] = {"forget": _stage_json(plan.forget), "learn": _stage_json(plan.learn)}
        if method.forget is not None:
            methods[name]["lambda"] = (
                "auto" if cfg.lambdas == "auto" else {d: cfg.method_lambdas(d, name) for d in cfg.data}
            )
    prime = _stage_json(cfg.prime.train_config(0, cfg.template))
    return {"prime": dict(prime, threshold=cfg.prime.threshold), "methods": methods}


def _stage_json(stage: Any) -> dict[str, Any] | None:
    """A stage's resolved settings as the run record states them (the seed varies by run: left out)."""
    if stage is None:
        return None
    return {k: v for k, v in stage.model_dump(mode="json").items() if k != "seed"}


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration as recorded in ``summary.json``: its file paths relative to the current
    directory (the repository, for the shipped results), so results carry no machine's absolute paths."""
    config = dict(config)
    config["data"] = {
        name: [os.path.relpath(p) for p in path] if isinstance(path, list) else os.path.relpath(path)
        for name, path in config["data"].items()
    }
    for key in ("data_root", "out", "logging_dir"):
        if config.get(key):
            config[key] = os.path.relpath(config[key])
    return config
