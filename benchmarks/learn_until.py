"""Learning until the new facts are held: the measurement behind ``flearn update``'s default target
(teacher-forced accuracy 0.95 on the new facts) and cap (20 epochs), README "An update that takes".

``flearn update`` (flearning-ft, λ 0.7, the embedded SmolLM2-135M, seed 0) on the demo's 34 facts at
several targets, once with a locality budget, against the paper's fixed schedule, and at the default
target on 50 records of the shipped CounterFact sample (how many epochs harder facts need, against the
cap). The JSON is rewritten after every run. Per run: the epochs
trained, the accuracy per epoch, the metrics after the update, and the time.

    .venv/bin/python benchmarks/learn_until.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_json  # noqa: E402

METRICS = ("reliability", "generality", "locality", "gen_exact_match", "old_retention", "efficacy")


def runs(quick: bool) -> list[dict]:
    demo = {"data": "sample:facts.jsonl"}
    plan = [
        dict(demo, name="demo, target 0.90", learn={"until_accuracy": 0.90}),
        dict(demo, name="demo, target 0.95 (default)", learn={}),
        dict(demo, name="demo, target 0.99", learn={"until_accuracy": 0.99}),
        dict(demo, name="demo, target 0.95, Locality budget 25", learn={"max_locality_drop": 25.0}),
        dict(demo, name="demo, paper schedule (3 epochs)", learn={"epochs": 3}),
        {
            "name": "CounterFact sample, 50 records, target 0.95",
            "data": "sample:counterfact-200.json",
            "limit": 50,
            "learn": {},
        },
    ]
    return plan[1:2] if quick else plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the default target on the demo facts")
    args = parser.parse_args()

    from flearning.config import UpdateConfig
    from flearning.recipes.update import update

    rows = []
    for spec in runs(args.quick):
        fields = {k: v for k, v in spec.items() if k != "name"}
        cfg = UpdateConfig(method="flearning-ft", lam=0.7, seed=0, **fields)
        start = time.perf_counter()
        result = update(cfg, progress=False)
        seconds = time.perf_counter() - start
        summary = result.summary
        schedule = summary["learn_schedule"]
        after = summary["metrics_after"]
        row = {
            "name": spec["name"],
            "config": {k: v for k, v in fields.items()},
            "records": summary["data"]["new"]["records"],
            "stopped_by": schedule["stopped_by"],
            "epochs_trained": schedule["epochs_trained"],
            "kept_epoch": schedule["kept_epoch"],
            "history": schedule["history"],
            "metrics_after": {m: after[m]["mean"] for m in METRICS},
            "learn_seconds": round(summary["timings_seconds"]["learn_train"], 1),
            "seconds": round(seconds, 1),
        }
        rows.append(row)
        print(
            f"{row['name']:<48} epochs {row['epochs_trained'] or '-':>2} (kept {row['kept_epoch'] or '-'}) "
            + " ".join(f"{m[:8]} {v:5.1f}" for m, v in row["metrics_after"].items())
            + f"  {row['seconds']:.0f}s",
            flush=True,
        )
        path = write_json(
            "learn_until_quick.json" if args.quick else "learn_until.json",
            {
                "command": "benchmarks/learn_until.py" + (" --quick" if args.quick else ""),
                "machine": machine(),
                "runs": rows,
            },
        )
    print(f"wrote {path.relative_to(Path(__file__).resolve().parent.parent)}")


if __name__ == "__main__":
    main()
