"""Do two ``flearn bench`` output directories hold the same numbers? Compares every per-record metric value
of every method and dataset (``<dataset>/records.jsonl``) and the datasets' summaries apart from their
timings; prints the differences and writes ``results/<name>.json``.

    .venv/bin/python benchmarks/compare_bench.py BEFORE_DIR AFTER_DIR --name bench-quick-unchanged
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_json  # noqa: E402


def _differences(x, y, path: str = "") -> list[str]:
    if isinstance(x, dict) and isinstance(y, dict):
        return [d for k in sorted(set(x) | set(y)) for d in _differences(x.get(k), y.get(k), f"{path}.{k}")]
    if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        return [
            d for i, (u, v) in enumerate(zip(x, y, strict=True)) for d in _differences(u, v, f"{path}[{i}]")
        ]
    return [] if x == y else [path]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--name", default="bench-compare")
    parser.add_argument(
        "--labels", nargs=2, default=["before", "after"], help="what each run was (e.g. commits)"
    )
    args = parser.parse_args()
    before = json.loads((args.before / "summary.json").read_text())
    after = json.loads((args.after / "summary.json").read_text())
    compared, differing = 0, []
    for dataset in before["datasets"]:
        rows_a = [json.loads(x) for x in (args.before / dataset / "records.jsonl").read_text().splitlines()]
        rows_b = [json.loads(x) for x in (args.after / dataset / "records.jsonl").read_text().splitlines()]
        if len(rows_a) != len(rows_b):
            differing.append(f"{dataset}: {len(rows_a)} records before, {len(rows_b)} after")
            continue
        for a, b in zip(rows_a, rows_b, strict=True):
            for key in a:
                compared += 1
                if a[key] != b.get(key):
                    differing.append(
                        f"{dataset} {a.get('method')} {a.get('id')} {key}: {a[key]} -> {b.get(key)}"
                    )
    summary = [d for d in _differences(before["datasets"], after["datasets"]) if not d.endswith("seconds")]
    for line in differing + summary:
        print(line)
    print(
        f"{compared} per-record values compared, {len(differing)} differ; summaries (timings aside) differ at {len(summary)} places"
    )
    write_json(
        f"{args.name}.json",
        {
            "command": f"benchmarks/compare_bench.py BEFORE AFTER --name {args.name}",
            "machine": machine(),
            "runs": dict(zip(("before", "after"), args.labels, strict=True)),
            "values_compared": compared,
            "values_differing": differing,
            "summary_differences_apart_from_timings": summary,
            "wall_seconds": {"before": before.get("wall_seconds"), "after": after.get("wall_seconds")},
        },
    )


if __name__ == "__main__":
    main()
