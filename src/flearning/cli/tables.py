"""Every terminal table (rich): the before → after table of ``flearn update``, the summary of ``flearn
eval``, the greedy continuations of ``flearn update`` and ``flearn generate`` and the memory plan of
``flearn update --dry-run``. The numbers come from the recipes and the evaluation; this module only lays
them out (heavy imports stay inside the functions).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flearning.config import UpdateConfig
    from flearning.recipes.memory import MemoryPlan


def _facts(summary: dict[str, Any]) -> int:
    return summary["data"].get("facts", summary["data"]["new"]["records"])


def timings_line(summary: dict[str, Any]) -> str:
    """The time each step took, in this process; which stages an earlier process ran (a resumed run)."""
    timings = summary.get("timings_seconds", {})
    line = "time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
    resumed = summary.get("resumed") or {}
    if resumed:
        line += f" (this process only; resumed from an earlier process: {', '.join(resumed)})"
    return line


def update_table(summary: dict[str, Any]):
    """Before → after table of every metric of an update, with the change; None when the update was not
    evaluated (``--no-eval``: there is nothing to show, ``skipped_evaluation_line`` says so)."""
    from rich.table import Table

    before = summary.get("metrics_before") or {}
    after = summary.get("metrics_after") or {}
    if not before and not after:
        return None
    lam = f", λ={summary['lambda']}" if summary.get("lambda") is not None else ""
    table = Table(title=f"{summary['method']}{lam} on {_facts(summary)} facts (×100)")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    for name in after or before:
        b = (before.get(name) or {}).get("mean")
        a = (after.get(name) or {}).get("mean")
        change = f"{a - b:+.1f}" if a is not None and b is not None else ""
        table.add_row(name, "–" if b is None else f"{b:.1f}", "–" if a is None else f"{a:.1f}", change)
    ppl = summary.get("perplexity")  # general ability, not ×100: lower is better
    if ppl:
        b, a = ppl.get("before"), ppl.get("after")
        change = f"{a - b:+.2f}" if a is not None and b is not None else ""
        table.add_row(
            "perplexity (held-out text, not ×100, lower is better)",
            "–" if b is None else f"{b:.2f}",
            "–" if a is None else f"{a:.2f}",
            change,
        )
    table.caption = timings_line(summary)
    return table


def skipped_evaluation_line(summary: dict[str, Any]) -> str:
    """What an update without evaluation says instead of a table of dashes."""
    lam = f", λ={summary['lambda']}" if summary.get("lambda") is not None else ""
    return (
        f"{summary['method']}{lam} on {_facts(summary)} facts: evaluation was skipped (--no-eval), so there are "
        f"no metrics and no report/ (score the model with flearn eval). {timings_line(summary)}"
    )


def learn_schedule_line(summary: dict[str, Any]) -> str | None:
    """How the learning stage ended, in one line: accuracy on the new facts per epoch, and why it
    stopped (None for a fixed schedule without checks)."""
    schedule = summary.get("learn_schedule")
    if not schedule or not schedule.get("history"):
        return None
    rule = schedule["rule"] or {}
    per_epoch = ", ".join(f"{row['epoch']}: {100 * row['accuracy']:.0f}" for row in schedule["history"])
    target = f" (target {100 * rule['until_accuracy']:.0f})" if rule.get("until_accuracy") else ""
    kept = schedule["kept_epoch"]
    line = (
        f"learning stage: accuracy on the new facts by epoch{target}: {per_epoch}; it {schedule['why']} "
        f"after {schedule['epochs_trained']} epochs"
    )
    if kept != schedule["epochs_trained"]:
        line += f" and kept epoch {kept}, the best within the Locality budget"
    return line + "."


def locality_line(summary: dict[str, Any]) -> str | None:
    """The cost in Locality of an update, explained in one line."""
    after = (summary.get("metrics_after") or {}).get("locality") or {}
    if after.get("mean") is None:
        return None
    drop = 100.0 - after["mean"]
    return (
        f"Locality {after['mean']:.1f}: on unrelated prompts the updated model still predicts "
        f"{after['mean']:.1f}% of answer tokens as the original did; the other {drop:.1f}% is the cost "
        "of this update (learn.max_locality_drop=POINTS caps it)."
    )


def answers_table(records: list[Any], before: Any, after: Any, shown: int = 5):
    """For the first ``shown`` facts: the old and new answer and what the model said before and after
    the update (greedy continuations of the edit prompt), or None when they were not generated."""
    if before is None or after is None:
        return None
    said_before = {r["id"]: r.get("generated") for r in before.records}
    said_after = {r["id"]: r.get("generated") for r in after.records}
    rows = [r for r in records if said_before.get(r.id) is not None and said_after.get(r.id) is not None]
    if not rows:
        return None
    return continuations_table(
        [
            {
                "prompt": record.prompt,
                "old answer": record.target_old,
                "new answer": record.target_new,
                "before": said_before[record.id].strip(),
                "after": said_after[record.id].strip(),
            }
            for record in rows[:shown]
        ],
        title=f"What the model says (greedy), {min(shown, len(rows))} of {len(rows)} facts",
    )


def continuations_table(rows: list[dict[str, str]], title: str | None, ends: list[bool] | None = None):
    """Greedy continuations side by side (``answers_table`` of ``flearn update``, ``flearn generate``):
    one row per prompt, the columns named by the first row's keys, in order; ``ends[i]`` draws a line
    under row ``i`` (the last prompt of a fact)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title)
    for column in rows[0] if rows else ():
        table.add_column(column, overflow="fold")
    for i, row in enumerate(rows):  # Text: a prompt or an answer with [brackets] is not rich markup
        table.add_row(*(Text(value) for value in row.values()), end_section=bool(ends and ends[i]))
    return table


def summary_table(summary: dict[str, dict[str, Any]], title: str, perplexity: dict[str, Any] | None = None):
    """A rich table of one evaluation summary: metric, mean ± std (x100), n; and the model's perplexity
    on held-out text (``EvalResult.perplexity``) when it was measured."""
    from rich.table import Table

    from flearning.evaluation.definitions import METRIC_LABELS, METRICS
    from flearning.evaluation.report import format_cell

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("mean ± std (x100)", justify="right")
    table.add_column("n", justify="right")
    for metric in METRICS:
        entry = summary[metric]
        table.add_row(METRIC_LABELS[metric], format_cell(entry), str(entry["n"]))
    if perplexity is not None:  # a property of the model, not ×100: the n column counts its tokens
        table.add_row(
            "Perplexity (held-out text, lower is better)",
            f"{perplexity['perplexity']:.2f}",
            f"{perplexity['tokens']} tokens",
        )
    table.caption = (
        "std over records; the Fluencies are n-gram entropies in bits x100 (greedy: this project's; "
        "top-5 sampled: ROME/EasyEdit's); definitions in summary.md"
    )
    return table


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def plan_table(plan: MemoryPlan):
    """A rich renderable: one row per stage, the budget and the suggestions."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from flearning.recipes.memory import RUNTIME_OVERHEAD, TIGHT, fmt_bytes

    shape = plan.model
    title = (
        f"Memory plan: {plan.method} on {shape.name} ({_count(shape.params)} parameters, fp32, AdamW), "
        f"sequences of {plan.seq_len} tokens ({plan.seq_len_source})"
    )
    table = Table(title=title, title_justify="left")
    for column in (
        "stage",
        "batch",
        "trainable",
        "weights",
        "grads",
        "Adam m,v",
        "activations",
        "other",
        "total",
    ):
        table.add_column(
            column,
            justify="left" if column in ("stage", "other") else "right",
            no_wrap=column != "other",
        )
    for s in plan.stages:
        other = "\n".join(f"{label}: {fmt_bytes(b)}" for label, b in s.other) or "–"
        table.add_row(
            f"{s.name} ({s.kind})",
            str(s.batch_size),
            _count(s.trainable),
            fmt_bytes(s.weights),
            fmt_bytes(s.gradients),
            fmt_bytes(s.optimizer),
            fmt_bytes(s.activations),
            other,
            fmt_bytes(s.total),
        )
    per = (
        f" ({plan.processes} processes × {fmt_bytes(plan.peak // plan.processes)})"
        if plan.processes > 1
        else ""
    )
    table.caption = (
        f"totals include {fmt_bytes(RUNTIME_OVERHEAD)} runtime per process; activations are an estimate"
    )
    if plan.sharding == "fsdp2":  # each row is one process's part (one device each on GPUs)
        table.title += f"; FSDP2 over {plan.processes} processes, per process"
        held = (
            "θ* gathered whole, a decoder block of a vector at a time (--vector-files sharded)"
            if plan.vector_files == "sharded"
            else "θ*, Δ_old and θ* − θ gathered whole"
        )
        table.caption += (
            f"; the main process also holds {fmt_bytes(plan.main_save)} of CPU memory while it writes the "
            f"output ({held}, and θ for update_vector/ unless --no-vectors)"
        )
    if plan.available is None:
        verdict = Text(f"peak {fmt_bytes(plan.peak)}{per}; available memory unknown")
    elif plan.peak <= TIGHT * plan.available:
        verdict = Text(
            f"peak {fmt_bytes(plan.peak)}{per} of {fmt_bytes(plan.available)} available ({plan.available_source}): fits",
            style="green",
        )
    elif plan.fits:
        verdict = Text(
            f"peak {fmt_bytes(plan.peak)}{per} of {fmt_bytes(plan.available)} available ({plan.available_source}): "
            f"fits, with little headroom ({plan.peak / plan.available:.0%})",
            style="yellow",
        )
    else:
        verdict = Text(
            f"peak {fmt_bytes(plan.peak)}{per} of {fmt_bytes(plan.available)} available ({plan.available_source}): "
            "does NOT fit",
            style="bold red",
        )
    parts = [table, verdict]
    parts += [Text(f"• {line}") for line in plan.suggestions]
    return Group(*parts)


def render(renderable, width: int = 120) -> str:
    """A rich renderable as plain text (no colours)."""
    import io

    from rich.console import Console

    console = Console(width=width, file=io.StringIO(), color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def dry_run_report(
    cfg: UpdateConfig, *, seq_len: int | None = None, processes: int = 1, available: int | None = None
) -> str:
    """The memory plan of an update config as text (a table, the verdict, suggestions), at ``seq_len``
    tokens per sequence (None: assumed, and the plan says so). ``flearn update --dry-run`` measures the
    data's lengths instead (``recipes.dry_run``) and prints ``render(plan_table(plan))``."""
    from flearning.recipes.memory import dry_run_plan

    return render(plan_table(dry_run_plan(cfg, seq_len=seq_len, processes=processes, available=available)))
