"""The value optimisation of the editors (ROME's v*, MEMIT's and AlphaEdit's z) on the embedded
SmolLM2-135M: its wall time on CounterFact validation records, and, with ``--baseline COMMIT``, the
ratio to the package as it was at an earlier commit (extracted with ``git archive``), run alternately in
the same conditions, and how far the two versions' δ differ.

Each measurement is its own process (``PYTHONPATH`` = the tree's ``src``), one optimisation of
``--requests`` facts (records 400 on, as ``editing.py``) at MEMIT's module (block 7 output) and of one
fact at ROME's (layer 12's MLP output), alternating baseline and current ``--repeats`` times.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_optimisation.py [--requests 16] [--repeats 2]
        [--baseline COMMIT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, machine, repo_path, write_json  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "counterfact" / "counterfact-val.json"
FIRST = 400

# One measurement, run in a child process so that each tree's package is imported fresh.
CHILD = """
import json, sys, time, torch
from flearning.models import load_model
from flearning.data import load_records
from flearning.editing.architectures import architecture_of
from flearning.editing.requests import CONTEXT_PREFIXES, as_requests
from flearning.editing.values import ValueSettings, optimise_values
data, first, n, kind, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
model, tokenizer = load_model("smollm2-135m")
requests = as_requests(load_records(data)[first : first + n])
arch = architecture_of(model)
module = arch.block_name(7) if kind == "memit" else arch.rewrite_name(12)
start = time.perf_counter()
found = optimise_values(model, tokenizer, requests, module, prefixes=CONTEXT_PREFIXES, settings=ValueSettings())
seconds = time.perf_counter() - start
torch.save(found.delta, out + ".pt")
json.dump({"seconds": seconds, "steps": found.steps}, open(out, "w"))
"""


def measure(src: Path, kind: str, n: int, scratch: Path, tag: str) -> dict:
    out = scratch / f"{tag}-{kind}.json"
    env = {**os.environ, "PYTHONPATH": str(src)}
    subprocess.run(
        [sys.executable, "-c", CHILD, str(DATA), str(FIRST), str(n), kind, str(out)], env=env, check=True
    )
    return {**json.loads(out.read_text()), "delta": str(out) + ".pt"}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16, help="facts of the MEMIT-module optimisation")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline", help="an earlier commit of this repository to compare with")
    parser.add_argument(
        "--out", default="value-optimisation.json", help="file name under benchmarks/results/"
    )
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="flearn-values-"))
    trees = {"current": REPO / "src"}
    if args.baseline:
        tree = scratch / "baseline"
        tree.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", args.baseline, "src"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        trees = {"baseline": tree / "src", **trees}
    rows = []
    for kind, n in (("memit", args.requests), ("rome", 1)):
        seconds: dict[str, list[float]] = {tag: [] for tag in trees}
        deltas = {}
        for repeat in range(args.repeats):
            for tag, src in trees.items():
                got = measure(src, kind, n, scratch, f"{tag}{repeat}")
                seconds[tag].append(round(got["seconds"], 2))
                deltas[tag] = torch.load(got["delta"])
                print(f"{kind:5s} {tag:8s} repeat {repeat}: {got['seconds']:.1f} s", flush=True)
        row = {"module": kind, "requests": n, "seconds": seconds, "steps": got["steps"]}
        if "baseline" in trees:
            ratios = [c / b for b, c in zip(seconds["baseline"], seconds["current"], strict=True)]
            row["ratio_current_to_baseline"] = [round(r, 3) for r in ratios]
            row["ratio_median"] = round(statistics.median(ratios), 3)
            gap = (deltas["current"] - deltas["baseline"]).abs().max() / deltas["baseline"].abs().max()
            row["delta_max_relative_gap"] = float(gap)
        rows.append(row)
        payload = {
            "command": ("benchmarks/value_optimisation.py " + " ".join(sys.argv[1:])).strip(),
            "machine": machine(),
            "data": repo_path(DATA),
            "records_first": FIRST,
            "baseline_commit": args.baseline,
            "rows": rows,
        }
        write_json(args.out, payload)
    for row in rows:
        print(json.dumps({k: v for k, v in row.items() if k != "steps"}))
    print(f"wrote benchmarks/results/{args.out}")


if __name__ == "__main__":
    main()
