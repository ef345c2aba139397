"""Load time of the embedded SmolLM2-135M: the first load (GGUF → safetensors conversion into a fresh
cache) and the second load (already converted), each in a fresh process.

Every load runs in a new Python process whose ``FLEARN_CACHE`` is a temporary directory (never the
user's cache): a first load gets an empty cache of its own, the second loads share the cache that the
first of them filled. Three times per load:

    imports     import torch and transformers, inside the process
    load_model  flearning.models.load_model() itself (conversion included on a first load)
    process     wall time of the whole process from the outside: interpreter start, imports, load, exit

The second loads read the converted weights from a warm page cache (the file was just written or read).
Repeats give a median (and the range). Target (issue 2): second load < 2 s.

    .venv/bin/python benchmarks/model_load.py [--repeats 5] [--first-repeats 3]

Writes benchmarks/results/model_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGET_SECOND_LOAD_S = 2.0


def run_load() -> None:
    """One load, in this (fresh) process; prints a ``RESULT`` line."""
    start = time.perf_counter()
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import_s = time.perf_counter() - start
    from flearning.models import DEFAULT_MODEL, cache_root, load_model

    converted_before = (cache_root() / "models" / DEFAULT_MODEL / ".flearn-complete").is_file()
    start = time.perf_counter()
    model, _ = load_model()
    load_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    row = {
        "import_s": import_s,
        "load_model_s": load_s,
        "converted_before": converted_before,
        "params": params,
    }
    print("RESULT " + json.dumps(row), flush=True)


def measure(cache: Path) -> dict:
    """Run one load in a fresh process with ``FLEARN_CACHE=cache``, timed from the outside too."""
    env = {**os.environ, "FLEARN_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--run"], env=env, capture_output=True, text=True
    )
    process_s = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"the load failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    line = next(x for x in reversed(done.stdout.splitlines()) if x.startswith("RESULT "))
    return {**json.loads(line[7:]), "process_s": process_s, "load_average_before": load}


def summarise(rows: list[dict]) -> dict:
    out = {}
    for key in ("import_s", "load_model_s", "process_s"):
        values = [r[key] for r in rows]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="second loads (default 5)")
    parser.add_argument(
        "--first-repeats", type=int, default=3, help="first loads, each converting (~30 s; default 3)"
    )
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--output", default="model_load.json", help="file name under benchmarks/results")
    parser.add_argument("--run", action="store_true", help=argparse.SUPPRESS)  # internal: one load
    args = parser.parse_args()
    if args.run:
        run_load()
        return

    from common import machine, write_json

    root = Path(tempfile.mkdtemp(prefix="flearn-model-load-", dir=args.workdir))
    first: list[dict] = []
    second: list[dict] = []
    try:
        for i in range(args.first_repeats):
            cache = root / f"cache-{i}"
            row = measure(cache)
            assert not row["converted_before"]
            first.append(row)
            print(
                f"  first load {i + 1}: load_model {row['load_model_s']:.2f} s, process {row['process_s']:.2f} s"
            )
            if i > 0:  # the first cache serves the second loads; the others only take disk space
                shutil.rmtree(cache)
        for i in range(args.repeats):
            row = measure(root / "cache-0")
            assert row["converted_before"]
            second.append(row)
            print(
                f"  second load {i + 1}: load_model {row['load_model_s']:.2f} s, process {row['process_s']:.2f} s"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    summary = {"first_load": summarise(first), "second_load": summarise(second)}
    second_median = summary["second_load"]["load_model_s"]["median"]
    result = {
        "benchmark": "model_load",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python benchmarks/model_load.py", *sys.argv[1:]]),
        "model": "smollm2-135m (embedded, fp32)",
        "parameters": second[0]["params"] if second else None,
        "repeats": {"first_load": args.first_repeats, "second_load": args.repeats},
        "summary_seconds": summary,
        "target_second_load_s": TARGET_SECOND_LOAD_S,
        "target_met": second_median < TARGET_SECOND_LOAD_S,
        "runs": {"first_load": first, "second_load": second},
        "machine": machine(),
        "notes": (
            "Each load in a fresh process with FLEARN_CACHE in a temporary directory; load_model_s times "
            "flearning.models.load_model() after torch and transformers are imported (import_s), process_s "
            "is the wall time of the whole process (interpreter start, imports, load, exit). First loads "
            "convert the GGUF into an empty cache; second loads find it converted (warm page cache)."
        ),
    }
    path = write_json(args.output, result)

    print()
    print(f"{'load':26s} {'runs':>4s} {'imports s':>18s} {'load_model s':>18s} {'process s':>18s}")
    for name, rows in (("first (converts)", first), ("second (converted)", second)):
        stats = summarise(rows)
        cells = [
            f"{stats[k]['median']:6.2f} ({stats[k]['min']:.2f}-{stats[k]['max']:.2f})"
            for k in ("import_s", "load_model_s", "process_s")
        ]
        print(f"{name:26s} {len(rows):4d} " + " ".join(f"{c:>18s}" for c in cells))
    met = "met" if result["target_met"] else "NOT met"
    print(f"second load_model median {second_median:.2f} s: target < {TARGET_SECOND_LOAD_S:.0f} s {met}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
