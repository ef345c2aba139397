"""The effect map (issue #11): F-Learning's paired margin over its baseline on Reliability, Generality
and Locality as a function of N, the number of facts updated in one run, under the ``paper-v2``
profile (the F-Learning paper's appendix protocol), at the paper's λ and at λ chosen on a validation
split (``--lambda auto``).

One ``flearn bench`` per (N, λ mode, dataset), each in its own directory under ``--out`` (default
``benchmarks/results/effect-map``), so that every bench resumes from its cache when rerun: the map takes
several sittings. The repository keeps each bench's JSON files (its finished runs and θ's prime.json, not
the weights: .gitignore), so a later sitting, on another machine, continues where the last one stopped.
``--jobs 2`` runs the datasets' benches side by side, one thread each (on this 2-core machine two
one-thread processes do more work than one process on two threads: the README's measurement). Data: ZsRE's dev and train files read as one dataset (``--data zsre=DEV --data zsre=TRAIN``),
CounterFact's train file; the first N usable records of each are updated (for auto-λ the next
``--n-val`` are the validation split, and λ is chosen on the first seed's and kept for the others:
``--lambda-choice first_seed``). Seeds: 3 for N ≤ 300, 2 above (``--seeds``).

Then ``--collect`` reads every finished bench's ``summary.json`` and writes
``benchmarks/results/effect-map.json`` (per dataset, comparison, metric and N: the seed-level mean
difference with its Student-t interval, the record-level one, the seeds, the bench's wall time) and the
plot ``docs/effect-map.png`` (margin vs N with the seed-level intervals).

    .venv/bin/python benchmarks/effect_map.py --ns 100,300,1000 [--modes paper,auto] [--dry-run]
    .venv/bin/python benchmarks/effect_map.py --collect
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, repo_path, write_json  # noqa: E402

DATA_ROOT = REPO.parent / "shared" / "data"
DATA = {
    "zsre": [DATA_ROOT / "zsre" / "zsre_dev-2.8k.json", DATA_ROOT / "zsre" / "zsre_mend_train-1k.json"],
    "counterfact": [DATA_ROOT / "counterfact" / "counterfact-train.json"],
}
# (F-Learning method, baseline) as issue #11 maps them
COMPARISONS = (("flearning-ft", "ft"), ("flearning-lora", "lora"), ("flearning-lora-ft", "ft"))
METRICS = ("reliability", "generality", "locality")
MODES = ("paper", "auto")


def seeds_for(n: int) -> int:
    return 3 if n <= 300 else 2


def bench_dir(out: Path, n: int, mode: str, dataset: str) -> Path:
    return out / f"n{n}-{mode}-{dataset}"


def bench_command(
    out: Path, n: int, mode: str, dataset: str, n_val: int, seeds: int | None = None
) -> list[str]:
    """The ``flearn bench`` arguments of one point of the map, for one dataset."""
    args = ["bench", "--profile", "paper-v2", "--n", str(n), "--seeds", str(seeds or seeds_for(n))]
    args += [item for path in DATA[dataset] for item in ("--data", f"{dataset}={path}")]
    if mode == "auto":
        # λ chosen once per method and dataset, on the first seed's validation split (as the paper chose
        # one λ per method and dataset), and kept for the other seeds: a third of the validation runs
        args += ["--lambda", "auto", "--n-val", str(n_val), "--lambda-choice", "first_seed"]
    return [*args, "--no-progress", "--out", str(bench_dir(out, n, mode, dataset))]


def shown(arg: str) -> str:
    """An argument as the README prints it: paths relative to the repository (``../shared/data/...``)."""
    name, sep, value = arg.partition("=")
    if sep and value.startswith("/"):
        return f"{name}={os.path.relpath(value, REPO)}"
    return os.path.relpath(arg, REPO) if arg.startswith("/") else arg


def margins(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The map's rows of one bench: per dataset, comparison and metric, the paired margin (×100) with
    the seed as the unit and with records as the unit. At auto-λ each method's chosen λ per seed is
    recorded; with the paper's λ, the one λ each method ran at."""
    rows = []
    for dataset, report in summary["datasets"].items():
        for method, baseline in COMPARISONS:
            for entry in report.get("paired", []):
                if (entry["method"], entry["baseline"], entry["metric"]) not in {
                    (method, baseline, m) for m in METRICS
                }:
                    continue
                rows.append(
                    {
                        "dataset": dataset,
                        "comparison": f"{method} − {baseline}",
                        "metric": entry["metric"],
                        "n": report["n"],
                        "lambda": entry["lambda"],
                        "seeds": entry.get("n_seeds"),
                        "seed_diffs": entry.get("seed_diffs"),
                        "seed_diff": entry.get("seed_diff"),
                        "seed_ci95": entry.get("seed_ci95"),
                        "record_diff": entry["diff"],
                        "record_ci95": entry["ci95"],
                        "record_pairs": entry["n"],
                        "chosen_lambda": (report.get("chosen_lambda") or {}).get(method),
                    }
                )
    return rows


def collect(out: Path, ns: Iterable[int], modes: Iterable[str]) -> dict[str, Any]:
    """Every finished bench of the map (its ``summary.json`` written), as the results file holds them."""
    points, missing = [], []
    for mode in modes:
        for n in ns:
            for dataset in DATA:
                path = bench_dir(out, n, mode, dataset) / "summary.json"
                if not path.is_file():
                    missing.append({"n": n, "mode": mode, "dataset": dataset})
                    continue
                summary = json.loads(path.read_text())
                for row in margins(summary):
                    points.append({"mode": mode, **row, "bench_seconds": summary.get("wall_seconds")})
    return {"points": points, "missing": missing}


def plot(points: list[dict[str, Any]], path: Path) -> None:
    """Margin vs N, one panel per (dataset, comparison), one colour per metric, the paper's λ solid and
    auto-λ dashed, the seed-level 95 % intervals as error bars (none with one seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({p["dataset"] for p in points})
    comparisons = [f"{m} − {b}" for m, b in COMPARISONS]
    fig, axes = plt.subplots(
        len(datasets), len(comparisons), figsize=(4.2 * len(comparisons), 3.4 * len(datasets)), squeeze=False
    )
    colours = dict(zip(METRICS, ("tab:blue", "tab:orange", "tab:green"), strict=True))
    for i, dataset in enumerate(datasets):
        for j, comparison in enumerate(comparisons):
            ax = axes[i][j]
            ax.axhline(0, color="grey", lw=0.8)
            for metric in METRICS:
                for mode, style in (("paper", "-"), ("auto", "--")):
                    mine = sorted(
                        (
                            p
                            for p in points
                            if (p["dataset"], p["comparison"], p["metric"], p["mode"])
                            == (dataset, comparison, metric, mode)
                        ),
                        key=lambda p: p["n"],
                    )
                    if not mine:
                        continue
                    xs = [p["n"] for p in mine]
                    ys = [p["seed_diff"] for p in mine]
                    errs = [
                        [
                            y - p["seed_ci95"][0] if p["seed_ci95"] else 0
                            for y, p in zip(ys, mine, strict=True)
                        ],
                        [
                            p["seed_ci95"][1] - y if p["seed_ci95"] else 0
                            for y, p in zip(ys, mine, strict=True)
                        ],
                    ]
                    ax.errorbar(
                        xs,
                        ys,
                        yerr=errs,
                        color=colours[metric],
                        ls=style,
                        marker="o",
                        ms=3,
                        capsize=3,
                        label=f"{metric} ({'paper λ' if mode == 'paper' else 'auto λ'})",
                    )
            ax.set_xscale("log")
            ns = sorted({p["n"] for p in points})
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.minorticks_off()
            ax.set_title(f"{dataset}: {comparison}", fontsize=9)
            ax.set_xlabel("facts updated in one run (N)")
            ax.set_ylabel("margin ×100 (seed-level 95 % CI)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_side_by_side(flearn: Path, commands: list[list[str]], jobs: int) -> None:
    """Run the benches ``jobs`` at a time, the machine's cores shared out as threads; each bench's log
    beside its directory (``<dir>.log``)."""
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    pending = list(commands)
    running: list[tuple[subprocess.Popen, Any]] = []
    failed = []
    while pending or running:
        while pending and len(running) < max(1, jobs):
            command = pending.pop(0)
            log = open(Path(command[-1]).with_suffix(".log"), "a")  # noqa: SIM115 (closed below)
            running.append((subprocess.Popen([str(flearn), *command], env=env, stdout=log, stderr=log), log))
        proc, log = running.pop(0)
        if proc.wait() != 0:
            failed.append(proc.args)
        log.close()
    if failed:
        raise SystemExit(f"benches failed: {failed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", default="100,300,1000", help="N values, comma-separated")
    parser.add_argument("--modes", default="paper,auto", help="paper (the paper's λ) and/or auto")
    parser.add_argument("--n-val", type=int, default=100, help="validation records of auto-λ")
    parser.add_argument("--seeds", type=int, help="seeds of every point (default: 3 for N ≤ 300, else 2)")
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "effect-map", help="the benches' root"
    )
    parser.add_argument("--datasets", default=",".join(DATA), help="datasets, comma-separated")
    parser.add_argument("--jobs", type=int, default=1, help="datasets' benches run side by side")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--collect", action="store_true", help="only collect finished benches and plot")
    args = parser.parse_args()
    ns = [int(x) for x in args.ns.split(",") if x.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if bad := [m for m in modes if m not in MODES]:
        parser.error(f"--modes {bad}: choose from {', '.join(MODES)}")
    flearn = Path(sys.executable).parent / "flearn"
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if bad := [d for d in datasets if d not in DATA]:
        parser.error(f"--datasets {bad}: choose from {', '.join(DATA)}")
    if not args.collect:
        for mode in modes:
            for n in ns:
                commands = [bench_command(args.out, n, mode, d, args.n_val, args.seeds) for d in datasets]
                for command in commands:
                    print("flearn " + " ".join(shown(a) for a in command), flush=True)
                if not args.dry_run:
                    run_side_by_side(flearn, commands, args.jobs)
        if args.dry_run:
            return
    found = collect(args.out, ns, modes)
    payload = {
        "command": ("benchmarks/effect_map.py " + " ".join(sys.argv[1:])).strip(),
        "benches": repo_path(args.out),
        "data": {name: [os.path.relpath(p, REPO) for p in files] for name, files in DATA.items()},
        **found,
    }
    write_json("effect-map.json", payload)
    if found["points"]:
        plot(found["points"], REPO / "docs" / "effect-map.png")
    print(
        f"wrote benchmarks/results/effect-map.json ({len(found['points'])} points, {len(found['missing'])} benches missing)"
    )


if __name__ == "__main__":
    main()
