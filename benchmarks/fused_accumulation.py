"""What running an optimizer step's micro-batches as one batch saves (``fused_accumulation``,
``training.fused``; issue #11's performance target): whole training stages of the embedded SmolLM2-135M
at the F-Learning paper's stage settings (lr 5e-5, batch 4 × accumulation 4, Alpaca prompts) on the same
ZsRE facts, full fine-tuning and LoRA on q_proj/v_proj, with accumulation (each micro-batch's own
forward and backward, its own shared preamble) and fused, alternating ``--repeats`` times in one
process. Each fused stage's final weights are compared with the accumulated stage's.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fused_accumulation.py [--facts 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, machine, write_json  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "zsre" / "zsre_dev-2.8k.json"


def main() -> None:
    import os

    import torch

    from flearning.data import load_records
    from flearning.models import load_model
    from flearning.training import LoraSettings, TrainConfig, train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=64)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base, tokenizer = load_model("smollm2-135m")
    records = load_records(DATA)[: args.facts]
    pairs = [(r.prompt, r.target_new) for r in records]
    stages = {
        "full": {},
        "lora": {"lora": LoraSettings(r=8, alpha=16, target_modules=["q_proj", "v_proj"])},
    }
    seconds: dict[str, list[float]] = {}
    results: dict[str, dict] = {}
    for _ in range(args.repeats):
        for stage, extra in stages.items():
            for fused in (False, True):
                cfg = TrainConfig(
                    lr=5e-5,
                    epochs=args.epochs,
                    batch_size=4,
                    grad_accum=4,
                    template="alpaca",
                    fused_accumulation=fused,
                    **extra,
                )
                result = train(copy.deepcopy(base), tokenizer, pairs, cfg, progress=False)
                name = f"{stage}, {'fused' if fused else 'accumulated'}"
                seconds.setdefault(name, []).append(round(result.seconds, 2))
                weights = {
                    n: p.detach().clone() for n, p in result.model.named_parameters() if p.requires_grad
                }
                results[name] = {"losses": result.losses, "steps": result.steps, "weights": weights}
    rows = []
    for stage in stages:
        acc, fus = f"{stage}, accumulated", f"{stage}, fused"
        gap = max(
            float((results[fus]["weights"][n] - w).abs().max() / w.abs().max().clamp_min(1e-12))
            for n, w in results[acc]["weights"].items()
        )
        moved = (
            max(
                float((w - dict(base.named_parameters())[n].detach()).abs().max())
                for n, w in results[acc]["weights"].items()
                if n in dict(base.named_parameters())
            )
            if stage == "full"
            else None
        )
        for name in (acc, fus):
            rows.append(
                {
                    "stage": stage,
                    "variant": name,
                    "steps": results[name]["steps"],
                    "seconds": seconds[name],
                    "median_seconds": statistics.median(seconds[name]),
                    "final_loss": round(results[name]["losses"][-1], 6),
                }
            )
        rows[-1]["ratio_to_accumulated"] = round(rows[-1]["median_seconds"] / rows[-2]["median_seconds"], 3)
        rows[-1]["max_relative_weight_gap"] = gap
        rows[-1]["max_weight_change_of_training"] = moved
    for row in rows:
        ratio = f"×{row['ratio_to_accumulated']:.3f}" if "ratio_to_accumulated" in row else ""
        print(
            f"{row['variant']:20s} {row['median_seconds']:8.2f} s {ratio:8s} final loss {row['final_loss']}"
        )
    payload = {
        "command": ("benchmarks/fused_accumulation.py " + " ".join(sys.argv[1:])).strip(),
        "machine": machine(),
        "omp_threads": os.environ.get("OMP_NUM_THREADS") or str(torch.get_num_threads()),
        "data": os.path.relpath(DATA, REPO),
        "facts": len(pairs),
        "epochs": args.epochs,
        "rows": rows,
    }
    write_json("fused_accumulation.json", payload)
    print("wrote benchmarks/results/fused_accumulation.json")


if __name__ == "__main__":
    main()
