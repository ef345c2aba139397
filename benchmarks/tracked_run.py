"""Read a tracked run's TensorBoard events back (``flearn update --report-to tensorboard``) with
TensorBoard's own reader: a Markdown table of every scalar (points, first and last step and value),
optionally a PNG of the loss curves with the evaluation before → after, and ``results/<name>``.

    .venv/bin/python benchmarks/tracked_run.py /tmp/trk/logs/trk --png docs/tracking.png --name tracked-demo.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, repo_path, write_json  # noqa: E402


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in sorted(events.Tags()["scalars"])}


def table(scalars: dict[str, list[tuple[int, float]]]) -> str:
    rows = ["| scalar | points | first (step: value) | last (step: value) |", "|---|---:|---|---|"]
    for tag, points in scalars.items():
        (s0, v0), (s1, v1) = points[0], points[-1]
        rows.append(f"| `{tag}` | {len(points)} | {s0}: {v0:.4g} | {s1}: {v1:.4g} |")
    return "\n".join(rows)


def plot(scalars: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    """Each stage's loss per global step, where λ was applied, and the evaluation before → after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for tag in scalars:
        if tag.endswith("/loss"):
            steps, values = zip(*scalars[tag], strict=True)
            ax.plot(steps, values, marker=".", label=tag)
    for step, value in scalars.get("lambda", []):
        ax.axvline(step, color="grey", linestyle=":", label=f"λ = {value:g} applied")
    metrics = [t.removeprefix("eval/after/") for t in scalars if t.startswith("eval/after/")]
    lines = [
        f"{m}: {scalars[f'eval/before/{m}'][-1][1]:.1f} → {scalars[f'eval/after/{m}'][-1][1]:.1f}"
        for m in metrics
        if f"eval/before/{m}" in scalars
    ]
    if lines:
        ax.text(
            0.02,
            0.03,
            "\n".join(lines),
            transform=ax.transAxes,
            fontsize=8,
            family="monospace",
            verticalalignment="bottom",
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "lightgrey"},
        )
    ax.set_yscale("log")
    ax.set_ylabel("answer-token loss")
    ax.set_xlabel("global step")
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a TensorBoard run directory: <logging_dir>/<run_name>")
    parser.add_argument(
        "--png", type=Path, help="write the loss curves (and the evaluation before → after) there"
    )
    parser.add_argument("--name", default="tracked_run.json", help="the result file in results/")
    args = parser.parse_args()
    scalars = read_scalars(args.run_dir)
    if not scalars:
        raise SystemExit(f"{args.run_dir}: no scalars (is it <logging_dir>/<run_name>?)")
    print(table(scalars))
    if args.png:
        plot(scalars, args.png, f"flearn update --report-to tensorboard ({args.run_dir.name})")
        print(f"wrote {args.png}")
    write_json(args.name, {"machine": machine(), "run_dir": repo_path(args.run_dir), "scalars": scalars})


if __name__ == "__main__":
    main()
