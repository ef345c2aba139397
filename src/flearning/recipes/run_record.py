"""What ``flearn update`` records about a run: ``run.json`` and the output's model card.

``run.json`` holds the resolved config, both stages' settings, the model and data (path, hash, counts),
library versions, timings, per-step losses and the metrics before and after; the model card
(``README.md``) summarises it for a reader of the output directory.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flearning.config import StagePlan, UpdateConfig
from flearning.methods import Method
from flearning.recipes.work_dir import stages_json

if TYPE_CHECKING:
    from flearning.data import LoadedDataset
    from flearning.evaluation import EvalResult
    from flearning.recipes.algorithm import MethodOutcome


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ["f-learning", "torch", "transformers", "peft", "accelerate", "safetensors", "pydantic"]
    versions = {}
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    versions["python"] = platform.python_version()
    return versions


def resumed_stages(work: Path | None) -> dict[str, str]:
    """What an earlier, interrupted process left in the work directory ``work`` for this run to reuse, per
    stage: a finished forget stage (Δ_old), a finished learning stage, or a stage's last checkpoint.
    Empty when nothing is reused (a fresh run): then ``timings_seconds`` cover the whole run."""
    from flearning.training.checkpoint import checkpoint_dirs

    if work is None:
        return {}
    done = "finished by an earlier process (its training time is not in timings_seconds)"
    resumed: dict[str, str] = {}
    if (work / "knowledge_vector" / "vector.json").is_file():
        resumed["forget"] = f"{done}; Δ_old read from the work directory"
    for stage in ("forget", "learn"):
        if stage in resumed:
            continue
        found = checkpoint_dirs(work / stage)
        if not found:
            continue
        step, final, _ = found[-1]
        resumed[stage] = (
            f"{done}; read from its final checkpoint (optimizer step {step})"
            if final
            else f"resumed from optimizer step {step}, saved by an earlier process (timings_seconds count "
            "only the steps after it)"
        )
    return resumed


def data_record(path: Path, dataset: LoadedDataset) -> dict[str, Any]:
    """One data file as ``run.json`` describes it (a table also by its reader and split: ``data.sources``)."""
    record = {
        "path": str(path),
        "format": dataset.format,
        "sha256": dataset.sha256,
        "records": len(dataset.records),
        "dropped": dataset.dropped,
    }
    if dataset.reader != "json":
        record.update(reader=dataset.reader, split=dataset.split)
    return record


def run_summary(
    cfg: UpdateConfig,
    method: Method,
    plan: StagePlan,
    *,
    model: dict[str, Any],
    data: dict[str, dict[str, Any]],
    timings: dict[str, float],
    outcome: MethodOutcome,
    before: EvalResult | None,
    after: EvalResult | None,
    resumed: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The content of ``run.json`` (also the model card's input and ``update``'s summary).

    ``model``: source, resolved path and fingerprint; ``data``: ``{"old", "new"}`` of ``data_record``
    (and how a split pair was joined, what was truncated); ``resumed``: stage → how it was resumed from
    the work of an earlier process (empty for a run done in one process). ``timings_seconds`` are this
    process's; when stages were resumed, ``timings_note`` says so.
    """
    import torch

    resumed = dict(resumed or {})
    notes = {}
    if resumed:
        notes["timings_note"] = (
            "timings_seconds count this process only; the stages in 'resumed' ran partly or wholly in an "
            "earlier process, whose time is not included"
        )
    return {
        "method": method.name,
        "method_summary": method.summary,
        "lambda": cfg.lam if method.forget else None,
        "config": cfg.model_dump(mode="json", by_alias=True),
        "stages": stages_json(method, plan),
        "model": model,
        "data": data,
        "seed": cfg.seed,
        "versions": library_versions(),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "timings_seconds": {k: round(v, 3) for k, v in timings.items()},
        **notes,
        "resumed": resumed,
        # how the learning stage ended: epochs trained and kept, accuracy (and Locality) per epoch
        "learn_schedule": outcome.learn.to_json(plan.stop) if outcome.learn is not None else None,
        "tokens": outcome.tokens,
        "final_loss": {k: (v[-1] if v else None) for k, v in outcome.losses.items()},
        # each stage's loss at every optimizer step: a resumed run's trace equals an uninterrupted one's
        "losses": outcome.losses,
        "metrics_before": before.summary() if before else None,
        "metrics_after": after.summary() if after else None,
    }


def _fmt(metrics: dict[str, Any] | None, name: str) -> str:
    if not metrics or name not in metrics or metrics[name].get("mean") is None:
        return "–"
    return f"{metrics[name]['mean']:.1f}"


def model_card(summary: dict[str, Any]) -> str:
    """A short model card for the output directory."""
    before, after = summary.get("metrics_before"), summary.get("metrics_after")
    names = list((after or before or {}).keys())
    rows = "\n".join(f"| {n} | {_fmt(before, n)} | {_fmt(after, n)} |" for n in names)
    if before is not None and after is not None:  # the report is written exactly then
        metrics = f"""| metric (×100) | before | after |
|---|---|---|
{rows}

Metrics are teacher-forced token accuracies unless named otherwise; Locality compares the updated
model's argmax predictions with the model before the update (see `report/summary.md` for definitions)."""
    else:
        metrics = (
            "The before/after evaluation was skipped (`--no-eval`, `evaluate: false`), so this directory has no\n"
            "`report/`: score the model with `flearn eval`."
        )
    vectors = ""
    if summary["config"].get("save_vectors", True):
        vectors = (
            " `update_vector/` replays the update on the\noriginal model (`flearn vector apply --add 1`)"
            + (
                "; `knowledge_vector/` is Δ_old of the old facts."
                if summary.get("lambda") is not None
                else "."
            )
        )
    lam = f", λ = {summary['lambda']}" if summary.get("lambda") is not None else ""
    data = summary["data"]
    schedule = summary.get("learn_schedule") or {}
    learned = ""
    if schedule.get("history"):
        accuracy = ", ".join(f"{100 * r['accuracy']:.0f}" for r in schedule["history"])
        learned = (
            f"\nLearning stage: {schedule['epochs_trained']} epochs, kept epoch {schedule['kept_epoch']}; it "
            f"{schedule['why']}. Accuracy on the new facts after each epoch (×100): {accuracy}.\n"
        )
    return f"""---
library_name: transformers
tags: [f-learning, knowledge-editing]
---
# Updated model: {summary["model"]["source"]} with `{summary["method"]}`{lam}

Produced by f-learning {summary["versions"].get("f-learning")} ({summary["method_summary"]}).
Old facts: `{data["old"]["path"]}` ({data["old"]["records"]} records, sha256 {data["old"]["sha256"][:12]}…);
new facts: `{data["new"]["path"]}` ({data["new"]["records"]} records). Seed {summary["seed"]}.
{learned}
{metrics}
Load with `AutoModelForCausalLM.from_pretrained(this_dir)`.{vectors}
"""
