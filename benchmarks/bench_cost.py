"""Where a bench's wall time went, from its own records: per bench directory the wall time
(``summary.json``), the priming, forget and learning stages' training seconds, the evaluations' seconds
and the perplexity part of them (the run records in ``cache/runs/``); optionally the shares of a py-spy
profile of the same kind of run (``py-spy record -f raw``: training forward / backward / optimizer,
scoring, generation, perplexity). Issue #11 measured one ``paper-v2`` seed with it before and after the
fused accumulation and the scoring prefix:

    flearn bench --profile paper-v2 --n 100 --seeds 1 --data zsre=../shared/data/zsre/zsre_dev-2.8k.json \\
        --out DIR                                  # once per commit, OMP_NUM_THREADS=1
    .venv/bin/python benchmarks/bench_cost.py --run before=DIR1 --run after=DIR2 [--py-spy RAW]

Writes ``benchmarks/results/bench-cost.json`` (``--out`` another name).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_json  # noqa: E402


def bench_cost(directory: Path) -> dict:
    summary = json.loads((directory / "summary.json").read_text())
    phases: dict[str, float] = collections.Counter()
    for path in sorted((directory / "cache" / "runs").glob("*.json")):
        run = json.loads(path.read_text())
        for phase, seconds in (run.get("seconds") or {}).items():
            phases[phase] += seconds
        phases["perplexity (part of evaluate)"] += (run.get("perplexity") or {}).get("seconds") or 0.0
    phases["prime_train"] = sum(p["seconds"] for d in summary["datasets"].values() for p in d["prime"])
    return {
        "wall_seconds": summary["wall_seconds"],
        "phases": {k: round(v, 1) for k, v in sorted(phases.items())},
        "config": {k: summary["config"].get(k) for k in ("n", "seeds", "methods", "template", "generation")},
    }


def profile_shares(raw: Path) -> dict[str, float]:
    """Shares of a py-spy raw profile (``stack;frames count`` lines) by what the stack is doing."""
    counts: dict[str, int] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if "flearning/training/trainer.py" in stack:
            if "clip_grad" in stack:
                kind = "training: clipping"
            elif "adamw" in stack.lower() or "optimizer.py" in stack:
                kind = "training: optimizer"
            elif "backward" in stack:
                kind = "training: backward"
            elif "answer_loss" in stack:
                kind = "training: forward"
            else:
                kind = "training: other"
        elif "evaluate (" in stack:
            kind = (
                "evaluation: perplexity"
                if "perplexity" in stack
                else "evaluation: generation"
                if "generat" in stack
                else "evaluation: scoring"
            )
        else:
            kind = "other"
        counts[kind] += int(n)
    total = sum(counts.values())
    return {k: round(v / total, 3) for k, v in counts.most_common()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="LABEL=BENCH_DIR, repeatable")
    parser.add_argument("--py-spy", type=Path, help="a py-spy raw profile of the first run")
    parser.add_argument("--out", default="bench-cost.json")
    args = parser.parse_args()
    runs = {}
    for item in args.run:
        label, _, directory = item.partition("=")
        runs[label] = bench_cost(Path(directory))
    first = next(iter(runs.values()))["wall_seconds"]
    for label, cost in runs.items():
        cost["ratio_to_first"] = round(cost["wall_seconds"] / first, 3)
        print(
            f"{label:12s} wall {cost['wall_seconds']:8.1f} s  ×{cost['ratio_to_first']:.3f}  {cost['phases']}"
        )
    # the bench directories are scratch: recorded by label, not by their machine-specific paths
    shown = [f"--run {item.partition('=')[0]}=DIR" for item in args.run] + (
        ["--py-spy RAW"] if args.py_spy else []
    )
    payload = {
        "command": " ".join(["benchmarks/bench_cost.py", *shown, "--out", args.out]),
        "machine": machine(),
        "runs": runs,
    }
    if args.py_spy:
        payload["profile_of_first_run"] = profile_shares(args.py_spy)
        print("profile:", payload["profile_of_first_run"])
    write_json(args.out, payload)
    print(f"wrote benchmarks/results/{args.out}")


if __name__ == "__main__":
    main()
