"""What running the Alpaca preamble once per batch saves in evaluation (``score_probes``'
``share_prefix``; issue #11's performance target): teacher-forced scoring of every probe of the same
Alpaca-templated records (Reliability, Generality, Locality, Old retention, Efficacy, Paraphrase) on the
embedded SmolLM2-135M, in the evaluation's batches of 64 rows, with the preamble in every row and run
once per batch, alternating ``--repeats`` times in one process; the largest NLL gap is printed beside.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scoring_prefix.py [--n 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, machine, write_json  # noqa: E402

DATA = {
    "zsre": REPO.parent / "shared" / "data" / "zsre" / "zsre_dev-2.8k.json",
    "counterfact": REPO.parent / "shared" / "data" / "counterfact" / "counterfact-val.json",
}


def main() -> None:
    import os

    import torch

    from flearning.data import load_records
    from flearning.evaluation.definitions import DEFAULT_BATCH_SIZE
    from flearning.evaluation.probes import record_probes, unique_probes
    from flearning.evaluation.scoring import score_probes
    from flearning.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="records per dataset")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m")
    model.eval()
    rows = []
    for name, path in DATA.items():
        records = load_records(path)[: args.n]
        probes, _ = unique_probes(record_probes(tokenizer, r, template="alpaca").all() for r in records)
        seconds: dict[bool, list[float]] = {False: [], True: []}
        scores = {}
        for _ in range(args.repeats):
            for share in (False, True):
                start = time.perf_counter()
                scores[share] = score_probes(
                    model,
                    probes,
                    pad_id=tokenizer.pad_token_id,
                    batch_size=DEFAULT_BATCH_SIZE,
                    share_prefix=share,
                )
                seconds[share].append(round(time.perf_counter() - start, 2))
        gap = max(abs(a.nll - b.nll) for a, b in zip(scores[True], scores[False], strict=True))
        same_argmax = all(a.argmax == b.argmax for a, b in zip(scores[True], scores[False], strict=True))
        whole, shared = statistics.median(seconds[False]), statistics.median(seconds[True])
        row = {
            "dataset": name,
            "data": os.path.relpath(path, REPO),
            "records": len(records),
            "probes": len(probes),
            "whole_seconds": seconds[False],
            "shared_seconds": seconds[True],
            "ratio": round(shared / whole, 3),
            "max_nll_gap": gap,
            "same_argmax": same_argmax,
        }
        rows.append(row)
        print(
            f"{name:12s} {len(probes):5d} probes  whole {whole:7.2f} s  shared {shared:7.2f} s  ×{row['ratio']:.3f}  "
            f"max NLL gap {gap:.1e}  same argmax {same_argmax}"
        )
    payload = {
        "command": ("benchmarks/scoring_prefix.py " + " ".join(sys.argv[1:])).strip(),
        "machine": machine(),
        "omp_threads": os.environ.get("OMP_NUM_THREADS") or str(torch.get_num_threads()),
        "batch_size": DEFAULT_BATCH_SIZE,
        "rows": rows,
    }
    write_json("scoring_prefix.json", payload)
    print("wrote benchmarks/results/scoring_prefix.json")


if __name__ == "__main__":
    main()
