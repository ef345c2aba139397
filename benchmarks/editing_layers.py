"""Which layers ROME, MEMIT and AlphaEdit edit on the embedded SmolLM2-135M: a layer sweep on the
*validation* region of CounterFact (docs/EDITING.md, "Layers for SmolLM2-135M"; issue #12).

``flearn bench`` (paper profile) evaluates the first 200 usable records of a dataset and takes
records[200:200 + n_val] as its validation split, so the sweep reads only records from index 200 on
(``--start``, refused below 200). Each candidate goes through the project's own edit step
(``recipes.edit.edit_stage``, every other setting at its default) and is scored by
``evaluation.evaluate`` against the unedited model's predictions (Locality):

- ROME: each record edited alone on the unedited model (the CounterFact protocol of ROME's paper), at
  each candidate layer; the metrics are means over the records.
- MEMIT: all ``--memit-records`` records in one batch over each candidate window of layers.

Efficacy: the new answer's mean token NLL below the old answer's on the edit prompt; Paraphrase score:
the same on the paraphrases; Reliability/Generality: teacher-forced token accuracy of the new answer on
the edit prompt/paraphrases; Locality: the neighbourhood prompts' argmax tokens unchanged (docs/DESIGN.md).
The table is printed and the JSON written to benchmarks/results/editing-layers.json after every row.

    nice -n 5 .venv/bin/python benchmarks/editing_layers.py [--rome-layers 1,3,5,8,12,16]
        [--rome-records 10] [--memit-windows 3-7,4-8,8-12] [--memit-records 50] [--editor alphaedit]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, repo_path, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-val.json"
BENCH_RECORDS = 200  # flearn bench's paper profile evaluates records[:200]: never swept on
METRICS = ("efficacy", "paraphrase", "reliability", "generality", "locality")


def relative(path: Path) -> str:
    """``path`` relative to the repository (``../shared/data/...`` for the shared data)."""
    return repo_path(path)


def window(text: str) -> tuple[int, ...]:
    """``"4-8"`` -> (4, 5, 6, 7, 8); ``"5"`` -> (5,)."""
    low, _, high = text.partition("-")
    return tuple(range(int(low), int(high or low) + 1))


def scores(result) -> dict[str, float | None]:
    summary = result.summary()
    return {m: summary[m]["mean"] for m in METRICS}


def mean_scores(rows: list[dict[str, float | None]]) -> dict[str, float | None]:
    out = {}
    for m in METRICS:
        values = [r[m] for r in rows if r[m] is not None]
        out[m] = sum(values) / len(values) if values else None
    return out


def edit_and_score(model, tokenizer, records, plan, reference):
    """ΔW of ``plan`` on ``records`` (one edit step), the edited model's metrics, then θ restored."""
    from flearning.editing.deltas import original_weights
    from flearning.evaluation.evaluate import evaluate
    from flearning.recipes.edit import apply_edit, edit_stage

    outcome = edit_stage(model, tokenizer, records, plan, progress=False)
    with original_weights(model, sorted(outcome.deltas)):
        apply_edit(model, outcome)
        result = evaluate(model, tokenizer, records, reference=reference, generation=False, progress=False)
    return scores(result), outcome


def format_row(name: str, metrics: dict[str, float | None], seconds: float) -> str:
    cells = " ".join(f"{metrics[m]:>11.1f}" if metrics[m] is not None else f"{'-':>11}" for m in METRICS)
    return f"{name:<22} {cells} {seconds:>9.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=DATA, help="CounterFact records (default: shared val file)"
    )
    parser.add_argument("--start", type=int, default=BENCH_RECORDS, help="first record swept (>= 200)")
    parser.add_argument("--rome-layers", default="1,3,5,8,12,16", help="comma-separated; empty: none")
    parser.add_argument("--rome-records", type=int, default=10)
    parser.add_argument(
        "--memit-windows", default="3-7,4-8,8-12", help="comma-separated low-high; empty: none"
    )
    parser.add_argument("--memit-records", type=int, default=50)
    parser.add_argument("--editor", default="memit", choices=("memit", "alphaedit"), help="for the windows")
    parser.add_argument("--out", default="editing-layers.json", help="file name under benchmarks/results/")
    args = parser.parse_args()
    if args.start < BENCH_RECORDS:
        parser.error(f"--start {args.start}: records below {BENCH_RECORDS} are the bench's test records")

    import torch

    from flearning.config.edit import EditSettings, edit_plan
    from flearning.data import load_dataset
    from flearning.evaluation.reference import reference_predictions
    from flearning.methods import METHODS
    from flearning.models import load_model

    torch.manual_seed(0)
    rome_layers = [int(x) for x in args.rome_layers.split(",") if x.strip()]
    windows = [window(x) for x in args.memit_windows.split(",") if x.strip()]
    records = load_dataset(args.data).records
    n = max(args.rome_records if rome_layers else 0, args.memit_records if windows else 0)
    swept = records[args.start : args.start + n]
    if len(swept) < n:
        raise SystemExit(f"{args.data}: {len(records)} records, the sweep needs {args.start + n}")
    model, tokenizer = load_model("smollm2-135m")
    reference = reference_predictions(model, tokenizer, swept)
    command = "benchmarks/editing_layers.py " + " ".join(sys.argv[1:])
    payload = {
        "command": command.strip(),
        "machine": machine(),
        "model": "smollm2-135m",
        "data": relative(args.data),
        "records": {"first": args.start, "rome": args.rome_records, "memit": args.memit_records},
        "metrics": list(METRICS),
        "rome": [],
        "windows": [],
    }
    header = f"{'edit':<22} " + " ".join(f"{m:>11}" for m in METRICS) + f" {'seconds':>9}"
    print(header, flush=True)
    for layer in rome_layers:
        plan = edit_plan(METHODS["rome"], EditSettings(layers=[layer]))
        per_record, losses, start = [], [], time.perf_counter()
        for record in swept[: args.rome_records]:
            metrics, outcome = edit_and_score(model, tokenizer, [record], plan, reference)
            per_record.append(metrics)
            losses.append(outcome.to_json()["value_loss_after"])
        seconds = time.perf_counter() - start
        row = {
            "layer": layer,
            "metrics": mean_scores(per_record),
            "per_record": per_record,
            "value_loss_after": losses,
            "seconds": round(seconds, 1),
            "settings": plan.to_json(),
        }
        payload["rome"].append(row)
        print(format_row(f"rome [{layer}]", row["metrics"], seconds), flush=True)
        write_json(args.out, payload)
    for layers in windows:
        plan = edit_plan(METHODS[args.editor], EditSettings(layers=list(layers)))
        start = time.perf_counter()
        metrics, outcome = edit_and_score(model, tokenizer, swept[: args.memit_records], plan, reference)
        seconds = time.perf_counter() - start
        row = {
            "editor": args.editor,
            "layers": list(layers),
            "metrics": metrics,
            "edit": outcome.to_json(),
            "seconds": round(seconds, 1),
            "settings": plan.to_json(),
        }
        payload["windows"].append(row)
        print(format_row(f"{args.editor} [{layers[0]}-{layers[-1]}]", metrics, seconds), flush=True)
        write_json(args.out, payload)
    print(f"wrote benchmarks/results/{args.out}")


if __name__ == "__main__":
    main()
