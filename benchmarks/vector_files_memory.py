"""What writing a knowledge vector costs the FSDP2 processes: ``vector_files: consolidated`` (the whole
Δ gathered onto the main process, then ``vector.safetensors``) against ``sharded`` (a decoder block
gathered, written and let go at a time: ``KnowledgeVector.save_sharded``).

A model with the embedded model's architecture (SmolLM2-135M's ``config.json``, random weights: the
values do not matter here, no weights are read) is sharded with FSDP2 over 2 CPU processes (gloo, the
shipped ``configs/accelerate/fsdp2-cpu.yaml``), and Δ = 1e-3·θ is formed on each process's shards as the
forget stage forms Δ_old. Each variant runs in its own launch (fresh processes), and each process
measures what writing the vector adds to its resident memory: the kernel's peak (``VmHWM``, reset
through ``/proc/self/clear_refs`` just before) minus the resident set just before. The two vectors
are then compared tensor by tensor, and the dry-run's statement of the main process's extra memory
(``plan_memory(...).main_save``) is recorded beside them.

Run (about a minute on the 2-core machine):

    .venv/bin/python benchmarks/vector_files_memory.py

Writes benchmarks/results/vector_files_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MiB = 1 << 20


def status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def worker(variant: str, out: Path, result: Path) -> None:
    """One FSDP2 process: shard the model, form Δ on the shards, write it as ``variant`` says."""
    import gc

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from flearning.distributed import is_main_process, state
    from flearning.models import resolve_model
    from flearning.sharding import local, shard_model
    from flearning.vectors import KnowledgeVector, Provenance
    from flearning.vectors.metadata import build_metadata

    s = state()
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(resolve_model("smollm2-135m"))
    model = AutoModelForCausalLM.from_config(config)
    shard_model(model, "cpu")
    with torch.no_grad():
        deltas = {k: p.detach() * 1e-3 for k, p in model.named_parameters()}
    vector = KnowledgeVector(
        deltas, build_metadata(Provenance(method="benchmark"), kind="full", dropped_zero=[])
    )
    del deltas
    held = sum(local(t).numel() * 4 for t in vector.deltas.values())
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = status("VmRSS")
    start = time.perf_counter()
    if variant == "consolidated":  # what vector_files: consolidated does (forget_stage, then save)
        whole = vector.consolidated()
        if whole is not None:
            whole.save(out)
        del whole
    else:
        vector.save_sharded(out)
    seconds = time.perf_counter() - start
    peak = status("VmHWM")
    record = {
        "process": s.process_index,
        "main": is_main_process(),
        "vector_bytes_whole": sum(p.numel() for p in model.parameters()) * 4,
        "vector_bytes_held_before": held,
        "rss_before_MiB": round(before / MiB, 1),
        "extra_peak_MiB": round((peak - before) / MiB, 1),
        "seconds": round(seconds, 2),
    }
    result.with_name(f"{result.stem}-rank{s.process_index}.json").write_text(json.dumps(record))


def launch(variant: str, out: Path, result: Path) -> None:
    from flearning.resources import configs_dir

    env = dict(os.environ)
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(configs_dir() / "accelerate" / "fsdp2-cpu.yaml"),
        __file__, "--worker", variant, "--out", str(out), "--result", str(result),
    ]  # fmt: skip
    subprocess.run(cmd, env=env, check=True)


def block_params(model_dir: str) -> dict[str, int]:
    """The largest group of the sharded files (one decoder block, or the embeddings and the rest)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from flearning.vectors.files import block_groups

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    shapes = {k: p.numel() for k, p in model.named_parameters()}
    groups = [sum(shapes[k] for k in g) for g in block_groups(shapes)]
    return {"groups": len(groups), "largest_group_params": max(groups), "block_params": groups[1]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--out")
    parser.add_argument("--result")
    a = parser.parse_args()
    if a.worker:
        worker(a.worker, Path(a.out), Path(a.result))
        return

    import torch
    from common import machine, write_json

    from flearning.config import UpdateConfig, stage_plan
    from flearning.models import resolve_model
    from flearning.recipes.memory import plan_memory
    from flearning.vectors import KnowledgeVector

    runs = {}
    with tempfile.TemporaryDirectory(prefix="vector-files-") as tmp:
        tmp = Path(tmp)
        for variant in ("consolidated", "sharded"):
            launch(variant, tmp / variant, tmp / f"{variant}.json")
            runs[variant] = [json.loads((tmp / f"{variant}-rank{r}.json").read_text()) for r in (0, 1)]
        one, sharded = KnowledgeVector.load(tmp / "consolidated"), KnowledgeVector.load(tmp / "sharded")
        equal = one.keys() == sharded.keys() and all(torch.equal(one[k], sharded[k]) for k in one)
        files = sorted(p.name for p in (tmp / "sharded").iterdir())
    model_dir = resolve_model("smollm2-135m")
    cfg = UpdateConfig(model=model_dir, method="flearning-ft")
    plans = {
        variant: plan_memory(
            model_dir, "flearning-ft", stage_plan(cfg), processes=2, sharding="fsdp2", available=0,
            keep_theta=False, vector_files=variant,
        ).main_save
        for variant in ("consolidated", "sharded")
    }  # fmt: skip
    payload = {
        "command": "benchmarks/vector_files_memory.py",
        "machine": machine(),
        "model": "smollm2-135m architecture, random weights, fp32; FSDP2 over 2 CPU processes (gloo)",
        "groups": block_params(model_dir),
        "runs": runs,
        "bit_identical": equal,
        "sharded_files": len(files) - 1,
        "dry_run_main_save_MiB (flearning-ft, no update_vector)": {
            k: round(v / MiB, 1) for k, v in plans.items()
        },
    }
    path = write_json("vector_files_memory.json", payload)
    print(json.dumps(payload, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
