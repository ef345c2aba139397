"""What the locate-then-edit methods cost and reach on the embedded SmolLM2-135M, next to fine-tuning
(issue #12; README "Benchmarks" and "Locate-then-edit").

On CounterFact validation records (``--first`` 400 on: the bench's test records are the first 200 and
the layer sweep, ``editing_layers.py``, read 200 to 249), at the default layers (``config.edit``):

- covariance: C = E[k kᵀ] of ROME's layer and of MEMIT's window (one pass for all its layers), cold
  (a fresh cache directory) and cached (the second call, read from that directory);
- ROME: ``--rome-records`` single edits, each on the unedited model (``recipes.edit.edit_stage`` then
  ``evaluation.evaluate``): the time of one edit (median) and the mean metrics;
- MEMIT, AlphaEdit and ``ft`` (full fine-tuning, the default learning stage: until teacher-forced
  accuracy 0.95, at most 20 epochs) on the same ``--records`` facts in one update each, through
  ``recipes.update.update`` (``flearn update --method M``; no output directory, no perplexity, no
  generation): the time of the edit or learning step and the metrics after.

Metrics (docs/DESIGN.md): Efficacy (new answer's mean token NLL below the old's, on the edit prompt),
Paraphrase score (the same on the paraphrase), Reliability and Generality (teacher-forced accuracy of
the new answer), Locality (neighbourhood argmax unchanged). The JSON is rewritten after every row.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/editing.py [--records 200] [--rome-records 10]
        [--methods memit,alphaedit,ft] [--no-covariance]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_json  # noqa: E402
from editing_layers import DATA, METRICS, edit_and_score, format_row, mean_scores, relative  # noqa: E402

FIRST = 400  # after the bench's test records (0-199) and the layer sweep's (200-249)


def covariance_rows(model, tokenizer) -> list[dict]:
    """C of ROME's layer and of MEMIT's window, cold in a fresh cache directory, then cached."""
    from flearning.config.edit import MEMIT_LAYERS, ROME_LAYERS, EditSettings, edit_plan
    from flearning.editing import second_moments
    from flearning.editing.architectures import architecture_of
    from flearning.methods import METHODS
    from flearning.models import model_fingerprint
    from flearning.recipes.edit import covariance_settings

    arch = architecture_of(model)
    fingerprint = model_fingerprint(model)
    plan = edit_plan(METHODS["memit"], EditSettings())
    rows = []
    for name, layers in (("rome", ROME_LAYERS), ("memit", MEMIT_LAYERS)):
        with tempfile.TemporaryDirectory(prefix="flearn-cov-") as cache:
            settings = dataclasses.replace(covariance_settings(plan, model), cache_dir=cache)
            modules = [arch.rewrite_name(layer) for layer in layers]
            row = {"editor": name, "layers": list(layers)}
            for when in ("cold", "cached"):
                start = time.perf_counter()
                second_moments(model, tokenizer, modules, settings, fingerprint=fingerprint)
                row[f"{when}_seconds"] = round(time.perf_counter() - start, 2)
            meta = json.loads(next(Path(cache).glob("*.json")).read_text())
            row.update(tokens=meta["tokens"], corpus=meta["corpus"], max_length=meta["max_length"])
            rows.append(row)
            print(
                f"covariance {name} {list(layers)}: cold {row['cold_seconds']:.1f} s, cached "
                f"{row['cached_seconds']:.2f} s ({row['tokens']} tokens)",
                flush=True,
            )
    return rows


def rome_row(model, tokenizer, records) -> dict:
    """Single ROME edits, each on the unedited model."""
    from flearning.config.edit import EditSettings, edit_plan
    from flearning.evaluation.reference import reference_predictions
    from flearning.methods import METHODS

    plan = edit_plan(METHODS["rome"], EditSettings())
    reference = reference_predictions(model, tokenizer, records)
    per_record, seconds = [], []
    for record in records:
        metrics, outcome = edit_and_score(model, tokenizer, [record], plan, reference)
        per_record.append(metrics)
        seconds.append(outcome.seconds)
    return {
        "method": "rome",
        "edits": len(records),
        "protocol": "each record edited alone on the unedited model",
        "layers": list(plan.layers),
        "metrics": mean_scores(per_record),
        "per_record": per_record,
        "edit_seconds": round(statistics.median(seconds), 2),
        "edit_seconds_each": [round(s, 2) for s in seconds],
        "seconds": round(sum(seconds), 1),
    }


def memit_rows(model, tokenizer, records, lambdas: list[float]) -> list[dict]:
    """MEMIT on all ``records`` in one batch at the default layers, as ``edit_stage`` runs it (the same
    calls: z by the value optimisation at the last layer's block output, then the layer loop), with z
    optimised once and spread with each λ of ``lambdas`` (the first is the default): z does not depend
    on λ, so the other λ cost one layer loop each. Each ΔW is scored on the edited model, then θ is
    restored."""
    from flearning.config.edit import EditSettings, edit_plan
    from flearning.editing import CONTEXT_PREFIXES, apply_deltas, second_moments
    from flearning.editing.architectures import architecture_of
    from flearning.editing.deltas import original_weights
    from flearning.editing.memit import memit_update, spread_over_layers
    from flearning.editing.requests import as_requests
    from flearning.editing.values import ValueSettings, optimise_values
    from flearning.evaluation.evaluate import evaluate
    from flearning.evaluation.reference import reference_predictions
    from flearning.methods import METHODS
    from flearning.recipes.edit import covariance_settings

    plan = edit_plan(METHODS["memit"], EditSettings())
    layers = list(plan.layers)
    arch = architecture_of(model)
    reference = reference_predictions(model, tokenizer, records)
    start = time.perf_counter()
    modules = [arch.rewrite_name(layer) for layer in layers]
    found = second_moments(model, tokenizer, modules, covariance_settings(plan, model))
    moments = {layer: found[m] for layer, m in zip(layers, modules, strict=True)}
    requests = as_requests(records)
    values = optimise_values(
        model,
        tokenizer,
        requests,
        arch.block_name(layers[-1]),
        prefixes=CONTEXT_PREFIXES,
        settings=ValueSettings(**plan.values),
    )
    z_seconds = time.perf_counter() - start
    rows = []
    for lam in lambdas:
        start = time.perf_counter()

        def solve(layer, i, keys, residual, lam=lam):
            return memit_update(residual, keys, moments[layer], lam)

        done = spread_over_layers(
            model, tokenizer, arch, requests, layers, values.target, solve, prefixes=CONTEXT_PREFIXES
        )
        spread_seconds = time.perf_counter() - start
        with original_weights(model, sorted(done.deltas)):
            apply_deltas(model, done.deltas)
            result = evaluate(
                model, tokenizer, records, reference=reference, generation=False, progress=False
            )
        summary = result.summary()
        rows.append(
            {
                "method": "memit",
                "edits": len(records),
                "protocol": "all facts in one batch (edit_stage's calls, z shared between the λ)",
                "layers": layers,
                "mom2_update_weight": lam,
                "default": lam == plan.mom2_update_weight,
                "metrics": {m: summary[m]["mean"] for m in METRICS},
                "value_loss_before": sum(v[0] for v in values.losses) / len(values.losses),
                "value_loss_after": sum(v[-1] for v in values.losses) / len(values.losses),
                "value_steps": sum(values.steps) / len(values.steps),
                "z_seconds": round(z_seconds, 1),
                "spread_seconds": round(spread_seconds, 1),
                "edit_seconds": round(z_seconds + spread_seconds, 1),
            }
        )
    return rows


def update_row(method: str, data: Path, n: int) -> dict:
    """One ``flearn update --method METHOD`` on all the facts (no output, no perplexity, no generation)."""
    from flearning.config import UpdateConfig
    from flearning.recipes.update import update

    cfg = UpdateConfig(method=method, data=data, seed=0, perplexity=None, generation=False)
    start = time.perf_counter()
    summary = update(cfg, progress=False).summary
    total = time.perf_counter() - start
    timings = summary["timings_seconds"]
    step = "edit" if "edit" in timings else "learn_train"
    after = summary["metrics_after"]
    row = {
        "method": method,
        "edits": n,
        "protocol": "all facts in one update",
        "metrics": {m: after[m]["mean"] for m in METRICS},
        "metrics_before": {m: summary["metrics_before"][m]["mean"] for m in METRICS},
        "step": step,
        "edit_seconds": round(timings[step], 1),
        "seconds": round(total, 1),
        "timings_seconds": timings,
    }
    if "edit" in summary:
        row["edit"] = summary["edit"]
    if summary.get("learn_schedule"):
        row["epochs_trained"] = summary["learn_schedule"].get("epochs_trained")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=DATA, help="CounterFact records (default: shared val file)"
    )
    parser.add_argument("--first", type=int, default=FIRST, help="first record used (>= 250)")
    parser.add_argument("--records", type=int, default=200, help="facts of the MEMIT/AlphaEdit/ft updates")
    parser.add_argument("--rome-records", type=int, default=10, help="single ROME edits (0: none)")
    parser.add_argument("--memit-lambdas", default="15000,5000,1500", help="MEMIT's λ, the default first")
    parser.add_argument("--methods", default="ft,alphaedit", help="through flearn update; comma-separated")
    parser.add_argument("--no-covariance", action="store_true", help="skip the covariance timing")
    parser.add_argument("--out", default="editing.json", help="file name under benchmarks/results/")
    args = parser.parse_args()
    if args.first < 250:
        parser.error(f"--first {args.first}: records below 250 are the bench's or the layer sweep's")

    from flearning.config.edit import MEMIT_LAYERS, ROME_LAYERS
    from flearning.data import load_dataset
    from flearning.models import load_model

    raw = json.loads(args.data.read_text())
    chosen = raw[args.first : args.first + args.records]
    if len(chosen) < args.records:
        raise SystemExit(f"{args.data}: {len(raw)} records, the benchmark needs {args.first + args.records}")
    scratch = Path(tempfile.mkdtemp(prefix="flearn-editing-"))
    data = scratch / f"counterfact-val-{args.first}-{args.first + args.records}.json"
    data.write_text(json.dumps(chosen))
    records = load_dataset(data).records
    payload = {
        "command": ("benchmarks/editing.py " + " ".join(sys.argv[1:])).strip(),
        "machine": machine(),
        "model": "smollm2-135m",
        "data": relative(args.data),
        "records": {"first": args.first, "count": args.records, "rome": args.rome_records},
        "layers": {"rome": list(ROME_LAYERS), "memit": list(MEMIT_LAYERS), "alphaedit": list(MEMIT_LAYERS)},
        "metrics": list(METRICS),
        "covariance": [],
        "methods": [],
    }
    model, tokenizer = load_model("smollm2-135m")
    if not args.no_covariance:
        payload["covariance"] = covariance_rows(model, tokenizer)
        write_json(args.out, payload)
    header = f"{'method':<22} " + " ".join(f"{m:>11}" for m in METRICS) + f" {'seconds':>9}"
    rows = payload["methods"]
    if args.rome_records:
        row = rome_row(model, tokenizer, records[: args.rome_records])
        rows.append(row)
        print(header, flush=True)
        print(format_row(f"rome x{row['edits']} (1 each)", row["metrics"], row["edit_seconds"]), flush=True)
        write_json(args.out, payload)
    lambdas = [float(x) for x in args.memit_lambdas.split(",") if x.strip()]
    if lambdas:
        for row in memit_rows(model, tokenizer, records, lambdas):
            rows.append(row)
            name = f"memit x{row['edits']} λ {row['mom2_update_weight']:g}"
            print(format_row(name, row["metrics"], row["edit_seconds"]), flush=True)
        write_json(args.out, payload)
    del model
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        row = update_row(method, data, len(records))
        rows.append(row)
        print(format_row(f"{method} x{row['edits']}", row["metrics"], row["edit_seconds"]), flush=True)
        write_json(args.out, payload)
    print(f"wrote benchmarks/results/{args.out}")


if __name__ == "__main__":
    main()
