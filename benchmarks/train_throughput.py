"""Training throughput of the full-FT and LoRA stages on the embedded SmolLM2-135M.

Reports tokens/s and the fraction of the machine's fp32 matmul rate (measured in the same run) that
training reaches, counting model FLOPs as 6·params·tokens (forward 2, backward 4) for both stages, as
the issue specifies; for LoRA the weight-gradient third is not computed, so 4·params·tokens is the
work actually needed and is reported too.

    .venv/bin/python benchmarks/train_throughput.py [--steps 8] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, machine, matmul_gflops, write_json  # noqa: E402


def measure(model, tokenizer, pairs, cfg) -> dict:
    from flearning.training import train

    # One warm-up step (allocations, thread pools), then the measured run.
    train(copy.deepcopy(model), tokenizer, pairs, cfg.model_copy(update={"max_steps": 1}), progress=False)
    result = train(model, tokenizer, pairs, cfg, progress=False)
    return {
        "steps": result.steps,
        "seconds": result.seconds,
        "tokens": result.tokens,
        "tokens_per_second": result.tokens_per_second,
        "final_loss": result.losses[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    from flearning.data import load_records
    from flearning.models import count_parameters, load_model
    from flearning.training import LoraSettings, TrainConfig

    records = load_records(REPO / "data" / "samples" / "counterfact-200.json")
    pairs = [(r.prompt, r.target_new) for r in records]
    model, tokenizer = load_model()
    params = count_parameters(model)
    gflops = matmul_gflops()

    rows = {}
    full_cfg = TrainConfig(lr=5e-5, batch_size=args.batch_size, max_steps=args.steps)
    rows["full_ft"] = measure(copy.deepcopy(model), tokenizer, pairs, full_cfg)
    lora_cfg = TrainConfig(lr=1e-3, batch_size=args.batch_size, max_steps=args.steps, lora=LoraSettings())
    rows["lora"] = measure(copy.deepcopy(model), tokenizer, pairs, lora_cfg)
    gflops_after = matmul_gflops()  # the machine is shared: bracket the training runs
    roof = (gflops + gflops_after) / 2

    for name, row in rows.items():
        achieved = 6 * params * row["tokens_per_second"] / 1e9
        row["model_gflops_6pt"] = achieved
        row["fraction_of_matmul"] = achieved / roof
        if name == "lora":
            row["fraction_of_matmul_4pt"] = 4 * params * row["tokens_per_second"] / 1e9 / roof

    payload = {
        "model": "smollm2-135m",
        "parameters": params,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "matmul_gflops": {"before": gflops, "after": gflops_after, "mean": roof},
        "full_ft": rows["full_ft"],
        "lora": rows["lora"],
        "full_ft_fraction_of_matmul": rows["full_ft"]["fraction_of_matmul"],
        "lora_fraction_of_matmul": rows["lora"]["fraction_of_matmul"],
        "machine": machine(),
    }
    path = write_json("train_throughput.json", payload)
    print(f"fp32 matmul: {gflops:.1f} / {gflops_after:.1f} GFLOP/s (before/after); params {params:,}")
    print(f"{'stage':8} {'tokens/s':>10} {'GFLOP/s (6PT)':>14} {'of matmul':>10}")
    for name, row in rows.items():
        print(
            f"{name:8} {row['tokens_per_second']:10.1f} {row['model_gflops_6pt']:14.1f} {row['fraction_of_matmul']:10.2f}"
        )
    print(json.dumps({k: payload[k] for k in ("full_ft_fraction_of_matmul", "lora_fraction_of_matmul")}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
