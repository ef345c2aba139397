"""The ``flearn update`` recipe: setup → (evaluate θ) → forget → learn → evaluate θ* → save.

Output directory (written atomically):
    config.json, model.safetensors, tokenizer files   the updated model θ* (Hugging Face format)
    knowledge_vector/                                  Δ_old of F-Learning methods (safetensors + JSON)
    update_vector/                                     θ* − θ: apply it to θ to replay the whole update
    adapter/                                           the LoRA adapter of a LoRA learning stage
    report/                                            evaluation of θ (before) and θ* (after)
    run.json                                           resolved config, versions, hashes, timings, losses, metrics
    README.md                                          model card

Resuming. While it runs, an update keeps its finished work in ``<out>.partial/`` beside the output:
``identity.json`` (what the run depends on), ``forget/`` (checkpoints of the forget stage),
``knowledge_vector/`` + ``forget.json`` (Δ_old and its loss trace once the forget stage is done) and
``learn/`` (checkpoints of the learning stage; a ``-final`` one once it is done). Rerunning the same
command after an interruption or a crash resumes from there and writes the same model as an
uninterrupted run; the directory is removed once the output is in place. A ``.partial`` directory made
by a different run (other data, model, method, λ or stage settings) is refused, naming what differs
(``resume="restart"`` / ``--restart`` discards it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from flearning.config import StagePlan, UpdateConfig, stage_plan
from flearning.distributed import is_main_process, launched_processes, on_main_process
from flearning.errors import FlearnError
from flearning.io.atomic import atomic_directory
from flearning.methods import Method, get_method
from flearning.recipes.algorithm import MethodOutcome, run_method

ResumeMode = Literal["auto", "resume", "restart"]
WORK_FORMAT = "flearning-update-work"

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


class NonFiniteModelError(FlearnError):
    """The updated model has NaN/inf weights; nothing is written."""


def work_dir_for(out: Path) -> Path:
    """Where an update to ``out`` keeps its finished stages until the output is in place."""
    out = Path(out)
    return out.parent / f"{out.name}.partial"


def pairs_hash(pairs: Sequence[tuple[str, str]]) -> str:
    return hashlib.sha256(
        json.dumps(list(pairs), ensure_ascii=False).encode("utf-8", "surrogatepass")
    ).hexdigest()


def run_identity(
    method: Method, plan: StagePlan, base_fingerprint: str, old_pairs, new_pairs
) -> dict[str, Any]:
    """Everything the trained model depends on (not where it is written, nor how it is evaluated)."""
    from flearning.training.checkpoint import code_versions

    return {
        "format": WORK_FORMAT,
        "method": method.name,
        "lambda": plan.lam if method.forget else None,
        "stages": {
            "forget": plan.forget.model_dump(mode="json") if method.forget and plan.forget else None,
            "learn": plan.learn.model_dump(mode="json"),
        },
        "model_fingerprint": base_fingerprint,
        "data": {"old": pairs_hash(old_pairs), "new": pairs_hash(new_pairs)},
        "processes": launched_processes(),  # a step's batches depend on it
        "versions": code_versions(),
    }


def open_work_dir(out: Path, identity: dict[str, Any], resume: ResumeMode) -> Path:
    """The ``<out>.partial`` work directory of this run: reused when it holds the same run, created when
    absent; one made by another run is refused (``auto``, ``resume``) or discarded (``restart``).

    A directory of that name that f-learning did not make is never deleted.
    """
    from flearning.io.atomic import atomic_write_text
    from flearning.training.checkpoint import describe_differences

    work = work_dir_for(out)
    if work.exists():
        try:
            saved = json.loads((work / "identity.json").read_text())
            ours = isinstance(saved, dict) and saved.get("format") == WORK_FORMAT
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise FlearnError(
                f"{work} exists but is not the work directory of an interrupted flearn update (no valid "
                "identity.json); it is left alone: move or remove it, or choose another --out"
            )
        if resume == "restart" or not _has_progress(work):
            log.info(
                "discarding %s (%s)", work, "--restart" if resume == "restart" else "nothing finished in it"
            )
            shutil.rmtree(work)
        elif saved != identity:
            raise FlearnError(
                f"{work} holds an interrupted update of a different run "
                f"({'; '.join(describe_differences(saved, identity))}). Rerun it with the settings it was made "
                "with to resume it, or pass --restart to discard it and start afresh."
            )
        else:
            log.info("resuming the interrupted update kept in %s", work)
            return work
    if resume == "resume":
        raise FlearnError(
            f"nothing to resume: {work} does not exist or holds no finished step "
            "(run without --resume to start)"
        )
    work.mkdir(parents=True)
    atomic_write_text(work / "identity.json", json.dumps(identity, indent=2) + "\n")
    return work


def _has_progress(work: Path) -> bool:
    """Whether ``work`` holds anything a rerun can reuse (a checkpoint or a finished stage)."""
    from flearning.training.checkpoint import checkpoint_dirs

    return (work / "knowledge_vector").is_dir() or any(
        checkpoint_dirs(work / stage) for stage in ("forget", "learn")
    )


def forget_stage(
    method: Method,
    model,
    tokenizer,
    old_pairs,
    plan: StagePlan,
    *,
    work: Path | None,
    every: int,
    progress: bool,
    metadata: dict[str, Any],
):
    """Δ_old of an F-Learning method, reused from ``work`` if an earlier attempt finished it.

    Returns (Δ_old, {"losses", "tokens", "steps"}) or (None, None) for a baseline.
    """
    from flearning.io.atomic import atomic_write_text
    from flearning.recipes.algorithm import old_knowledge_vector
    from flearning.training.checkpoint import Checkpointing, discard_checkpoints
    from flearning.vectors import KnowledgeVector

    if method.forget is None:
        return None, None
    if plan.forget is None:
        raise ValueError(f"{method.name} needs forget-stage settings")
    vector_dir = work / "knowledge_vector" if work else None
    info_path = work / "forget.json" if work else None
    # the main process decides whether the stage is done (the others then read what it wrote)
    done = work is not None and on_main_process(
        lambda: (vector_dir / "vector.json").is_file() and info_path.is_file()
    )
    if done:
        log.info("forget stage already done: Δ_old read from %s", vector_dir)
        return KnowledgeVector.load(vector_dir), json.loads(info_path.read_text())
    checkpoint = Checkpointing(work / "forget", every=every) if work else None
    vector, result = old_knowledge_vector(
        model, tokenizer, old_pairs, plan.forget, progress=progress, metadata=metadata, checkpoint=checkpoint
    )
    info = {"losses": result.losses, "tokens": result.tokens, "steps": result.steps}
    if work is not None:

        def keep() -> None:
            atomic_write_text(info_path, json.dumps(info) + "\n")
            vector.save(vector_dir, overwrite=True)  # atomic: its presence marks the stage done
            discard_checkpoints(work / "forget")

        on_main_process(keep)
    return vector, info


def update(
    config: UpdateConfig | None = None, *, progress: bool = True, resume: ResumeMode = "auto", **fields: Any
) -> UpdateResult:
    """Replace old facts by new ones in a causal LM and write the result (Python API of ``flearn update``).

    Args:
        config: an ``UpdateConfig``; or pass its fields as keyword arguments
            (``update(model=..., data=..., method="flearning-ft", out=...)``; ``lam`` is λ).
        progress: progress bars.
        resume: what to do with ``<out>.partial/`` left by an interrupted run: ``auto`` resumes it if it
            was made by the same run (else refuses, naming what differs), ``resume`` also requires it to
            exist, ``restart`` discards it.
    Returns:
        ``UpdateResult`` with the output directory, the run summary and the in-memory updated model.
    Raises:
        FlearnError: bad input (config, data, model, output path), a diverged loss, non-finite weights,
            a disk that is full or not writable; nothing is written to ``out`` then.
    """
    from flearning.data import load_dataset
    from flearning.io.atomic import check_output_dir, write_errors_as_flearn
    from flearning.models import load_model, model_fingerprint, resolve_model
    from flearning.training import TrainingDivergedError
    from flearning.vectors.ops import VectorError

    if resume not in ("auto", "resume", "restart"):
        raise ValueError(f"resume must be auto, resume or restart, not {resume!r}")
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
        out = check_output_dir(
            cfg.out, overwrite=cfg.overwrite, protected=[local_model] if local_model.exists() else []
        )
        if work_dir_for(out).exists() and not work_dir_for(out).is_dir():
            raise FlearnError(
                f"{work_dir_for(out)}: exists and is not a directory (it is where an update keeps "
                "its finished stages); remove it"
            )

    start = time.perf_counter()
    try:
        model, tokenizer = load_model(model_source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as ex:  # e.g. a model directory without tokenizer files
        raise FlearnError(f"cannot load the model or its tokenizer from '{cfg.model}': {ex}") from ex
    timings["load_model"] = time.perf_counter() - start
    base_fp = model_fingerprint(model)
    theta = {k: v.detach().clone() for k, v in model.named_parameters()} if cfg.out is not None else None

    work = None
    note = ""
    if out is not None:
        identity = run_identity(method, plan, base_fp, old_pairs, new_pairs)
        with write_errors_as_flearn(work_dir_for(out), what=f"the work directory of {out}"):
            work = on_main_process(open_work_dir, out, identity, resume)
        note = (
            f"The previous output (if any) is untouched; finished training stages (if any) are kept in {work}: "
            "rerun the same command to resume."
        )

    try:
        writes = [out, work_dir_for(out)] if out is not None else []  # an error on any other path is not ours
        with write_errors_as_flearn(writes, what="the output", note=note):
            result = _run(
                _Setup(
                    cfg,
                    method,
                    plan,
                    model,
                    tokenizer,
                    old_ds,
                    new_ds,
                    old_pairs,
                    new_pairs,
                    base_fp,
                    theta,
                    model_source,
                    out,
                    work,
                    timings,
                ),
                progress=progress,
            )
    except (TrainingDivergedError, VectorError, NonFiniteModelError):
        # Rerunning the same command would fail the same way; a changed setting cannot reuse the stages.
        if work is not None and is_main_process():
            shutil.rmtree(work, ignore_errors=True)
        raise
    except BaseException:
        if work is not None and work.is_dir() and is_main_process():
            if _has_progress(work):
                log.warning(
                    "the finished training stages are kept in %s: run the same command again to resume "
                    "(or pass --restart to start afresh)",
                    work,
                )
            else:  # nothing was trained yet: nothing worth keeping
                shutil.rmtree(work, ignore_errors=True)
        raise
    if work is not None:
        on_main_process(shutil.rmtree, work, ignore_errors=True)
    return result


@dataclass
class _Setup:
    """What ``update`` prepared before anything is trained."""

    cfg: UpdateConfig
    method: Method
    plan: StagePlan
    model: Any
    tokenizer: Any
    old_ds: Any
    new_ds: Any
    old_pairs: list[tuple[str, str]]
    new_pairs: list[tuple[str, str]]
    base_fp: str
    theta: dict[str, Any] | None  # θ's parameters, for update_vector/
    model_source: str
    out: Path | None
    work: Path | None  # <out>.partial
    timings: dict[str, float]


def _run(s: _Setup, *, progress: bool) -> UpdateResult:
    """Everything after setup: (evaluate θ) → forget → learn → evaluate θ* → save."""
    import torch

    from flearning.training.checkpoint import Checkpointing

    cfg, method, plan, model, tokenizer = s.cfg, s.method, s.plan, s.model, s.tokenizer
    old_ds, new_ds, old_pairs, new_pairs, base_fp = s.old_ds, s.new_ds, s.old_pairs, s.new_pairs, s.base_fp
    theta, model_source, out, work, timings = s.theta, s.model_source, s.out, s.work, s.timings
    before = reference = None

    def evaluate_on_new_facts(evaluated, when: str):
        """Every metric on the new facts, Locality against θ (the model before the update)."""
        from flearning.evaluation.evaluate import evaluate

        start = time.perf_counter()
        result = evaluate(
            evaluated,
            tokenizer,
            new_ds.records,
            reference=reference,
            batch_size=cfg.eval_batch_size,
            generation=cfg.generation,
            progress=progress,
        )
        timings[f"evaluate_{when}"] = time.perf_counter() - start
        return result

    if cfg.evaluate:
        from flearning.evaluation import reference_predictions

        start = time.perf_counter()
        reference = reference_predictions(model, tokenizer, new_ds.records, batch_size=cfg.eval_batch_size)
        timings["reference"] = time.perf_counter() - start
        before = evaluate_on_new_facts(model, "before")

    old_file, new_file = cfg.data_files()
    vector_meta = {
        "base_model": cfg.model,
        "base_fingerprint": base_fp,
        "method": method.name,
        "data_hash": old_ds.sha256,
        "hyperparameters": plan.forget.model_dump(mode="json") if plan.forget else {},
    }
    start = time.perf_counter()
    old_vector, forget_info = forget_stage(
        method,
        model,
        tokenizer,
        old_pairs,
        plan,
        work=work,
        every=cfg.checkpoint_every,
        progress=progress,
        metadata=vector_meta,
    )
    forget_seconds = time.perf_counter() - start
    outcome = run_method(
        method,
        model,
        tokenizer,
        old_pairs,
        new_pairs,
        plan,
        progress=progress,
        vector_metadata=vector_meta,
        old_vector=old_vector,
        adapter_dir=(work / "adapter") if work is not None else None,  # copied into the output
        learn_checkpoint=Checkpointing(work / "learn", every=cfg.checkpoint_every) if work else None,
    )
    if forget_info is not None:  # the forget stage ran (or was read) here, before run_method
        outcome.timings = {"forget_train": forget_seconds, **outcome.timings}
        outcome.losses = {"forget": forget_info["losses"], **outcome.losses}
        outcome.tokens = {"forget": forget_info["tokens"], **outcome.tokens}
    timings.update(outcome.timings)
    updated = outcome.model
    finite = all(torch.isfinite(p).all() for p in updated.parameters())
    if not finite:
        raise NonFiniteModelError("the updated model has non-finite weights; nothing was written")

    after = evaluate_on_new_facts(updated, "after") if cfg.evaluate else None

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
            "old": {
                "path": str(old_file),
                "format": old_ds.format,
                "sha256": old_ds.sha256,
                "records": len(old_ds.records),
                "dropped": old_ds.dropped,
            },
            "new": {
                "path": str(new_file),
                "format": new_ds.format,
                "sha256": new_ds.sha256,
                "records": len(new_ds.records),
                "dropped": new_ds.dropped,
            },
        },
        "seed": cfg.seed,
        "versions": library_versions(),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "timings_seconds": {k: round(v, 3) for k, v in timings.items()},
        "tokens": outcome.tokens,
        "final_loss": {k: (v[-1] if v else None) for k, v in outcome.losses.items()},
        # each stage's loss at every optimizer step: a resumed run's trace equals an uninterrupted one's
        "losses": outcome.losses,
        "metrics_before": before.summary() if before else None,
        "metrics_after": after.summary() if after else None,
    }

    if out is not None:  # by the main process only; the others wait until it is in place
        summary["timings_seconds"]["save"] = on_main_process(
            _write_output, out, cfg, updated, tokenizer, outcome, theta, vector_meta, before, after, summary
        )
        if outcome.adapter_dir is not None:
            outcome.adapter_dir = out / "adapter"
    return UpdateResult(out=out, summary=summary, outcome=outcome)


def _write_output(out, cfg, model, tokenizer, outcome, theta, vector_meta, before, after, summary) -> float:
    """Write the output directory atomically (``run.json`` last); returns the seconds it took."""
    start = time.perf_counter()
    with atomic_directory(out) as stage_dir:
        _save(stage_dir, cfg, model, tokenizer, outcome, theta, vector_meta, before, after, summary)
        summary["timings_seconds"]["save"] = round(time.perf_counter() - start, 3)
        (stage_dir / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("wrote %s", out)
    return summary["timings_seconds"]["save"]


def _save(stage_dir, cfg, model, tokenizer, outcome, theta, vector_meta, before, after, summary) -> None:
    from flearning.evaluation import write_report
    from flearning.vectors import KnowledgeVector

    model.save_pretrained(stage_dir, safe_serialization=True)
    tokenizer.save_pretrained(stage_dir)
    if outcome.adapter_dir is not None:  # saved in the work directory by the LoRA learning stage
        shutil.copytree(outcome.adapter_dir, stage_dir / "adapter")
    if outcome.old_vector is not None:
        outcome.old_vector.save(stage_dir / "knowledge_vector")
    if theta is not None:
        delta = {k: p.detach().float() - theta[k].float() for k, p in model.named_parameters()}
        meta = dict(vector_meta, method=f"update:{cfg.method}", hyperparameters=summary["stages"])
        KnowledgeVector.from_deltas(delta, kind="full", **meta).save(stage_dir / "update_vector")
    if before is not None and after is not None:
        write_report(
            {"before": [before], "after": [after]},
            stage_dir / "report",
            title=f"flearn update ({cfg.method}): before vs after",
        )
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
# Updated model: {summary["model"]["source"]} with `{summary["method"]}`{lam}

Produced by f-learning {summary["versions"].get("f-learning")} ({summary["method_summary"]}).
Old facts: `{data["old"]["path"]}` ({data["old"]["records"]} records, sha256 {data["old"]["sha256"][:12]}…);
new facts: `{data["new"]["path"]}` ({data["new"]["records"]} records). Seed {summary["seed"]}.

| metric (×100) | before | after |
|---|---|---|
{rows}

Metrics are teacher-forced token accuracies unless named otherwise; Locality compares the updated
model's argmax predictions with the model before the update (see `report/summary.md` for definitions).
Load with `AutoModelForCausalLM.from_pretrained(this_dir)`. `update_vector/` replays the update on the
original model (`flearn vector apply --lambda 1`); `knowledge_vector/` is Δ_old of the old facts.
"""
