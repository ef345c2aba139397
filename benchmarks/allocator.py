"""Whether keeping freed memory inside the process speeds up training (issue #11's performance target; a
negative result: the project does not change glibc's settings): whole training stages of the embedded SmolLM2-135M at the F-Learning paper's stage
settings (lr 5e-5, batch 4 × accumulation 4 fused, Alpaca prompts) on the same ZsRE facts, full fine-tuning
and LoRA on q_proj/v_proj, under glibc's defaults (large blocks mmap'ed and
unmapped every step, so each step's fresh blocks page-fault) and with
``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=…`` (every block from the heap, and
freed memory kept there), each stage in its own child process, alternating
``--repeats`` times. Every child reports its stage's seconds, its peak resident memory and a hash of the
trained weights, which must be identical between the two settings.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/allocator.py [--facts 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, machine, write_json  # noqa: E402

KEEP = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295"
DATA = REPO.parent / "shared" / "data" / "zsre" / "zsre_dev-2.8k.json"


def child(stage: str, facts: int, epochs: float) -> None:
    """One training stage in this process; prints its measurements as one JSON line."""
    import hashlib
    import resource

    from flearning.data import load_records
    from flearning.models import load_model
    from flearning.training import LoraSettings, TrainConfig, train

    base, tokenizer = load_model("smollm2-135m")
    records = load_records(DATA)[:facts]
    pairs = [(r.prompt, r.target_new) for r in records]
    extra = (
        {"lora": LoraSettings(r=8, alpha=16, target_modules=["q_proj", "v_proj"])} if stage == "lora" else {}
    )
    cfg = TrainConfig(
        lr=5e-5,
        epochs=epochs,
        batch_size=4,
        grad_accum=4,
        template="alpaca",
        fused_accumulation=True,
        **extra,
    )
    result = train(base, tokenizer, pairs, cfg, progress=False)
    digest = hashlib.sha256()
    for name, param in sorted(result.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(param.detach().float().contiguous().numpy().tobytes())
    print(
        json.dumps(
            {
                "seconds": result.seconds,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "weights_sha256": digest.hexdigest(),
                "final_loss": result.losses[-1],
                "steps": result.steps,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=64)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.facts, args.epochs)
        return
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeats):
        for stage in ("full", "lora"):
            for setting in ("0", "1"):
                env = {**os.environ, "GLIBC_TUNABLES": KEEP} if setting == "1" else dict(os.environ)
                argv = [sys.executable, __file__, "--child", stage, "--facts", str(args.facts)]
                argv += ["--epochs", str(args.epochs)]
                out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
                runs.setdefault((stage, setting), []).append(json.loads(out.strip().splitlines()[-1]))
    rows = []
    for stage in ("full", "lora"):
        off, on = runs[(stage, "0")], runs[(stage, "1")]
        hashes = {r["weights_sha256"] for r in off + on}
        for setting, name in (("0", "glibc defaults"), ("1", "keep freed memory")):
            got = runs[(stage, setting)]
            rows.append(
                {
                    "stage": stage,
                    "setting": name,
                    "steps": got[0]["steps"],
                    "seconds": [round(r["seconds"], 2) for r in got],
                    "median_seconds": round(statistics.median(r["seconds"] for r in got), 2),
                    "peak_rss_mib": [round(r["peak_rss_mib"]) for r in got],
                    "median_peak_rss_mib": round(statistics.median(r["peak_rss_mib"] for r in got)),
                    "final_loss": got[0]["final_loss"],
                }
            )
        rows[-1]["time_ratio"] = round(rows[-1]["median_seconds"] / rows[-2]["median_seconds"], 3)
        rows[-1]["peak_rss_ratio"] = round(
            rows[-1]["median_peak_rss_mib"] / rows[-2]["median_peak_rss_mib"], 3
        )
        rows[-1]["weights_identical"] = len(hashes) == 1
    print(f"{'stage':6s} {'setting':18s} {'median s':>9s} {'peak MiB':>9s}  ratio (time, memory)  identical")
    for row in rows:
        ratio = f"×{row['time_ratio']:.3f}, ×{row['peak_rss_ratio']:.3f}" if "time_ratio" in row else ""
        same = str(row.get("weights_identical", ""))
        print(
            f"{row['stage']:6s} {row['setting']:18s} {row['median_seconds']:9.2f} "
            f"{row['median_peak_rss_mib']:9d}  {ratio:20s}  {same}"
        )
    import torch

    payload = {
        "command": ("benchmarks/allocator.py " + " ".join(sys.argv[1:])).strip(),
        "machine": machine(),
        "omp_threads": os.environ.get("OMP_NUM_THREADS") or str(torch.get_num_threads()),
        "data": os.path.relpath(DATA, REPO),
        "glibc_tunables": KEEP,
        "facts": args.facts,
        "epochs": args.epochs,
        "rows": rows,
    }
    write_json("allocator.json", payload)
    print("wrote benchmarks/results/allocator.json")


if __name__ == "__main__":
    main()
