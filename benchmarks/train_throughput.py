"""Training throughput of the full-FT and LoRA stages on the embedded SmolLM2-135M.

Reports tokens/s and the fraction of the machine's fp32 matmul rate (measured in the same run) that
training reaches, counting model FLOPs as 6·params·tokens (forward 2, backward 4) for both stages, as
the issue specifies; for LoRA the weight-gradient third is not computed, so 4·params·tokens is the
work actually needed and is reported too.

Where the time goes: a few full-FT steps run again under ``torch.profiler`` (with FLOP counting), and
self-CPU time is grouped into matmuls, the vocabulary log-softmax / loss, attention, the optimizer,
zero-fills and copies, and other element-wise work; the matmuls' own rate (their FLOPs over their time)
shows how close the kernels themselves come to the square-matmul roofline.

    .venv/bin/python benchmarks/train_throughput.py [--steps 16] [--batch-size 16] [--profile-steps 4]
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


# torch.profiler op names → what they are (self-CPU time is summed per group)
GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "vocabulary log-softmax / loss": (
        "aten::_log_softmax",
        "aten::_log_softmax_backward_data",
        "aten::nll_loss",
    ),
    "attention": ("scaled_dot_product", "flash_attention"),
    "optimizer (AdamW)": ("aten::_fused_adamw", "aten::_foreach", "aten::adamw"),
    "zero-fill and copies": ("aten::fill_", "aten::zero_", "aten::copy_", "aten::clone", "aten::index"),
}


def profile_steps(model, tokenizer, pairs, cfg) -> dict:
    """Self-CPU time of ``cfg.max_steps`` training steps by group, and the matmuls' own GFLOP/s."""
    from torch.profiler import ProfilerActivity, profile

    from flearning.training import train

    train(copy.deepcopy(model), tokenizer, pairs, cfg.model_copy(update={"max_steps": 1}), progress=False)
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        train(model, tokenizer, pairs, cfg, progress=False)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    shares = dict.fromkeys([*GROUPS, "other element-wise and framework"], 0.0)
    mm_time = mm_flops = 0.0
    for e in events:
        group = next((g for g, keys in GROUPS.items() if any(k in e.key for k in keys)), None)
        shares[group or "other element-wise and framework"] += e.self_cpu_time_total / total
        if group == "matmul":
            mm_time += e.self_cpu_time_total
            mm_flops += e.flops or 0
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    return {
        "steps": cfg.max_steps,
        "time_share": shares,
        "matmul_gflops_achieved": mm_flops / (mm_time * 1e-6) / 1e9 if mm_time else None,
        "top_ops": [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count} for e in top],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--profile-steps", type=int, default=4, help="full-FT steps profiled (0: none)")
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
    profiled = None
    if args.profile_steps:
        profiled = profile_steps(
            copy.deepcopy(model),
            tokenizer,
            pairs,
            full_cfg.model_copy(update={"max_steps": args.profile_steps}),
        )

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
        "full_ft_profile": profiled,
        "machine": machine(),
    }
    path = write_json("train_throughput.json", payload)
    print(f"fp32 matmul: {gflops:.1f} / {gflops_after:.1f} GFLOP/s (before/after); params {params:,}")
    print(f"{'stage':8} {'tokens/s':>10} {'GFLOP/s (6PT)':>14} {'of matmul':>10}")
    for name, row in rows.items():
        print(
            f"{name:8} {row['tokens_per_second']:10.1f} {row['model_gflops_6pt']:14.1f} {row['fraction_of_matmul']:10.2f}"
        )
    if profiled:
        print(f"full FT, {profiled['steps']} profiled steps: share of CPU time")
        for group, share in profiled["time_share"].items():
            print(f"  {group:34} {100 * share:5.1f} %")
        if profiled["matmul_gflops_achieved"]:
            print(
                f"  matmuls' own rate {profiled['matmul_gflops_achieved']:.0f} GFLOP/s "
                f"({profiled['matmul_gflops_achieved'] / roof:.2f} of the {roof:.0f} GFLOP/s square-matmul roof)"
            )
    print(json.dumps({k: payload[k] for k in ("full_ft_fraction_of_matmul", "lora_fraction_of_matmul")}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
