"""Evaluation throughput: batched ``evaluate`` vs one record at a time (the EasyEdit way).

Both paths compute Reliability, Generality, Locality (reference = the same model), Old retention,
Efficacy and, unless ``--no-generation``, Generation exact match, on CounterFact records with the
embedded SmolLM2-135M. The one-at-a-time path runs one unpadded forward per record per metric (Efficacy:
two, target_new and target_old) with full logits, and one unpadded ``generate`` per record. The batched
path also computes the Paraphrase score (it costs one more packed target per rephrase row), which is
extra work on its side only. Reference predictions are recomputed (caches off) and timed.

Usage::

    .venv/bin/python benchmarks/eval_throughput.py [--n 500] [--batch-size 16] [--no-generation]

Writes ``benchmarks/results/eval_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "counterfact" / "counterfact-val.json"
DEFAULT_OUT = HERE / "results" / "eval_throughput.json"
COMPARED = ["reliability", "generality", "locality", "old_retention", "efficacy", "gen_exact_match"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="CounterFact records (default 500)")
    from flearning.evaluation.definitions import DEFAULT_BATCH_SIZE

    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"rows per forward pass (default {DEFAULT_BATCH_SIZE}, evaluate's default)",
    )
    parser.add_argument(
        "--generation-batch-size",
        type=int,
        default=None,
        help="rows per generate call (default: the batch size)",
    )
    parser.add_argument("--no-generation", action="store_true", help="skip Generation exact match")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CounterFact file (EasyEdit format)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="result JSON")
    return parser.parse_args(argv)


def max_abs_diffs(batched: list[dict], single: list[dict], metrics: list[str]) -> dict[str, float]:
    """Largest |batched - single| per metric over records (a None on one side only counts as 1)."""
    out = {}
    for metric in metrics:
        worst = 0.0
        for a, b in zip(batched, single, strict=True):
            x, y = a.get(metric), b.get(metric)
            if x is None and y is None:
                continue
            worst = max(worst, 1.0 if x is None or y is None else abs(x - y))
        out[metric] = worst
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.is_file():
        print(f"data file not found: {args.data}", file=sys.stderr)
        return 1

    import torch
    import transformers
    from rich.console import Console
    from rich.table import Table

    from flearning.data import load_records
    from flearning.evaluation import evaluate_oracle, reference_predictions
    from flearning.evaluation.evaluate import evaluate
    from flearning.evaluation.reference import clear_memory_cache
    from flearning.models import load_model

    console = Console()
    load_before = os.getloadavg()
    generation = not args.no_generation
    records = load_records(args.data, "counterfact", limit=args.n)
    model, tokenizer = load_model()
    console.print(
        f"{len(records)} records, batch size {args.batch_size}, torch threads {torch.get_num_threads()}"
    )

    clear_memory_cache()
    start = time.perf_counter()
    ref = reference_predictions(
        model, tokenizer, records, batch_size=args.batch_size, use_cache=False, progress=True
    )
    ref_seconds = time.perf_counter() - start
    batched = evaluate(
        model,
        tokenizer,
        records,
        reference=ref,
        batch_size=args.batch_size,
        generation_batch_size=args.generation_batch_size,
        generation=generation,
        progress=True,
    )
    batched_seconds = time.perf_counter() - start

    start = time.perf_counter()
    single = evaluate_oracle(
        model,
        tokenizer,
        records,
        reference_model=model,
        generation=generation,
        paraphrase=False,
        progress=True,
    )
    single_seconds = time.perf_counter() - start

    metrics = [m for m in COMPARED if generation or m != "gen_exact_match"]
    diffs = max_abs_diffs(batched.records, single.records, metrics)
    max_diff = max(diffs.values())
    generated_identical = sum(
        a.get("generated") == b.get("generated") for a, b in zip(batched.records, single.records, strict=True)
    )
    b_sum, s_sum = batched.summary(), single.summary()
    b_gen = batched.meta["seconds"].get("generation", 0.0)
    s_gen = single.meta["seconds"]["generation"]
    speedup = single_seconds / batched_seconds
    tf_speedup = (single_seconds - s_gen) / (batched_seconds - b_gen)

    table = Table(title=f"Evaluation of {len(records)} CounterFact records, SmolLM2-135M fp32 CPU")
    table.add_column("path")
    table.add_column("seconds", justify="right")
    table.add_column("records/s", justify="right")
    table.add_column("teacher-forced s", justify="right")
    table.add_column("generation s", justify="right")
    table.add_row(
        "one at a time",
        f"{single_seconds:.1f}",
        f"{len(records) / single_seconds:.2f}",
        f"{single_seconds - s_gen:.1f}",
        f"{s_gen:.1f}",
    )
    table.add_row(
        f"batched ({args.batch_size})",
        f"{batched_seconds:.1f}",
        f"{len(records) / batched_seconds:.2f}",
        f"{batched_seconds - b_gen:.1f}",
        f"{b_gen:.1f}",
    )
    console.print(table)
    metric_table = Table(title="metric means x100 (max |diff| per record)")
    for col in ("metric", "batched", "one at a time", "max abs diff"):
        metric_table.add_column(col, justify="right" if col != "metric" else "left")
    for m in metrics:
        metric_table.add_row(m, f"{b_sum[m]['mean']:.2f}", f"{s_sum[m]['mean']:.2f}", f"{diffs[m]:.2e}")
    console.print(metric_table)
    console.print(
        f"speed-up: {speedup:.1f}x overall, {tf_speedup:.1f}x teacher-forced metrics "
        f"(incl. reference), {s_gen / b_gen if b_gen else float('nan'):.1f}x generation; "
        f"max abs metric diff {max_diff:.2e}; identical generations {generated_identical}/{len(records)}"
    )

    result = {
        "benchmark": "eval_throughput",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": os.path.relpath(args.data, HERE.parent),  # relative to the repository
        "model": "smollm2-135m (embedded, fp32)",
        "n": len(records),
        "batch_size": args.batch_size,
        "generation_batch_size": batched.meta["generation_batch_size"],
        "generation": generation,
        "metrics_compared": metrics,
        "speedup": round(speedup, 3),
        "speedup_teacher_forced": round(tf_speedup, 3),
        "speedup_generation": round(s_gen / b_gen, 3) if b_gen else None,
        "max_abs_metric_diff": max_diff,
        "max_abs_diff_per_metric": diffs,
        "generated_identical": generated_identical,
        "seconds": {
            "batched_total": round(batched_seconds, 3),
            "batched_reference": round(ref_seconds, 3),
            "batched_phases": batched.meta["seconds"],
            "one_at_a_time_total": round(single_seconds, 3),
            "one_at_a_time_generation": s_gen,
        },
        "one_at_a_time_calls": {
            "forward": single.meta["forward_calls"],
            "generate": single.meta["generate_calls"],
        },
        "batched_probes": batched.meta["probes"],
        "means_x100": {
            "batched": {m: b_sum[m]["mean"] for m in metrics},
            "one_at_a_time": {m: s_sum[m]["mean"] for m in metrics},
        },
        "torch_threads": torch.get_num_threads(),
        # Other processes on this 2-core machine slow both paths (and thread oversubscription can slow
        # them very unevenly): the load average shows whether the machine was quiet.
        "load_average_1m": {"start": round(load_before[0], 2), "end": round(os.getloadavg()[0], 2)},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
