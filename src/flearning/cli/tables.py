"""Terminal tables for run summaries (rich)."""

from __future__ import annotations

from typing import Any


def update_table(summary: dict[str, Any]):
    """Before → after table of every metric of an update, with the change."""
    from rich.table import Table

    before = summary.get("metrics_before") or {}
    after = summary.get("metrics_after") or {}
    lam = f", λ={summary['lambda']}" if summary.get("lambda") is not None else ""
    table = Table(title=f"{summary['method']}{lam} on {summary['data']['new']['records']} facts (×100)")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    for name in after or before:
        b = (before.get(name) or {}).get("mean")
        a = (after.get(name) or {}).get("mean")
        change = f"{a - b:+.1f}" if a is not None and b is not None else ""
        table.add_row(name, "–" if b is None else f"{b:.1f}", "–" if a is None else f"{a:.1f}", change)
    timings = summary.get("timings_seconds", {})
    table.caption = "time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
    return table
