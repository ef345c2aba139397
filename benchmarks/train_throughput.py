"""Training throughput of the full-FT and LoRA stages on the embedded SmolLM2-135M.

Reports tokens/s and the fraction of the machine's fp32 matmul rate (measured in the same run) that
training reaches, counting model FLOPs as 6·params·tokens (forward 2, backward 4) for both stages, as
the issue specifies; for LoRA the weight-gradient third is not computed, so 4·params·tokens is the
work actually needed and is reported too.

With ``--compile`` the full-FT and LoRA stages also run with ``compile: true`` (regional
torch.compile of the decoder block); their warm-up, which holds the compilation, is reported as
``warmup_seconds`` next to the eager one.

Where the time goes: full-FT steps run again in a plain loop (same loss, same fused AdamW), timing
forward, backward and optimizer separately, and the time the model FLOPs would take at the measured
matmul rate.

    .venv/bin/python benchmarks/train_throughput.py [--steps 16] [--batch-size 64] [--split-steps 8] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, matmul_gflops, write_json  # noqa: E402


def measure(model, tokenizer, pairs, cfg) -> dict:
    import time

    from flearning.training import train

    # A warm-up epoch (allocations, thread pools; with compile, the compilation of every batch shape the
    # stage meets), then the measured run.
    start = time.perf_counter()
    warm = cfg.model_copy(update={"max_steps": None, "epochs": 1.0})
    train(copy.deepcopy(model), tokenizer, pairs, warm, progress=False)
    warmup = time.perf_counter() - start
    result = train(model, tokenizer, pairs, cfg, progress=False)
    return {
        "warmup_seconds": warmup,
        "steps": result.steps,
        "seconds": result.seconds,
        "tokens": result.tokens,
        "tokens_per_second": result.tokens_per_second,
        "final_loss": result.losses[-1],
    }


def phase_split(model, tokenizer, pairs, cfg) -> dict:
    """Wall-clock split of full-FT steps into forward (with the answer-only loss), backward and optimizer,
    timed with ``perf_counter`` (torch.profiler's per-op overhead distorts a model of many small ops),
    and the time the model FLOPs (6·params·tokens) would take at the measured matmul rate."""
    import time

    import torch

    from flearning.training.dataset import LengthGroupedBatches, build_examples, collate
    from flearning.training.loss import answer_loss

    examples = build_examples(tokenizer, pairs, add_eos=cfg.add_eos)
    sampler = LengthGroupedBatches([len(e) for e in examples], cfg.batch_size, cfg.seed)
    batches = [collate([examples[i] for i in b], tokenizer.pad_token_id) for b in sampler][
        : cfg.max_steps + 1
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=True)
    model.train()
    phases = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    tokens = 0
    for i, batch in enumerate(batches):  # the first step (optimizer state allocation) is not timed
        t0 = time.perf_counter()
        loss = answer_loss(model, batch)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if i:
            phases["forward"] += t1 - t0
            phases["backward"] += t2 - t1
            phases["optimizer"] += t3 - t2
            tokens += int(batch["attention_mask"].sum())
    total = sum(phases.values())
    return {
        "steps": len(batches) - 1,
        "tokens": tokens,
        "seconds": phases,
        "share": {k: v / total for k, v in phases.items()},
        "tokens_per_second": tokens / total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default="train_throughput.json", help="result file in benchmarks/results/")
    parser.add_argument("--split-steps", type=int, default=8, help="full-FT steps timed by phase (0: none)")
    parser.add_argument("--compile", action="store_true", help="also measure the stages with compile: true")
    args = parser.parse_args()
    if args.compile:  # a first-time user's compilation, not one served from an earlier run's disk cache
        import os
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="flearn-inductor-")

    from flearning.data import load_records
    from flearning.models import count_parameters, load_model
    from flearning.resources import sample_path
    from flearning.training import LoraSettings, TrainConfig

    records = load_records(sample_path("counterfact-200.json"))
    pairs = [(r.prompt, r.target_new) for r in records]
    model, tokenizer = load_model()
    params = count_parameters(model)
    gflops = matmul_gflops()

    rows = {}
    full_cfg = TrainConfig(lr=5e-5, batch_size=args.batch_size, max_steps=args.steps)
    rows["full_ft"] = measure(copy.deepcopy(model), tokenizer, pairs, full_cfg)
    lora_cfg = TrainConfig(lr=1e-3, batch_size=args.batch_size, max_steps=args.steps, lora=LoraSettings())
    rows["lora"] = measure(copy.deepcopy(model), tokenizer, pairs, lora_cfg)
    if args.compile:
        compiled = {"compile": True}
        rows["full_ft_compiled"] = measure(
            copy.deepcopy(model), tokenizer, pairs, full_cfg.model_copy(update=compiled)
        )
        rows["lora_compiled"] = measure(
            copy.deepcopy(model), tokenizer, pairs, lora_cfg.model_copy(update=compiled)
        )
    gflops_after = matmul_gflops()  # the machine is shared: bracket the training runs
    roof = (gflops + gflops_after) / 2
    split = None
    if args.split_steps:
        split = phase_split(
            copy.deepcopy(model),
            tokenizer,
            pairs,
            full_cfg.model_copy(update={"max_steps": args.split_steps}),
        )
        split["matmul_bound_seconds"] = 6 * params * split["tokens"] / (roof * 1e9)

    for name, row in rows.items():
        achieved = 6 * params * row["tokens_per_second"] / 1e9
        row["model_gflops_6pt"] = achieved
        row["fraction_of_matmul"] = achieved / roof
        if name.startswith("lora"):
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
        **{
            f"{name}_fraction_of_matmul": rows[name]["fraction_of_matmul"]
            for name in ("full_ft_compiled", "lora_compiled")
            if name in rows
        },
        **{name: rows[name] for name in ("full_ft_compiled", "lora_compiled") if name in rows},
        "full_ft_phases": split,
        "machine": machine(),
    }
    path = write_json(args.out, payload)
    print(f"fp32 matmul: {gflops:.1f} / {gflops_after:.1f} GFLOP/s (before/after); params {params:,}")
    print(f"{'stage':16} {'tokens/s':>10} {'GFLOP/s (6PT)':>14} {'of matmul':>10} {'warm-up s':>10}")
    for name, row in rows.items():
        print(
            f"{name:16} {row['tokens_per_second']:10.1f} {row['model_gflops_6pt']:14.1f} "
            f"{row['fraction_of_matmul']:10.2f} {row['warmup_seconds']:10.1f}"
        )
    if split:
        total = sum(split["seconds"].values())
        print(f"full FT, {split['steps']} steps timed by phase ({split['tokens_per_second']:.0f} tokens/s):")
        for phase, seconds in split["seconds"].items():
            print(f"  {phase:10} {seconds:6.2f} s  {100 * split['share'][phase]:5.1f} %")
        print(
            f"  the model FLOPs at the matmul rate would take {split['matmul_bound_seconds']:.2f} s "
            f"of these {total:.2f} s"
        )
    print(json.dumps({k: v for k, v in payload.items() if k.endswith("_fraction_of_matmul")}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
