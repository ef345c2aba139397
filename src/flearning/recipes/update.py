"""The ``flearn update`` recipe: setup → (evaluate θ) → forget → learn → evaluate θ* → save.

Output directory (written atomically):
    config.json, model.safetensors, tokenizer files   the updated model θ* (Hugging Face format)
    knowledge_vector/                                  Δ_old of F-Learning methods (safetensors + JSON)
    update_vector/                                     θ* − θ: apply it to θ to replay the whole update
    adapter/                                           the LoRA adapter of a LoRA learning stage
    report/                                            evaluation of θ (before) and θ* (after)
    run.json                                           resolved config, versions, hashes, timings, metrics
    README.md                                          model card
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flearning.config import UpdateConfig, default_stage
from flearning.errors import FlearnError
from flearning.recipes.flearning import MethodOutcome, StagePlan, learn_config, run_method
from flearning.recipes.methods import get_method

log = logging.getLogger(__name__)


@dataclass
class UpdateResult:
    out: Path | None
    summary: dict[str, Any]  # run.json content
    outcome: MethodOutcome


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


def stage_plan(cfg: UpdateConfig) -> StagePlan:
    """Both stages' TrainConfigs for the configured method."""
    method = get_method(cfg.method)
    full = default_stage("full", cfg.lora, cfg.seed, cfg.learn.given())
    lora = default_stage("lora", cfg.lora, cfg.seed, cfg.learn.given())
    forget = None
    if method.forget is not None:
        forget = default_stage(method.forget, cfg.lora, cfg.seed, cfg.forget.given())
    return StagePlan(learn=learn_config(method, full, lora, cfg.linf_bound), forget=forget, lam=cfg.lam)


def update(config: UpdateConfig | None = None, *, progress: bool = True, **fields: Any) -> UpdateResult:
    """Replace old facts by new ones in a causal LM and write the result (Python API of ``flearn update``).

    Args:
        config: an ``UpdateConfig``; or pass its fields as keyword arguments
            (``update(model=..., data=..., method="flearning-ft", out=...)``; ``lam`` is λ).
        progress: progress bars.
    Returns:
        ``UpdateResult`` with the output directory, the run summary and the in-memory updated model.
    """
    import torch

    from flearning.data import load_dataset
    from flearning.models import load_model, model_fingerprint, resolve_model
    from flearning.outputs import check_output_dir

    cfg = config if config is not None else UpdateConfig(**fields)
    method = get_method(cfg.method)
    plan = stage_plan(cfg)
    timings: dict[str, float] = {}

    # --- setup: everything that can fail on bad input fails before any training.
    old_file, new_file = cfg.data_files()
    old_ds = load_dataset(old_file, cfg.format, limit=cfg.limit)
    new_ds = old_ds if new_file == old_file else load_dataset(new_file, cfg.format, limit=cfg.limit)
    if not old_ds.records or not new_ds.records:
        raise FlearnError("no usable facts after loading (every record was dropped)")
    old_pairs = [(r.prompt, r.target_old) for r in old_ds.records]
    new_pairs = [(r.prompt, r.target_new) for r in new_ds.records]
    model_source = resolve_model(cfg.model)
    out = None
    if cfg.out is not None:
        local_model = Path(model_source)
        out = check_output_dir(cfg.out, overwrite=cfg.overwrite, protected=[local_model] if local_model.exists() else [])

    start = time.perf_counter()
    model, tokenizer = load_model(model_source, trust_remote_code=cfg.trust_remote_code)
    timings["load_model"] = time.perf_counter() - start
    base_fp = model_fingerprint(model)
    theta = {k: v.detach().clone() for k, v in model.named_parameters()} if cfg.out is not None else None

    before = reference = None
    if cfg.evaluate:
        from flearning.evaluation import evaluate, reference_predictions

        start = time.perf_counter()
        reference = reference_predictions(model, tokenizer, new_ds.records, batch_size=cfg.eval_batch_size)
        before = evaluate(
            model, tokenizer, new_ds.records, reference=reference, batch_size=cfg.eval_batch_size,
            generation=cfg.generation, progress=progress,
        )
        timings["evaluate_before"] = time.perf_counter() - start

    vector_meta = {
        "base_model": cfg.model,
        "base_fingerprint": base_fp,
        "method": method.name,
        "data_hash": old_ds.sha256,
        "hyperparameters": plan.forget.model_dump(mode="json") if plan.forget else {},
    }
    with _staging(out) as stage_dir:
        outcome = run_method(
            method, model, tokenizer, old_pairs, new_pairs, plan, progress=progress,
            vector_metadata=vector_meta, adapter_dir=(stage_dir / "adapter") if stage_dir else None,
        )
        timings.update(outcome.timings)
        updated = outcome.model
        finite = all(torch.isfinite(p).all() for p in updated.parameters())
        if not finite:
            raise FlearnError("the updated model has non-finite weights; nothing was written")

        after = None
        if cfg.evaluate:
            start = time.perf_counter()
            after = evaluate(
                updated, tokenizer, new_ds.records, reference=reference, batch_size=cfg.eval_batch_size,
                generation=cfg.generation, progress=progress,
            )
            timings["evaluate_after"] = time.perf_counter() - start

        summary = {
            "method": method.name,
            "method_summary": method.summary,
            "lambda": cfg.lam if method.forget else None,
            "config": cfg.model_dump(mode="json", by_alias=True),
            "stages": {
                "forget": plan.forget.model_dump(mode="json") if method.forget and plan.forget else None,
                "learn": plan.learn.model_dump(mode="json"),
            },
            "model": {"source": cfg.model, "path": model_source, "fingerprint": base_fp},
            "data": {
                "old": {"path": str(old_file), "format": old_ds.format, "sha256": old_ds.sha256,
                        "records": len(old_ds.records), "dropped": old_ds.dropped},
                "new": {"path": str(new_file), "format": new_ds.format, "sha256": new_ds.sha256,
                        "records": len(new_ds.records), "dropped": new_ds.dropped},
            },
            "seed": cfg.seed,
            "versions": library_versions(),
            "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
            "timings_seconds": {k: round(v, 3) for k, v in timings.items()},
            "tokens": outcome.tokens,
            "final_loss": {k: (v[-1] if v else None) for k, v in outcome.losses.items()},
            "metrics_before": before.summary() if before else None,
            "metrics_after": after.summary() if after else None,
        }

        if stage_dir is not None:
            start = time.perf_counter()
            _save(stage_dir, cfg, updated, tokenizer, outcome, theta, vector_meta, before, after, summary)
            summary["timings_seconds"]["save"] = round(time.perf_counter() - start, 3)
            (stage_dir / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    if out is not None:
        log.info("wrote %s", out)
    return UpdateResult(out=out, summary=summary, outcome=outcome)


class _staging:
    """``atomic_directory(out)`` when there is an output, else a no-op yielding None."""

    def __init__(self, out: Path | None) -> None:
        self.out = out
        self._cm = None

    def __enter__(self) -> Path | None:
        if self.out is None:
            return None
        from flearning.outputs import atomic_directory

        self._cm = atomic_directory(self.out)
        return self._cm.__enter__()

    def __exit__(self, *exc: Any) -> bool | None:
        return self._cm.__exit__(*exc) if self._cm is not None else None


def _save(stage_dir, cfg, model, tokenizer, outcome, theta, vector_meta, before, after, summary) -> None:
    from flearning.arithmetic import KnowledgeVector
    from flearning.evaluation import write_report

    model.save_pretrained(stage_dir, safe_serialization=True)
    tokenizer.save_pretrained(stage_dir)
    if outcome.old_vector is not None:
        outcome.old_vector.save(stage_dir / "knowledge_vector")
    if theta is not None:
        delta = {k: p.detach().float() - theta[k].float() for k, p in model.named_parameters()}
        meta = dict(vector_meta, method=f"update:{cfg.method}", hyperparameters=summary["stages"])
        KnowledgeVector.from_deltas(delta, kind="full", **meta).save(stage_dir / "update_vector")
    if before is not None and after is not None:
        write_report({"before": [before], "after": [after]}, stage_dir / "report",
                     title=f"flearn update ({cfg.method}): before vs after")
    (stage_dir / "README.md").write_text(model_card(summary))


def _fmt(metrics: dict[str, Any] | None, name: str) -> str:
    if not metrics or name not in metrics or metrics[name].get("mean") is None:
        return "–"
    return f"{metrics[name]['mean']:.1f}"


def model_card(summary: dict[str, Any]) -> str:
    """A short model card for the output directory."""
    before, after = summary.get("metrics_before"), summary.get("metrics_after")
    names = list((after or before or {}).keys())
    rows = "\n".join(f"| {n} | {_fmt(before, n)} | {_fmt(after, n)} |" for n in names)
    lam = f", λ = {summary['lambda']}" if summary.get("lambda") is not None else ""
    data = summary["data"]
    return f"""---
library_name: transformers
tags: [f-learning, knowledge-editing]
---
# Updated model: {summary['model']['source']} with `{summary['method']}`{lam}

Produced by f-learning {summary['versions'].get('f-learning')} ({summary['method_summary']}).
Old facts: `{data['old']['path']}` ({data['old']['records']} records, sha256 {data['old']['sha256'][:12]}…);
new facts: `{data['new']['path']}` ({data['new']['records']} records). Seed {summary['seed']}.

| metric (×100) | before | after |
|---|---|---|
{rows}

Metrics are teacher-forced token accuracies unless named otherwise; Locality compares the updated
model's argmax predictions with the model before the update (see `report/summary.md` for definitions).
Load with `AutoModelForCausalLM.from_pretrained(this_dir)`. `update_vector/` replays the update on the
original model (`flearn vector apply --lambda 1`); `knowledge_vector/` is Δ_old of the old facts.
"""
