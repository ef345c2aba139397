"""What running the Alpaca template's shared preamble once per batch saves in training
(``training.prefix``; issue #11's performance target): forward + backward of ``answer_loss`` on the
embedded SmolLM2-135M over the same Alpaca-templated ZsRE facts, in micro-batches of 4 (the paper's
batch) and of 16 (its effective batch), with and without the shared prefix, alternating ``--repeats``
times in one process; the loss of each variant is printed beside its time (they agree to rounding).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/shared_prefix.py [--facts 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, machine, write_json  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "zsre" / "zsre_dev-2.8k.json"
VARIANTS = ((4, False), (4, True), (16, False), (16, True))


def main() -> None:
    import os

    from flearning.data import load_records
    from flearning.models import load_model
    from flearning.training.dataset import build_examples, collate
    from flearning.training.loss import answer_loss
    from flearning.training.prefix import shared_prefix_length

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m")
    model.train()
    records = load_records(DATA)[: args.facts]
    examples = build_examples(
        tokenizer, [(r.prompt, r.target_new) for r in records], add_eos=True, template="alpaca"
    )
    seconds: dict[str, list[float]] = {}
    losses: dict[str, float] = {}
    shared: dict[str, list[int]] = {}
    for _ in range(args.repeats):
        for size, share in VARIANTS:
            name = f"batch {size}, {'shared prefix' if share else 'whole'}"
            batches = [
                collate(examples[i : i + size], tokenizer.pad_token_id) for i in range(0, len(examples), size)
            ]
            start = time.perf_counter()
            total = 0.0
            for batch in batches:
                loss = answer_loss(model, batch, share_prefix=share)
                loss.backward()
                total += float(loss)
            seconds.setdefault(name, []).append(round(time.perf_counter() - start, 2))
            model.zero_grad(set_to_none=True)
            losses[name] = total / len(batches)
            shared[name] = [shared_prefix_length(b) if share else 0 for b in batches]
    tokens = sum(len(e) for e in examples)
    rows = []
    for size, share in VARIANTS:
        name = f"batch {size}, {'shared prefix' if share else 'whole'}"
        rows.append(
            {
                "variant": name,
                "batch_size": size,
                "shared_prefix": share,
                "seconds": seconds[name],
                "median_seconds": statistics.median(seconds[name]),
                "mean_loss": round(losses[name], 6),
                "shared_tokens_per_batch": shared[name],
            }
        )
    base = rows[0]["median_seconds"]
    for row in rows:
        row["ratio_to_batch4_whole"] = round(row["median_seconds"] / base, 3)
        print(
            f"{row['variant']:28s} {row['median_seconds']:7.2f} s  ×{row['ratio_to_batch4_whole']:.3f}  loss {row['mean_loss']}"
        )
    payload = {
        "command": ("benchmarks/shared_prefix.py " + " ".join(sys.argv[1:])).strip(),
        "machine": machine(),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "data": os.path.relpath(DATA, REPO),
        "facts": len(examples),
        "tokens": tokens,
        "rows": rows,
    }
    write_json("shared_prefix.json", payload)
    print("wrote benchmarks/results/shared_prefix.json")


if __name__ == "__main__":
    main()
