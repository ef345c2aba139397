"""F-Learning, read top to bottom (Ni et al., ACL 2024, Algorithm 1):

    Δ_old = FT(θ, K_old) − θ          # forget_stage: the knowledge vector of the old facts
    θ'    = θ − λ · Δ_old              # vectors.forget
    θ*    = FT(θ', K_new)              # the learning stage (fixed epochs, or until K_new is held)

or, for a method with an editor (ROME, MEMIT, AlphaEdit), in place of the learning stage

    θ*    = θ' + editor(θ', K_new)     # edit_stage (recipes/edit.py): ΔW of the edited layers

``run_method`` runs any method of the registry from θ (the baselines skip the first two lines);
``flearn update``, ``flearn bench`` and the DDP tests all do, differing only in ``forget_cache``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flearning.config import StagePlan
from flearning.distributed import on_main_process
from flearning.evaluation.definitions import DEFAULT_BATCH_SIZE
from flearning.methods import Method
from flearning.recipes.edit import EditOutcome, apply_edit, edit_stage
from flearning.recipes.stopping import StoppedStage, locality_budget, train_until
from flearning.recipes.tracking import NO_TRACKING, Tracking
from flearning.training import TrainConfig, train
from flearning.vectors import KnowledgeVector, Provenance, forget
from flearning.vectors.lora import merge_adapter

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from flearning.training.checkpoint import Checkpointing
    from flearning.training.trainer import StatsCallback

log = logging.getLogger(__name__)


@dataclass
class ForgetResult:
    """Δ_old and how the forget stage got it."""

    vector: KnowledgeVector
    seconds: float  # training it, or reading it back from the cache
    trained: bool  # False: read from the cache
    # the stage's trace (per optimizer step); None when read from a cache that keeps no trace
    losses: list[float] | None = None
    tokens: int | None = None
    steps: int | None = None
    # what is written to disk: ``vector`` itself, or under FSDP2 its whole tensors on the main process
    # (``KnowledgeVector.consolidated``; None on the other processes, and on every process when Δ_old was
    # written sharded a block at a time: vector_files "sharded")
    whole: KnowledgeVector | None = None

    def __post_init__(self) -> None:
        if self.whole is None and not self.vector.sharded:
            self.whole = self.vector


@dataclass
class MethodOutcome:
    model: PreTrainedModel  # θ*, a plain (merged) model
    forget: ForgetResult | None  # Δ_old, for F-Learning methods
    adapter_dir: Path | None  # where the LoRA learning stage's adapter was saved (peft format)
    learn: StoppedStage | None = None  # how the learning stage ended (epochs, accuracy per epoch)
    edit: EditOutcome | None = None  # the edit step's ΔW, for a method with an editor
    timings: dict[str, float] = field(default_factory=dict)
    losses: dict[str, list[float]] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)


def forget_stage(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    old_pairs: Sequence[tuple[str, str]],
    cfg: TrainConfig,
    *,
    cache: Path | None = None,
    trace: Path | None = None,
    checkpoint: Checkpointing | None = None,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
    on_stats: StatsCallback | None = None,
    vector_files: str = "consolidated",
) -> ForgetResult:
    """Δ_old = FT(θ, K_old) − θ, with full fine-tuning or LoRA as ``cfg.lora`` says; θ ends unchanged.

    Full: fine-tune θ itself, keeping its weights as the stage found them (``train(keep_start=True)``),
    take Δ = θ_T − θ, then put θ back (no second model: under FSDP2 every process keeps only its own
    shards, and the arithmetic is local). LoRA: train an adapter on θ itself, read Δ = B·A·scaling per
    layer, then remove the adapter (θ's weights were never changed).

    Args:
        cache: a directory for Δ_old (``vector.json`` + ``vector.safetensors``). When it holds Δ_old
            already (and ``trace`` exists, if given), Δ_old is read from it and nothing is trained;
            otherwise the trained Δ_old is saved there atomically: its presence marks the stage done.
        trace: a JSON file for the stage's losses, tokens and steps, written before Δ_old, so that a
            stage read back reports the trace of the run that trained it.
        checkpoint: where the training saves and resumes its state (``train``); dropped once Δ_old is
            in ``cache``.
        metadata: provenance stored with Δ_old (base model, method, data hash, ...).
        on_stats: ``train``'s per-step callback (experiment tracking).
        vector_files: how ``cache`` is written: "consolidated" (``KnowledgeVector.save``; under FSDP2
            Δ_old is gathered whole onto the main process, as ``ForgetResult.whole``) or "sharded"
            (``KnowledgeVector.save_sharded``; under FSDP2 a block at a time, and no ``whole``).
    """
    start = time.perf_counter()
    # the main process decides whether the stage is done (the others then read what it wrote)
    if cache is not None and on_main_process(_cached, cache, trace):
        log.info("forget stage already done: Δ_old read from %s", cache)
        info = json.loads(trace.read_text()) if trace is not None else {}
        return ForgetResult(KnowledgeVector.load(cache), time.perf_counter() - start, False, **info)

    provenance = Provenance(**(metadata or {}))
    lora = cfg.lora is not None
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    result = train(
        model,  # full FT trains θ in place (its start kept), LoRA an adapter on θ
        tokenizer,
        old_pairs,
        cfg,
        description=f"forget: {'LoRA' if lora else 'FT'} on old facts",
        progress=progress,
        on_stats=on_stats,
        checkpoint=checkpoint,
        keep_start=not lora,
    )
    if not lora:
        vector = _full_vector(model, result.start, provenance)
    else:
        vector = KnowledgeVector.from_lora(result.model, provenance=provenance)
        result.model.unload()  # removes the LoRA layers in place, base weights unchanged
        # peft froze the base weights; a full-FT learning stage must find them trainable again
        for name, p in model.named_parameters():
            p.requires_grad_(trainable[name])
    info = {"losses": result.losses, "tokens": result.tokens, "steps": result.steps}
    if vector_files == "sharded" and vector.sharded:  # written a block at a time, by every process
        if cache is not None:
            on_main_process(_keep_trace, info, trace)
            vector.save_sharded(cache, overwrite=True)  # atomic: its presence marks the stage done
            on_main_process(_discard, checkpoint)
        return ForgetResult(vector, time.perf_counter() - start, True, **info)
    whole = vector.consolidated()  # under FSDP2: gathered onto the main process, one tensor at a time
    if cache is not None:
        on_main_process(_keep, whole, info, cache, trace, checkpoint, sharded=vector_files == "sharded")
    return ForgetResult(vector, time.perf_counter() - start, True, whole=whole, **info)


def _full_vector(model: PreTrainedModel, start: dict[str, Any], provenance: Provenance) -> KnowledgeVector:
    """Δ = θ_T − θ from the trained model and its kept start; then θ is put back in place."""
    import torch

    from flearning.models import model_fingerprint
    from flearning.vectors.vector import name_or_path

    trained = dict(model.named_parameters())
    with torch.no_grad():
        deltas = {name: trained[name].detach().float() - start[name].float() for name in start}
        for name, value in start.items():
            trained[name].copy_(value)
    del start
    provenance = provenance.with_defaults(
        base_model=lambda: name_or_path(model),
        base_fingerprint=lambda: model_fingerprint(model),
        method="ft",
    )
    return KnowledgeVector.from_deltas(deltas, provenance, kind="full")


def _cached(cache: Path, trace: Path | None) -> bool:
    return (cache / "vector.json").is_file() and (trace is None or trace.is_file())


def _keep(
    vector: KnowledgeVector,
    info: dict[str, Any],
    cache: Path,
    trace: Path | None,
    checkpoint: Checkpointing | None,
    *,
    sharded: bool = False,
) -> None:
    _keep_trace(info, trace)
    if sharded:  # whole tensors, written in the sharded format
        vector.save_sharded(cache, overwrite=True)
    else:
        vector.save(cache, overwrite=True)  # atomic: its presence marks the stage done
    _discard(checkpoint)


def _keep_trace(info: dict[str, Any], trace: Path | None) -> None:
    """The stage's trace, written before Δ_old (whose presence marks the stage done)."""
    from flearning.io.atomic import atomic_write_text

    if trace is not None:
        atomic_write_text(trace, json.dumps(info) + "\n")


def _discard(checkpoint: Checkpointing | None) -> None:
    """The stage's checkpoints, once Δ_old is kept."""
    from flearning.training.checkpoint import discard_checkpoints

    if checkpoint is not None:
        discard_checkpoints(checkpoint.directory)


def run_method(
    method: Method,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    old_pairs: Sequence[tuple[str, str]],
    new_pairs: Sequence[tuple[str, str]],
    plan: StagePlan,
    *,
    progress: bool = True,
    vector_metadata: dict[str, Any] | None = None,
    forget_cache: Path | None = None,
    forget_trace: Path | None = None,
    forget_checkpoint: Checkpointing | None = None,
    adapter_dir: Path | None = None,
    learn_checkpoint: Checkpointing | None = None,
    eval_batch_size: int = DEFAULT_BATCH_SIZE,
    tracker: Tracking | None = None,
    records: Sequence[Any] | None = None,
    vector_files: str = "consolidated",
) -> MethodOutcome:
    """Update ``model`` (θ, holding the old facts) in place with ``method``; returns θ*.

    Args:
        method: an entry of ``METHODS``.
        model: θ in fp32; it is modified.
        tokenizer: its tokenizer.
        old_pairs: (prompt, old answer) — K_old, used by the forget stage only.
        new_pairs: (prompt, new answer) — K_new.
        plan: stage hyper-parameters and λ.
        progress: progress bars.
        vector_metadata: provenance stored with Δ_old (base model, data hash, ...).
        forget_cache, forget_trace, forget_checkpoint: where the forget stage keeps Δ_old, its loss
            trace and its checkpoints (``forget_stage``'s ``cache``, ``trace``, ``checkpoint``).
        adapter_dir: where to save the adapter of a LoRA learning stage, before it is merged.
        learn_checkpoint: where the learning stage saves and resumes its state (``train``).
        eval_batch_size: rows per forward pass of the learning stage's stop-rule checks.
        tracker: the run's experiment tracking (``recipes.tracking``): each stage's steps as
            ``forget/...`` and ``learn/...``, and λ.
        records: the new facts as ``KnowledgeRecord``s with their subjects (``new_pairs`` in the same
            order): what an editor writes.
        vector_files: how the forget stage keeps Δ_old in ``forget_cache`` (``forget_stage``).
    Returns:
        ``MethodOutcome`` with θ*, Δ_old and, for a LoRA learning stage, the adapter; for an editor, ΔW.
    """
    outcome = MethodOutcome(model=model, forget=None, adapter_dir=None)
    track = tracker if tracker is not None else NO_TRACKING
    # the learning stage's locality budget is measured against θ, the model before the update
    template = plan.learn.template if plan.learn is not None else "plain"  # what the stage encodes with
    budget = locality_budget(model, tokenizer, plan.stop, eval_batch_size, template)

    if method.forget is not None:
        if plan.forget is None:
            raise ValueError(f"{method.name} needs forget-stage settings")
        stage = forget_stage(
            model,
            tokenizer,
            old_pairs,
            plan.forget,
            cache=forget_cache,
            trace=forget_trace,
            checkpoint=forget_checkpoint,
            progress=progress,
            metadata=vector_metadata,
            on_stats=track.stage("forget"),
            vector_files=vector_files,
        )
        track.stage_done(stage.steps)
        outcome.forget = stage
        outcome.timings["forget_train"] = stage.seconds
        if stage.losses is not None:
            outcome.losses["forget"] = stage.losses
        if stage.tokens is not None:
            outcome.tokens["forget"] = stage.tokens
        start = time.perf_counter()
        forget(model, stage.vector, plan.lam)  # θ' = θ − λ·Δ_old
        track.log({"lambda": plan.lam})
        outcome.timings["forget_apply"] = time.perf_counter() - start

    if method.editor is not None:
        if plan.edit is None or records is None:
            raise ValueError(f"{method.name} needs edit settings and the records of the new facts")
        edit = edit_stage(model, tokenizer, records, plan.edit, progress=progress)  # ΔW, model unchanged
        apply_edit(model, edit)  # θ* = θ' + ΔW
        track.log(edit.scalars())
        outcome.edit = edit
        outcome.timings["edit"] = edit.seconds
        return outcome

    learn_cfg = plan.learn
    start = time.perf_counter()
    learned = train_until(  # the fixed schedule when plan.stop is None
        model,
        tokenizer,
        new_pairs,
        learn_cfg,
        plan.stop,
        budget=budget,
        description=f"learn ({method.name})",
        progress=progress,
        checkpoint=learn_checkpoint,
        batch_size=eval_batch_size,
        on_stats=track.stage("learn"),
    )
    result = learned.result
    track.stage_done(result.steps)
    outcome.learn = learned
    outcome.timings["learn_train"] = time.perf_counter() - start
    outcome.losses["learn"] = result.losses
    outcome.tokens["learn"] = result.tokens
    if learn_cfg.lora is not None:
        if adapter_dir is not None:  # before merging: merging drops A and B
            on_main_process(result.model.save_pretrained, adapter_dir)
            outcome.adapter_dir = adapter_dir
        outcome.model = merge_adapter(result.model)  # peft's merge_and_unload, also on FSDP2 shards
    else:
        outcome.model = result.model
    return outcome
