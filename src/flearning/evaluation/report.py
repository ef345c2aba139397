"""Evaluation reports: ``records.jsonl`` (one line per method, seed and record), ``summary.json``,
``summary.md`` and ``summary.csv`` (methods x metrics, with the exact definitions), ``metrics.png`` and,
for a λ sweep, ``sweep.json``/``sweep.png``.

The files are written into a temporary directory inside ``out_dir`` and swapped in together, so the
directory holds the previous report or the new one, never a mix; the directory itself (a symlink, a
mount point, its owner and mode) and its other files stay.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flearning.evaluation.definitions import (
    ENTROPY_METRICS,
    METRIC_DEFINITIONS,
    METRIC_LABELS,
    METRICS,
    PERCENT_METRICS,
    PERPLEXITY_DEFINITION,
)
from flearning.evaluation.results import EvalResult, aggregate, aggregate_categories, aggregate_perplexity
from flearning.io.atomic import atomic_entries

REPORT_FILES = (
    "records.jsonl",
    "summary.json",
    "summary.md",
    "summary.csv",
    "metrics.png",
    "sweep.json",
    "sweep.png",
)

SweepData = Mapping[str, Mapping[float, "EvalResult | Sequence[EvalResult]"]]

PERPLEXITY = "perplexity"  # the plots' key for a method's perplexity (not a per-record metric)
PERPLEXITY_LABEL = "Perplexity (held-out text, lower is better)"

STD_NOTE = (
    "Values are means x100 ± standard deviation x100: the sample standard deviation over seeds when a "
    "method has several seeds, otherwise over records. n counts the per-record values (pooled over seeds); "
    "records without the probe a metric needs (no rephrase, no portability question, no locality pair or "
    "no reference model) are excluded. The two Fluency rows are n-gram entropies in bits x100, not percentages: "
    "greedy (this project's) and top-5 sampled (ROME/EasyEdit's, the one to compare with published numbers)."
)


# ---------------------------------------------------------------------------------------------- tables


def display_std(entry: Mapping[str, Any]) -> float | None:
    """The std shown in tables: over seeds when there are several, else over records."""
    if entry.get("n_seeds", 1) > 1 and entry.get("std_seeds") is not None:
        return entry["std_seeds"]
    return entry.get("std")


def format_cell(entry: Mapping[str, Any], digits: int = 1) -> str:
    """``"mean ± std"`` (x100 values), ``"mean"`` without a std, ``"–"`` without values."""
    mean = entry.get("mean")
    if mean is None:
        return "–"
    std = display_std(entry)
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def present_metrics(summaries: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
    """Metrics (in ``METRICS`` order) that have a value for at least one method."""
    return [m for m in METRICS if any(s[m]["n"] for s in summaries.values())]


def markdown_table(summaries: Mapping[str, Mapping[str, Mapping[str, Any]]], metrics: Sequence[str]) -> str:
    """Methods x metrics Markdown table of ``format_cell`` values."""
    header = "| method | " + " | ".join(METRIC_LABELS[m] for m in metrics) + " |"
    rule = "|---|" + "---:|" * len(metrics)
    rows = [
        f"| {name} | " + " | ".join(format_cell(s[m]) for m in metrics) + " |"
        for name, s in summaries.items()
    ]
    return "\n".join([header, rule, *rows])


def markdown_counts(summaries: Mapping[str, Mapping[str, Mapping[str, Any]]], metrics: Sequence[str]) -> str:
    """Methods x metrics table of ``n`` (and seeds)."""
    header = "| method | seeds | " + " | ".join(METRIC_LABELS[m] for m in metrics) + " |"
    rule = "|---|---:|" + "---:|" * len(metrics)
    rows = []
    for name, s in summaries.items():
        seeds = max((s[m]["n_seeds"] for m in metrics), default=0)
        rows.append(f"| {name} | {seeds} | " + " | ".join(str(s[m]["n"]) for m in metrics) + " |")
    return "\n".join([header, rule, *rows])


def csv_table(summaries: Mapping[str, Mapping[str, Mapping[str, Any]]], metrics: Sequence[str]) -> str:
    """Methods x metrics CSV of ``format_cell`` values (header: method, metric names)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", *(METRIC_LABELS[m] for m in metrics)])
    for name, s in summaries.items():
        writer.writerow([name, *(format_cell(s[m]) for m in metrics)])
    return buf.getvalue()


def markdown_categories(categories: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]]) -> str:
    """Methods x (metric: category) Markdown table of ``format_cell`` values and counts, or "" when no
    method's data has categories (``categories``: method -> ``aggregate_categories``)."""
    columns = list(
        dict.fromkeys(
            (metric, name) for cats in categories.values() for metric in cats for name in cats[metric]
        )
    )
    if not columns:
        return ""
    header = "| method | " + " | ".join(f"{METRIC_LABELS[m]}: {name}" for m, name in columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    rows = []
    for method, cats in categories.items():
        cells = []
        for metric, name in columns:
            entry = cats.get(metric, {}).get(name)
            cells.append("–" if entry is None else f"{format_cell(entry)} (n={entry['n']})")
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    note = (
        "Each probe category (KnowEdit) separately: the mean over records of each record's mean within the "
        "category. A record's Locality and Portability above are the mean over its categories of these "
        "within-category means (EasyEdit's KnowEdit rule)."
    )
    return "\n".join([header, rule, *rows]) + "\n\n" + note


def format_perplexity(entry: Mapping[str, Any] | None) -> str:
    """``"mean ± std over seeds"`` of an ``aggregate_perplexity`` entry (two decimals), ``"–"`` for None."""
    if not entry:
        return "–"
    spread = entry.get("std_seeds")
    return f"{entry['mean']:.2f}" + (f" ± {spread:.2f}" if spread is not None else "")


def markdown_perplexity(perplexities: Mapping[str, Mapping[str, Any] | None]) -> str:
    """Methods x (perplexity, what it was measured on) Markdown table, or "" when none was measured."""
    measured = {name: entry for name, entry in perplexities.items() if entry}
    if not measured:
        return ""
    first = next(iter(measured.values()))
    rows = [f"| {name} | {format_perplexity(perplexities.get(name))} |" for name in perplexities]
    where = (
        f"Measured on {first.get('passages')} passages of `{first.get('corpus')}` ({first.get('tokens')} "
        f"predicted tokens, passages cut to {first.get('max_tokens')} tokens); ± is the standard deviation "
        "over seeds. " + PERPLEXITY_DEFINITION
    )
    return "\n".join(["| method | perplexity |", "|---|---:|", *rows]) + "\n\n" + where


def markdown_report(
    title: str,
    summaries: Mapping[str, Mapping[str, Mapping[str, Any]]],
    *,
    has_sweep: bool = False,
    categories: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]] | None = None,
    perplexities: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> str:
    """The whole ``summary.md``: table, counts, (categories), (perplexity), definitions, figures."""
    metrics = present_metrics(summaries)
    definitions = "\n".join(f"- **{METRIC_LABELS[m]}**: {METRIC_DEFINITIONS[m]}" for m in metrics)
    figures = "![methods x metrics](metrics.png)"
    if has_sweep:
        figures += "\n\n![metrics vs λ](sweep.png)"
    by_category = markdown_categories(categories or {})
    by_category = f"## Locality and Portability by category\n\n{by_category}\n\n" if by_category else ""
    ppl = markdown_perplexity(perplexities or {})
    ppl = f"## General ability: perplexity on held-out text\n\n{ppl}\n\n" if ppl else ""
    return (
        f"# {title}\n\n{markdown_table(summaries, metrics)}\n\n{STD_NOTE}\n\n"
        f"## Counts (n)\n\n{markdown_counts(summaries, metrics)}\n\n{by_category}{ppl}"
        f"## Metric definitions\n\n{definitions}\n\n## Figures\n\n{figures}\n"
    )


# ----------------------------------------------------------------------------------------------- plots


def _seeds(results: EvalResult | Sequence[EvalResult]) -> list[EvalResult]:
    return [results] if isinstance(results, EvalResult) else list(results)


def plot_metrics(summaries: Mapping[str, Mapping[str, Mapping[str, Any]]], title: str):
    """Grouped bar chart: one group per metric, one bar per method (percent metrics; the Fluencies apart).

    Error bars show the std over seeds when a method has several seeds (the std over records of 0/1
    metrics is too wide to be informative).

    Returns:
        A matplotlib ``Figure`` (no pyplot state involved).
    """
    from matplotlib.figure import Figure

    metrics = present_metrics(summaries)
    percent = [m for m in metrics if m in PERCENT_METRICS]
    entropy = [m for m in metrics if m in ENTROPY_METRICS]
    with_fluency = bool(entropy)
    with_perplexity = any(s.get(PERPLEXITY) for s in summaries.values())
    methods = list(summaries)
    n_methods = max(len(methods), 1)
    width_ratios = (
        [max(len(percent), 1) * n_methods + 1]
        + ([len(entropy) * n_methods + 1] if with_fluency else [])
        + ([n_methods + 1] if with_perplexity else [])
    )
    fig = Figure(
        figsize=(min(16.0, max(6.5, 0.9 * len(percent) * max(1.0, n_methods / 3) + 3)), 5.0),
        layout="constrained",
    )
    axes = fig.subplots(1, len(width_ratios), gridspec_kw={"width_ratios": width_ratios}, squeeze=False)[0]
    colors = [f"C{i % 10}" for i in range(len(methods))]
    bar = 0.8 / n_methods

    def draw(ax, names: Sequence[str]) -> None:
        for j, method in enumerate(methods):
            s = summaries[method]
            xs = [i + (j - (n_methods - 1) / 2) * bar for i in range(len(names))]
            entries = [s.get(m) or {} for m in names]
            means = [e["mean"] if e.get("mean") is not None else math.nan for e in entries]
            errs = [e["std_seeds"] if e.get("std_seeds") is not None else 0.0 for e in entries]
            bars = ax.bar(
                xs, means, bar, label=method, color=colors[j], yerr=errs if any(errs) else None, capsize=3
            )
            if n_methods <= 4:
                # Upright labels collide between neighbouring bars once there are three or more.
                ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2, rotation=90 if n_methods >= 3 else 0)
        ticks = [METRIC_LABELS.get(m, "Perplexity") for m in names]
        ax.set_xticks(range(len(names)), ticks, rotation=20, ha="right")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)

    ax = axes[0]
    draw(ax, percent)
    ax.set_ylim(0, 115 if n_methods >= 3 else 109)
    ax.set_ylabel("score (%)")
    if any(s[m].get("std_seeds") for s in summaries.values() for m in metrics):
        ax.set_title("error bars: standard deviation over seeds", fontsize=8)
    if with_fluency:
        fax = axes[1]
        draw(fax, entropy)
        fax.set_ylabel("n-gram entropy (bits x100)")
        fax.set_title("Fluency (n-gram entropy)", fontsize=9)
    if with_perplexity:
        pax = axes[-1]
        draw(pax, [PERPLEXITY])
        pax.set_ylabel("perplexity (lower is better)")
        pax.set_title("General ability", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="outside lower center", ncols=min(len(methods), 6), fontsize=8, title="method"
    )
    fig.suptitle(title)
    return fig


def plot_sweep(
    sweep_summary: Mapping[str, Sequence[tuple[float, Mapping[str, Any]]]],
    parameter: str,
    title: str,
    baselines: Mapping[str, Mapping[str, Any]] | None = None,
):
    """One panel per metric: metric (%) against the sweep parameter, one line per method, and a dashed
    horizontal line per baseline (a method without the parameter, e.g. ``ft`` for λ).

    Args:
        sweep_summary: ``{method: [(value, aggregate summary), ...]}`` sorted by value.
        parameter: the x axis name (``λ``).
        title: figure title.
        baselines: ``{name: aggregate summary}`` drawn as reference lines.
    Returns:
        A matplotlib ``Figure``.
    """
    from matplotlib.figure import Figure

    metrics = [
        m for m in METRICS if any(entry[m]["n"] for points in sweep_summary.values() for _, entry in points)
    ]
    if any(entry.get(PERPLEXITY) for points in sweep_summary.values() for _, entry in points):
        metrics.append(PERPLEXITY)
    cols = min(3, max(len(metrics), 1))
    rows = max(1, math.ceil(len(metrics) / cols))
    fig = Figure(figsize=(4.2 * cols, 3.3 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics, strict=False):
        for j, (method, points) in enumerate(sweep_summary.items()):
            present = [(v, e[metric]) for v, e in points if (e.get(metric) or {}).get("mean") is not None]
            xs = [v for v, _ in present]
            ys = [entry["mean"] for _, entry in present]
            errs = [entry.get("std_seeds") or 0.0 for _, entry in present]
            if xs:
                ax.errorbar(
                    xs,
                    ys,
                    yerr=errs if any(errs) else None,
                    marker="o",
                    capsize=3,
                    label=method,
                    color=f"C{j % 10}",
                )
        for k, (name, entry) in enumerate((baselines or {}).items()):
            if (entry.get(metric) or {}).get("mean") is not None:
                ax.axhline(
                    entry[metric]["mean"],
                    linestyle="--",
                    linewidth=1.2,
                    color=f"C{(len(sweep_summary) + k) % 10}",
                    label=f"{name} (no {parameter})",
                )
        ax.set_title(METRIC_LABELS.get(metric, PERPLEXITY_LABEL), fontsize=10)
        ax.set_xlabel(parameter)
        ylabel = "n-gram entropy (bits x100)" if metric in ENTROPY_METRICS else "score (%)"
        ax.set_ylabel("perplexity" if metric == PERPLEXITY else ylabel)
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    if metrics:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(
            handles,
            labels,
            loc="outside lower center",
            ncols=min(len(labels), 6),
            fontsize=8,
            title="method",
        )
    fig.suptitle(title)
    return fig


# ------------------------------------------------------------------------------------------- writing


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _dumps(data: Any, **kwargs: Any) -> str:
    return json.dumps(data, ensure_ascii=False, default=_json_default, **kwargs)


def write_report(
    results: Mapping[str, Sequence[EvalResult]],
    out_dir: Path | str,
    *,
    title: str = "F-Learning evaluation",
    sweep: SweepData | None = None,
    sweep_parameter: str = "λ",
    sweep_baselines: Sequence[str] = (),
) -> Path:
    """Write every report file for ``results`` into ``out_dir``, atomically.

    The files are written into a temporary directory inside ``out_dir`` (resolved: through a symlink)
    and then swapped for the previous report's files together (``outputs.atomic_entries``): the report
    appears complete or not at all, and a failure leaves the previous report untouched. Report files
    (``REPORT_FILES``) this report does not write are removed with the swap; other files of ``out_dir``
    and the directory itself are left alone. A new ``out_dir`` appears whole.

    Args:
        results: method name -> one ``EvalResult`` per seed (seed taken from ``EvalResult.seed``, else
            its position).
        out_dir: output directory.
        title: report title.
        sweep: optional ``{method: {λ: EvalResult or [EvalResult per seed]}}`` for metric-vs-λ data.
        sweep_parameter: name of the swept parameter (x axis).
        sweep_baselines: names in ``results`` drawn as horizontal reference lines on the sweep plot.
    Returns:
        The output directory.
    Raises:
        NotADirectoryError: ``out_dir`` is a file.
        FlearnError: the files could not be swapped in and the previous ones not all put back (it says
            where they are).
    """
    if not results:
        raise ValueError("write_report() needs at least one method")
    for name, runs in results.items():
        if not runs:
            raise ValueError(f"method {name!r} has no results")
    given = Path(out_dir)
    out_dir = given.expanduser().resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a directory")
    summaries = {name: aggregate(list(runs)) for name, runs in results.items()}
    categories = {name: aggregate_categories(list(runs)) for name, runs in results.items()}
    perplexities = {name: aggregate_perplexity(list(runs)) for name, runs in results.items()}
    # the plots draw a method's perplexity beside its metrics (summary.json keeps it apart)
    plotted = {name: {**summaries[name], PERPLEXITY: perplexities[name]} for name in results}

    files: dict[str, Callable[[Path], None]] = {}

    lines = []
    for name, runs in results.items():
        for position, run in enumerate(runs):
            seed = run.seed if run.seed is not None else position
            for record in run.records:
                lines.append(_dumps({"method": name, "seed": seed, **record}))
    records_text = "\n".join(lines) + ("\n" if lines else "")
    files["records.jsonl"] = lambda p: p.write_text(records_text, encoding="utf-8")

    summary_doc: dict[str, Any] = {
        "title": title,
        "metrics": list(METRICS),
        "labels": METRIC_LABELS,
        "definitions": METRIC_DEFINITIONS,
        "note": STD_NOTE,
        "methods": {
            name: {
                "seeds": [r.seed if r.seed is not None else i for i, r in enumerate(runs)],
                "metrics": summaries[name],
                # Locality and Portability by probe category, when the data has categories (KnowEdit)
                **({"categories": categories[name]} if categories[name] else {}),
                # perplexity on held-out text over seeds (general ability), when it was measured
                **({"perplexity": perplexities[name]} if perplexities[name] else {}),
                "meta": [r.meta for r in runs],
            }
            for name, runs in results.items()
        },
    }
    summary_text = _dumps(summary_doc, indent=2) + "\n"
    files["summary.json"] = lambda p: p.write_text(summary_text, encoding="utf-8")
    md = markdown_report(
        title, summaries, has_sweep=bool(sweep), categories=categories, perplexities=perplexities
    )
    files["summary.md"] = lambda p: p.write_text(md, encoding="utf-8")
    csv_text = csv_table(summaries, present_metrics(summaries))
    files["summary.csv"] = lambda p: p.write_text(csv_text, encoding="utf-8")
    files["metrics.png"] = lambda p: plot_metrics(plotted, title).savefig(p, format="png", dpi=120)

    if sweep:
        sweep_summary = {
            method: sorted(
                (
                    (float(v), {**aggregate(_seeds(r)), PERPLEXITY: aggregate_perplexity(_seeds(r))})
                    for v, r in points.items()
                ),
                key=lambda t: t[0],
            )
            for method, points in sweep.items()
        }
        sweep_doc = {
            "parameter": sweep_parameter,
            "methods": {
                method: [
                    {
                        "value": v,
                        "metrics": {k: e for k, e in entry.items() if k != PERPLEXITY},
                        **({"perplexity": entry[PERPLEXITY]} if entry.get(PERPLEXITY) else {}),
                    }
                    for v, entry in points
                ]
                for method, points in sweep_summary.items()
            },
        }
        sweep_text = _dumps(sweep_doc, indent=2) + "\n"
        files["sweep.json"] = lambda p: p.write_text(sweep_text, encoding="utf-8")
        baselines = {name: plotted[name] for name in sweep_baselines if name in plotted}
        files["sweep.png"] = lambda p: plot_sweep(
            sweep_summary, sweep_parameter, f"{title}: metrics vs {sweep_parameter}", baselines
        ).savefig(p, format="png", dpi=120)

    with atomic_entries(out_dir, stale=REPORT_FILES) as staging:
        for name, write in files.items():
            write(staging / name)
    return given
