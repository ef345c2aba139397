"""Worker launched by tests/distributed/test_fsdp2.py under ``accelerate launch`` with the shipped
``fsdp2-cpu.yaml`` (2 processes, gloo, FSDP2).

Not a test module. Two modes:

``--mode stages``: the F-Learning stages with the project's own functions (``forget_stage``, ``forget``,
``train``, ``run_method``), recording per rank what the test compares:

    <out>/rank<r>.json             losses, bytes held per stage (local shards), the class of the result
    <out>/<name>.safetensors       on the main process only: Δ_old, θ', θ* (gathered whole)

``--mode kill-after N -- flearn args``: ``flearn`` itself (``flearning.cli.main``), except that the main
process is killed with SIGKILL right after the N-th checkpoint of the learning stage is written: a real
crash in the middle of a sharded run, which the test then resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import ddp_worker as ddp
import torch

LR = ddp.LR
FORGET_STEPS, LEARN_STEPS, LAM = 2, 3, 0.5


def stage_configs(batch_size: int):
    """The forget and learn stage settings of the ``stages`` mode, at a per-process batch size."""
    from flearning.training import TrainConfig

    forget = TrainConfig(lr=LR, max_steps=FORGET_STEPS, batch_size=batch_size, seed=3)
    learn = TrainConfig(lr=LR, max_steps=LEARN_STEPS, batch_size=batch_size, seed=3)
    return forget, learn


def lora_plan(batch_size: int):
    from flearning.config import StagePlan
    from flearning.training import LoraSettings, TrainConfig

    lora = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    cfg = TrainConfig(lr=5e-2, max_steps=2, batch_size=batch_size, seed=4, lora=lora)
    return StagePlan(learn=cfg, forget=cfg, lam=1.0)


def run_stages(model_dir: Path, batch_size: int) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """flearning-ft step by step, then flearning-lora through ``run_method``; (info, tensors to save).
    The one-process reference in the test calls this very function with the global batch."""
    from flearning.methods import get_method
    from flearning.recipes.algorithm import forget_stage, run_method
    from flearning.sharding import gathered_dict, is_sharded
    from flearning.training import train
    from flearning.vectors import forget

    forget_cfg, learn_cfg = stage_configs(batch_size)
    model, tokenizer = ddp.load(model_dir)
    stage = forget_stage(model, tokenizer, ddp.EQUAL_PAIRS, forget_cfg, progress=False)
    delta = dict(stage.whole.deltas) if stage.whole is not None else {}
    vector_bytes = sum(
        (v.to_local() if is_sharded_tensor(v) else v).numel() * 4 for v in stage.vector.deltas.values()
    )
    forget(model, stage.vector, LAM)
    theta_prime = {
        k: v.clone() for k, v in gathered_dict(model.named_parameters()).items()
    }  # trained on next
    learned = train(model, tokenizer, ddp.NEW_EQUAL_PAIRS, learn_cfg, progress=False)
    theta_star = gathered_dict(learned.model.named_parameters())
    info = {
        "forget_losses": stage.losses,
        "learn_losses": learned.losses,
        "sharded": is_sharded(learned.model),
        "vector_sharded": stage.vector.sharded,
        "vector_bytes": vector_bytes,
        "learn_state_bytes": learned.state_bytes,
    }

    lora_model, _ = ddp.load(model_dir)
    outcome = run_method(
        get_method("flearning-lora"),
        lora_model,
        tokenizer,
        ddp.EQUAL_PAIRS,
        ddp.NEW_EQUAL_PAIRS,
        lora_plan(batch_size),
        progress=False,
    )
    info["lora_losses"] = outcome.losses
    info["lora_result_class"] = type(outcome.model).__name__
    lora_star = gathered_dict(outcome.model.named_parameters())
    return info, {
        "delta": delta,
        "theta_prime": theta_prime,
        "theta_star": theta_star,
        "lora_star": lora_star,
    }


def is_sharded_tensor(t) -> bool:
    from flearning.sharding import is_dtensor

    return is_dtensor(t)


def kill_after(n: int, args: list[str]) -> int:
    """``flearn ARGS`` whose main process dies (SIGKILL) after the n-th learning-stage checkpoint."""
    from flearning.cli import main
    from flearning.distributed import is_main_process
    from flearning.training import checkpoint as ckpt

    original = ckpt.save_checkpoint
    saved: list[Path] = []

    def save_then_die(directory, *a, **kw):
        path = original(directory, *a, **kw)
        if Path(directory).name == "learn":
            saved.append(Path(directory))
            if len(saved) == n and is_main_process():
                os.kill(os.getpid(), signal.SIGKILL)
        return path

    ckpt.save_checkpoint = save_then_die
    sys.argv = ["flearn", *args]
    return main()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", required=True)
    parser.add_argument("--model")
    parser.add_argument("--out")
    parser.add_argument("--batch-size", type=int, default=ddp.PER_RANK_BATCH)
    parser.add_argument("--after", type=int, default=2)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    a = parser.parse_args()
    if a.mode == "kill":
        rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
        sys.exit(kill_after(a.after, rest))
    from safetensors.torch import save_file

    from flearning.distributed import is_main_process, state

    out = Path(a.out)
    info, tensors = run_stages(Path(a.model), a.batch_size)
    rank = state().process_index
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(info))
    if is_main_process():
        for name, values in tensors.items():
            save_file({k: v.contiguous() for k, v in values.items()}, str(out / f"{name}.safetensors"))


if __name__ == "__main__":
    main()
