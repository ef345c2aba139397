"""Streaming θ − λ·Δ on a big sharded checkpoint: time and peak memory against loading everything and
against mergekit's task_arithmetic.

A synthetic Llama-shaped checkpoint (random fp32 weights, default 4 layers of hidden 4096 / intermediate
11008 / vocabulary 32000, untied: 4.3 GB in 1 GB shards) and a "fine-tuned" copy (+ small noise) are
written shard by shard into a temporary directory under /tmp (deleted at the end unless --keep; never
committed). Each variant then runs in a fresh subprocess, timed from outside (wall clock, imports
included), its peak resident set taken from ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a wrapper
process that runs only that variant:

    difference      stream_difference(base, fine-tuned) -> Δ (sharded like the model)
    stream          stream_apply(base, Δ, -λ) with every check (base fingerprint, checksums, finiteness)
    stream-nocheck  the same with check_base=False (no fingerprint pass)
    naive           load every shard and Δ into RAM, ops.updated_values, save_file per shard
    mergekit        mergekit-yaml task_arithmetic, base + (-λ)·(fine-tuned − base), dtype float32

Before each variant dirty pages are flushed (``sync``) and its inputs are read once (warm page cache for
all alike). Outputs are compared tensor by tensor with the streaming output. The machine may be shared:
the 1-minute load average before each variant is recorded.

mergekit (LGPL) is not a project dependency. It runs from its own venv, and is skipped with a message
when that venv is absent. Create it with:

    python3 -m venv /tmp/mergekit-venv
    /tmp/mergekit-venv/bin/pip install torch==2.13.0   # first: the local CPU wheel, not a CUDA build
    /tmp/mergekit-venv/bin/pip install mergekit

Run (about 5 minutes on the 2-core machine; needs about 5x the checkpoint size on disk and ~13 GB RAM
for the naive variant):

    .venv/bin/python benchmarks/vector_stream.py [--layers 4] [--shard-size 1GB] [--keep]

Writes benchmarks/results/vector_stream.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MERGEKIT_VENV = Path("/tmp/mergekit-venv")
INDEX = "model.safetensors.index.json"


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


# -- the synthetic checkpoint -------------------------------------------------------------------------------


def llama_shapes(
    layers: int, hidden: int, intermediate: int, vocab: int
) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of an untied LlamaForCausalLM (multi-head attention), in module order."""
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.k_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.v_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{p}.mlp.gate_proj.weight", (intermediate, hidden)),
            (f"{p}.mlp.up_proj.weight", (intermediate, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, intermediate)),
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def make_checkpoints(root: Path, args) -> dict:
    """Write base/ and tuned/ shard by shard (at most one shard of each in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    shapes = llama_shapes(args.layers, args.hidden, args.intermediate, args.vocab)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:  # the greedy packing transformers' save_pretrained uses
        nbytes = 4 * math.prod(shape)
        if shards[-1] and size + nbytes > args.shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128,
        num_key_value_heads=args.hidden // 128,
        tie_word_embeddings=False,
        dtype="float32",
    )
    config.architectures = ["LlamaForCausalLM"]
    gen = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    total = 0
    for which in ("base", "tuned"):
        (root / which).mkdir(parents=True)
        config.save_pretrained(root / which)
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        base = {}
        for key, shape in shard:
            if len(shape) == 1:
                base[key] = torch.ones(shape)
            else:
                base[key] = torch.empty(shape).normal_(0.0, 0.02, generator=gen)
            weight_map[key] = name
        save_file(base, str(root / "base" / name), metadata={"format": "pt"})
        for tensor in base.values():  # fine-tuning: a small change everywhere, norms frozen
            if tensor.dim() > 1:
                tensor.add_(torch.empty(tensor.shape).normal_(0.0, 2e-4, generator=gen))
        save_file(base, str(root / "tuned" / name), metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in base.values())
        del base
        print(f"  wrote shard {i}/{len(shards)}", flush=True)
    for which in ("base", "tuned"):
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (root / which / INDEX).write_text(json.dumps(index, indent=2))
    return {"bytes": total, "shards": len(shards), "params": total // 4}


# -- variants (each runs in its own process) ----------------------------------------------------------------


def run_variant(variant: str, root: Path, lam: float) -> None:
    if variant == "difference":
        from flearning.vectors.streaming import stream_difference

        stream_difference(root / "base", root / "tuned", root / "vector")
    elif variant in ("stream", "stream-nocheck"):
        from flearning.vectors.streaming import stream_apply

        stream_apply(root / "base", root / "vector", -lam, root / "out", check_base=variant == "stream")
    elif variant == "naive":
        naive_apply(root / "base", root / "vector", -lam, root / "out")
    elif variant == "phases":
        phases(root)
    else:
        raise SystemExit(f"unknown variant {variant}")


def naive_apply(model_dir: Path, vector_dir: Path, lam: float, out: Path) -> None:
    """Load everything, compute, save: what a script without streaming does."""
    from safetensors.torch import load_file, save_file

    from flearning.vectors import ops
    from flearning.vectors.files import load_vector

    index = json.loads((model_dir / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    state = {}
    for name in files:
        state.update({k: v.clone() for k, v in load_file(str(model_dir / name)).items()})  # into RAM
    deltas, _ = load_vector(vector_dir)
    ops.check_applicable(state, deltas)
    state.update(ops.updated_values(state, deltas, lam))
    del deltas
    out.mkdir()
    for name in files:
        shard = {k: state[k] for k, f in index["weight_map"].items() if f == name}
        save_file(shard, str(out / name), metadata={"format": "pt"})
    (out / INDEX).write_text(json.dumps(index))
    shutil.copy2(model_dir / "config.json", out / "config.json")


def phases(root: Path) -> None:
    """Time the pieces of stream_apply separately (inputs already in the page cache)."""
    from flearning.vectors import streaming
    from flearning.vectors.streaming.names import model_architecture

    out = {}
    t = time.perf_counter()
    arch, _ = model_architecture(root / "base")
    out["build_meta_model_s"] = time.perf_counter() - t
    t = time.perf_counter()
    streaming.checkpoint_fingerprint(root / "base")
    out["base_fingerprint_s"] = time.perf_counter() - t
    t = time.perf_counter()
    streaming.VectorFiles(root / "vector").verify()
    out["vector_sha256_s"] = time.perf_counter() - t
    print("PHASES " + json.dumps(out), flush=True)


def measure(cmd: list[str]) -> dict:
    """Run ``cmd`` through a wrapper process whose RUSAGE_CHILDREN holds only this command's peak."""
    wrapper = (
        "import json, resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "done = subprocess.run(sys.argv[1:])\n"
        "seconds = time.perf_counter() - t\n"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
        "print('MEASURE ' + json.dumps({'seconds': seconds, 'peak_rss': rss, 'rc': done.returncode}))\n"
    )
    done = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    lines = done.stdout.splitlines()
    result = json.loads(next(line for line in reversed(lines) if line.startswith("MEASURE "))[8:])
    result["stdout"] = [line for line in lines if not line.startswith("MEASURE ")]
    if result["rc"] != 0:
        raise RuntimeError(f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return result


def warm(*dirs: Path) -> None:
    """Read the inputs once so every variant starts from the same (warm) page cache."""
    buffer = bytearray(64 << 20)
    for d in dirs:
        for path in sorted(d.iterdir()):
            if path.is_file():
                with open(path, "rb", buffering=0) as fh:
                    while fh.readinto(buffer):
                        pass


def compare(a: Path, b: Path) -> dict:
    """Largest absolute difference between two checkpoints, one tensor at a time."""
    import torch

    from flearning.io.safetensors import open_checkpoint, read_block

    ea, eb = open_checkpoint(a).entries, open_checkpoint(b).entries
    assert sorted(ea) == sorted(eb), "different tensor names"
    worst, identical = 0.0, True
    for name, entry in ea.items():
        x, y = read_block(entry, None), read_block(eb[name], None)
        identical = identical and torch.equal(x, y)
        worst = max(worst, float((x.to(torch.float64) - y.to(torch.float64)).abs().max()))
        del x, y
    return {"bit_identical": identical, "max_abs_diff": worst}


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-size", type=parse_size, default=parse_size("1GB"))
    parser.add_argument("--lam", type=float, default=0.7, help="λ in θ − λ·Δ")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"))
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints in the work directory")
    parser.add_argument("--mergekit-venv", type=Path, default=MERGEKIT_VENV)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--output", default="vector_stream.json", help="file name under benchmarks/results")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: run one variant in this process
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run_variant(args.run, args.root, args.lam)
        return

    from common import machine, write_json

    expected = sum(
        4 * math.prod(s) for _, s in llama_shapes(args.layers, args.hidden, args.intermediate, args.vocab)
    )
    free = shutil.disk_usage(args.workdir).free
    if free < 5.5 * expected:
        raise SystemExit(
            f"{args.workdir}: {free / 1e9:.1f} GB free, need about {5.5 * expected / 1e9:.1f} GB"
        )
    root = Path(tempfile.mkdtemp(prefix="flearn-vector-stream-", dir=args.workdir))
    print(f"work directory {root}", flush=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    rows: dict[str, dict] = {}
    try:
        t = time.perf_counter()
        ckpt = make_checkpoints(root, args)
        ckpt["generate_seconds"] = time.perf_counter() - t
        shard_sizes = sorted(
            (p.stat().st_size for p in (root / "base").glob("model-*.safetensors")), reverse=True
        )
        ckpt["largest_shard_bytes"] = shard_sizes[0]
        ckpt["checkpoint_bytes"] = sum(shard_sizes)
        print(
            f"checkpoint: {ckpt['checkpoint_bytes'] / 1e9:.2f} GB in {ckpt['shards']} shards, "
            f"largest {shard_sizes[0] / 1e9:.2f} GB ({ckpt['generate_seconds']:.0f} s to generate)",
            flush=True,
        )

        def variant(name: str, inputs: list[Path], cmd: list[str] | None = None) -> dict:
            os.sync()  # no writeback left over from the previous variant
            warm(*inputs)
            load = os.getloadavg()[0]
            row = measure(cmd or [*me, "--run", name, "--root", str(root), "--lam", str(args.lam)])
            row.pop("stdout")
            row["load_average_before"] = load
            rows[name] = row
            print(
                f"  {name:15s} {row['seconds']:7.1f} s   peak RSS {row['peak_rss'] / 1e9:6.2f} GB", flush=True
            )
            return row

        variant("difference", [root / "base", root / "tuned"])
        variant("stream", [root / "base", root / "vector"])
        phase = measure([*me, "--run", "phases", "--root", str(root)])
        phases_row = json.loads(next(x for x in phase["stdout"] if x.startswith("PHASES "))[7:])
        os.replace(root / "out", root / "stream-out")
        variant("stream-nocheck", [root / "base", root / "vector"])
        rmtree(root / "out")
        checks: dict[str, dict] = {}
        if not args.skip_naive:
            variant("naive", [root / "base", root / "vector"])
            checks["naive_vs_stream"] = compare(root / "out", root / "stream-out")
            rmtree(root / "out")
        mergekit = args.mergekit_venv / "bin" / "mergekit-yaml"
        if mergekit.is_file():
            config = root / "mergekit.yml"
            config.write_text(
                f"merge_method: task_arithmetic\nbase_model: {root / 'base'}\nmodels:\n"
                f"  - model: {root / 'tuned'}\n    parameters:\n      weight: {-args.lam}\ndtype: float32\n"
            )
            out_shard_params = str(args.shard_size // 4)
            variant(
                "mergekit",
                [root / "base", root / "tuned"],
                [
                    str(mergekit),
                    str(config),
                    str(root / "out"),
                    "--no-copy-tokenizer",
                    "--quiet",
                    "--out-shard-size",
                    out_shard_params,
                ],
            )
            checks["mergekit_vs_stream"] = compare(root / "out", root / "stream-out")
            version = subprocess.run(
                [
                    str(args.mergekit_venv / "bin" / "python"),
                    "-c",
                    "import importlib.metadata as m; print(m.version('mergekit'))",
                ],
                capture_output=True,
                text=True,
            )
            rows["mergekit"]["version"] = version.stdout.strip()
            rmtree(root / "out")
        else:
            print(
                f"mergekit skipped: {mergekit} not found. Create its venv (LGPL, not a project dependency):\n"
                f"  python3 -m venv {args.mergekit_venv}\n"
                f"  {args.mergekit_venv}/bin/pip install torch==2.13.0\n"
                f"  {args.mergekit_venv}/bin/pip install mergekit",
                flush=True,
            )
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            rmtree(root)

    ours = rows["stream"]
    result = {
        "benchmark": "streaming theta - lambda * delta on a synthetic sharded Llama-shaped checkpoint",
        "command": " ".join(["python benchmarks/vector_stream.py", *sys.argv[1:]]),
        "checkpoint": {
            "layers": args.layers,
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "vocab": args.vocab,
            "dtype": "float32",
            "tied": False,
            **ckpt,
        },
        "lambda": args.lam,
        "variants": rows,
        "stream_phases": phases_row,
        "checks": checks,
        "peak_rss_in_shards": ours["peak_rss"] / ckpt["largest_shard_bytes"],
        "peak_rss_in_shards_nocheck": rows["stream-nocheck"]["peak_rss"] / ckpt["largest_shard_bytes"],
        "machine": machine(),
        "notes": (
            "stream = stream_apply with every check; mergekit computes from base + fine-tuned, we from base + "
            "a precomputed vector (the 'difference' row is that one-off cost). Warm page cache for every "
            "variant; wall times include interpreter start and imports."
        ),
    }
    if "mergekit" in rows:
        result["speed_vs_mergekit"] = rows["mergekit"]["seconds"] / ours["seconds"]
        result["speed_vs_mergekit_nocheck"] = rows["mergekit"]["seconds"] / rows["stream-nocheck"]["seconds"]
        result["speed_vs_mergekit_incl_difference"] = rows["mergekit"]["seconds"] / (
            ours["seconds"] + rows["difference"]["seconds"]
        )
        result["peak_rss_vs_mergekit"] = ours["peak_rss"] / rows["mergekit"]["peak_rss"]
    if "naive" in rows:
        result["speed_vs_naive"] = rows["naive"]["seconds"] / ours["seconds"]
        result["peak_rss_vs_naive"] = ours["peak_rss"] / rows["naive"]["peak_rss"]
    path = write_json(args.output, result)

    print()
    print(f"{'variant':16s} {'seconds':>8s} {'peak RSS GB':>12s} {'RSS / shard':>12s}")
    for name, row in rows.items():
        print(
            f"{name:16s} {row['seconds']:8.1f} {row['peak_rss'] / 1e9:12.2f} "
            f"{row['peak_rss'] / ckpt['largest_shard_bytes']:12.2f}"
        )
    print("stream phases: " + ", ".join(f"{k} {v:.1f}" for k, v in phases_row.items()))
    for key in (
        "peak_rss_in_shards",
        "speed_vs_mergekit",
        "speed_vs_mergekit_nocheck",
        "speed_vs_mergekit_incl_difference",
        "speed_vs_naive",
        "peak_rss_vs_naive",
    ):
        if key in result:
            print(f"{key:34s} {result[key]:.2f}")
    for key, value in checks.items():
        print(f"{key:34s} {value}")
    print(f"-> {path}")


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
