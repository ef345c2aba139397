"""One supervised fine-tuning stage on prompt→answer pairs, full or LoRA, on accelerate.

A plain loop on ``accelerate`` rather than ``transformers.Trainer``: the same code runs on one CPU or
under ``accelerate launch`` / ``torchrun`` (DDP; FSDP2 through ``flearning.sharding``), and the
loop stays short enough to hold what F-Learning needs that Trainer makes awkward: the ft-c projection
after every optimizer step, stopping as soon as the old facts are held (prime), and a step-and-batch
precise error when the loss stops being finite.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from flearning.distributed import check_launch, on_main_process, same_on_every_process, use_cpu
from flearning.errors import FlearnError
from flearning.sharding import average_replicated_grads, fsdp2_requested, is_sharded, local, shard_model
from flearning.training import checkpoint as ckpt
from flearning.training.checkpoint import Checkpointing
from flearning.training.config import TrainConfig
from flearning.training.dataset import LengthGroupedBatches, build_examples, collate
from flearning.training.failures import translate_error
from flearning.training.fused import accumulate
from flearning.training.loss import answer_loss
from flearning.training.model_setup import attach_lora, compile_blocks, freeze_embeddings
from flearning.training.sharded_state import full_state

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass
class EpochCheck:
    """What an epoch-end check decided: stop the stage now, and what to record about the epoch (kept in
    the stage's checkpoints, so that a resumed stage knows every check made before it)."""

    stop: bool
    record: dict[str, Any] = field(default_factory=dict)  # JSON values only


# Called after each complete epoch with (epochs completed, model, the records of the earlier checks); a
# check that says stop ends the stage. It runs after the last epoch too (its stop then changes nothing).
EpochCallback = Callable[[int, torch.nn.Module, list[dict[str, Any]]], EpochCheck]
# Called after each optimizer step with (step, loss of that step).
StepCallback = Callable[[int, float], None]
# Called after each optimizer step with what it did (experiment tracking: recipes/tracking.py).
StatsCallback = Callable[["StepStats"], None]


@dataclass(frozen=True)
class StepStats:
    """One optimizer step of a stage, for an observer (``train``'s ``on_stats``)."""

    step: int  # 1-based optimizer step of the stage
    loss: float  # the step's loss (as in ``TrainResult.losses``)
    lr: float  # the learning rate the step used
    epoch: float  # epochs done after the step
    tokens: int  # non-padding tokens of the stage so far (including those before a resume)
    seconds: float  # training seconds of the stage so far (including those before a resume)


class TrainingDivergedError(FlearnError):
    """The loss became NaN or infinite; nothing is written."""


@dataclass
class TrainResult:
    model: torch.nn.Module  # a peft model when the stage trained LoRA
    steps: int
    epochs: float
    seconds: float
    tokens: int  # non-padding tokens processed (forward + backward)
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    epoch_log: list[dict[str, Any]] = field(default_factory=list)  # the epoch-end checks' records
    # keep_start: every parameter of the model as the stage found it (local shards under FSDP2)
    start: dict[str, torch.Tensor] | None = None
    # bytes this process held at the end of the stage: "parameters" (all), "trainable", "optimizer"
    # (AdamW's moments); under FSDP2 its own shards only (docs/DISTRIBUTED.md, the memory test)
    state_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    cfg: TrainConfig,
    *,
    description: str = "train",
    progress: bool = True,
    on_epoch_end: EpochCallback | None = None,
    on_step: StepCallback | None = None,
    on_stats: StatsCallback | None = None,
    checkpoint: Checkpointing | None = None,
    keep_start: bool = False,
) -> TrainResult:
    """Fine-tune ``model`` on (prompt, answer) pairs with loss on the answer tokens only.

    Args:
        model: a causal LM in fp32; trained in place (full) or wrapped with a LoRA adapter.
        tokenizer: its tokenizer (needs a pad token).
        pairs: (prompt, answer) texts; the model sees ``prompt + " " + answer`` (+ EOS).
        cfg: the stage's hyper-parameters.
        description: label of the progress bar.
        progress: show a progress bar with the running loss.
        on_epoch_end: optional check after each complete epoch (``EpochCheck``: stop, record); its
            records are in ``TrainResult.epoch_log`` and in the checkpoints (a resumed stage continues
            them, and runs a check that an interruption cut short).
        on_step: optional callback after each optimizer step, with (step, loss).
        on_stats: optional callback after each optimizer step, with its ``StepStats`` (loss, learning
            rate, tokens, seconds): what experiment tracking logs.
        checkpoint: save the stage's state there (periodically, at the end, and when interrupted) and
            resume from the latest compatible checkpoint: the result is bit-identical to an
            uninterrupted run.
        keep_start: keep a copy of every parameter as the stage found it (``TrainResult.start``; under
            FSDP2 each process keeps its own shards): the forget stage's Δ = θ_T − θ without a second model.
    Returns:
        ``TrainResult`` with the trained model (peft-wrapped for LoRA; under FSDP2, sharded in place)
        and the loss trace.
    Raises:
        TrainingDivergedError: the loss became NaN/inf (the step and batch are named).
        FlearnError: out of memory, with what to change; a checkpoint made by another configuration,
            other data or another starting model (naming what differs); disk full while checkpointing.
    """
    from flearning.io.progress import progress_bar

    if not pairs:
        raise FlearnError(f"{description}: no training pairs")
    run = _start_or_resume(model, tokenizer, pairs, cfg, checkpoint, description, keep_start)
    pos = run.pos
    run.model.train()
    # Inductor's CPU reductions split across threads add in a run-dependent order unless deterministic
    # algorithms are on (measured: two compiled runs differed by 1e-7 with 2 threads, never with it).
    deterministic_before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    run.start_clock()
    bar = progress_bar(
        total=run.total_steps,
        initial=pos.step,
        desc=description,
        unit="step",
        enabled=progress and run.accelerator.is_main_process,
    )
    try:
        if cfg.compile:
            torch.use_deterministic_algorithms(True, warn_only=True)
        while not run.finished:
            # an epoch has ended whose check has not run (also after a resume that was cut short in it)
            due = on_epoch_end is not None and pos.batches_done == 0 and pos.epoch > len(pos.epoch_log)
            if due and _check_epoch(run, on_epoch_end):
                break
            if pos.step >= run.total_steps:
                break
            _run_epoch(run, bar, on_step, on_stats)
        pos.seconds = run.elapsed()
        if checkpoint is not None and not run.finished:
            run.save(complete=True)
    except BaseException as ex:
        _save_on_interrupt(run, ex)
        translated = translate_error(ex, cfg)
        if translated is not None:
            raise translated from ex
        raise
    finally:
        bar.close()
        torch.use_deterministic_algorithms(deterministic_before[0], warn_only=deterministic_before[1])
    run.model.eval()
    epochs_done = pos.step / run.steps_per_epoch
    log.info(
        "%s: %d steps (%.2f epochs) in %.1f s, %.0f tokens/s, final loss %.4f",
        description,
        pos.step,
        epochs_done,
        pos.seconds,
        pos.tokens / max(pos.seconds, 1e-9),
        pos.losses[-1] if pos.losses else float("nan"),
    )
    return TrainResult(
        run.trained,
        pos.step,
        epochs_done,
        pos.seconds,
        pos.tokens,
        list(pos.losses),
        list(pos.epoch_log),
        start=run.start,
        state_bytes=_state_bytes(run),
    )


def _state_bytes(run: _Run) -> dict[str, int]:
    """What this process holds of the stage's model and optimizer, in bytes (local shards under FSDP2)."""

    def size(t: torch.Tensor) -> int:
        part = local(t)
        return part.numel() * part.element_size()

    moments = [v for s in run.optimizer.state_dict()["state"].values() for v in s.values()]
    return {
        "parameters": sum(size(p) for p in run.trained.parameters()),
        "trainable": sum(size(p) for _, p in run.named),
        "optimizer": sum(size(v) for v in moments if isinstance(v, torch.Tensor) and v.dim() > 0),
    }


def _check_epoch(run: _Run, on_epoch_end: EpochCallback) -> bool:
    """Run the epoch-end check on the model in eval mode, keep its record; True: stop the stage."""
    run.model.eval()
    check = on_epoch_end(run.pos.epoch, run.trained, list(run.pos.epoch_log))
    run.model.train()
    run.pos.epoch_log.append(dict(check.record))
    return same_on_every_process(bool(check.stop))


@dataclass
class _Run:
    """What one stage holds while it trains: the prepared objects, where it stands (``pos``, which a
    checkpoint saves), and the state a checkpoint taken now would hold."""

    cfg: TrainConfig
    description: str
    accelerator: Any
    trained: torch.nn.Module  # what the caller gets back: the module itself (peft-wrapped for LoRA)
    model: torch.nn.Module  # the same module compiled and/or prepared by accelerate
    named: list[tuple[str, torch.nn.Parameter]]  # the trainable parameters
    optimizer: Any
    scheduler: Any
    sampler: LengthGroupedBatches
    loader: Any
    anchors: list[torch.Tensor] | None  # ft-c: θ₀ of every trainable parameter
    start: dict[str, torch.Tensor] | None  # keep_start: every parameter before the first step
    sharded: bool  # FSDP2: parameters are DTensors; gathers are collectives of every process
    steps_per_epoch: int
    total_steps: int
    checkpoint: Checkpointing | None
    identity: Any
    pos: ckpt.Position
    finished: bool  # resumed from the checkpoint of a completed stage
    rng_at_step: Any = None  # the RNG states at the last completed optimizer step
    last_saved: int = 0  # the optimizer step of the last checkpoint (or of the one resumed from)
    updating: bool = False  # an optimizer step is half applied: no checkpoint can be taken now
    seconds_before: float = 0.0
    started: float = 0.0
    pad_id: int = 0  # the tokenizer's: what a fused step pads its rows with

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def fused(self) -> bool:
        """A step's micro-batches run as one batch (``training.fused``): asked for, and on one process."""
        return (
            self.cfg.fused_accumulation and self.cfg.grad_accum > 1 and self.world == 1 and not self.sharded
        )

    def start_clock(self) -> None:
        self.seconds_before = self.pos.seconds
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        """Training seconds of the stage, including those before a resume."""
        return self.seconds_before + time.perf_counter() - self.started

    def save(self, complete: bool = False, barrier: bool = True) -> None:
        """Every process holds the same state: the main one writes it. With ``barrier`` the others wait
        for it (and stop with its error if it fails); without, nobody waits (after an interruption the
        other processes may not be here). Under FSDP2 the whole state is first gathered onto the main
        process, one tensor at a time (a collective: never without ``barrier``)."""
        params: dict[str, torch.Tensor] = dict(self.named)
        optimizer = None if complete else self.optimizer.state_dict()
        if self.sharded:
            params, optimizer = full_state(self.named, optimizer)
        write = partial(
            ckpt.save_checkpoint,
            self.checkpoint.directory,
            identity=self.identity,
            position=self.pos,
            params=params,
            optimizer=optimizer,
            scheduler=self.scheduler.state_dict(),
            rng=self.rng_at_step,
            complete=complete,
        )
        if barrier:
            on_main_process(write)
        elif self.accelerator.is_main_process:
            write()
        self.last_saved = self.pos.step


def _start_or_resume(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    cfg: TrainConfig,
    checkpoint: Checkpointing | None,
    description: str,
    keep_start: bool = False,
) -> _Run:
    """Seed, build the examples, adapter, optimizer, batches and schedule, prepare them with accelerate,
    and load the latest compatible checkpoint. The order of these steps fixes the random draws (the
    LoRA initialisation among them): a resumed stage continues the uninterrupted one bit for bit."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    set_seed(cfg.seed)
    # The scheduler counts optimizer steps (stepped below on sync steps only), whatever the process count;
    # accelerate's default would step it once per process per step.
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum,
        cpu=use_cpu(),
        step_scheduler_with_optimizer=False,
    )
    check_launch(accelerator.num_processes)
    world = accelerator.num_processes
    examples = build_examples(tokenizer, pairs, add_eos=cfg.add_eos, template=cfg.template)

    identity = saved = None
    if checkpoint is not None:
        # the starting model, before any adapter; the process count fixes the batches of a step
        identity = ckpt.stage_identity(cfg, examples, model, processes=world)
        if not checkpoint.resume:
            on_main_process(ckpt.discard_checkpoints, checkpoint.directory)
        # which checkpoint to resume from is the main process's decision (every process then reads it)
        latest = on_main_process(ckpt.latest_checkpoint, checkpoint.directory)
        if latest is not None:
            saved = ckpt.load_checkpoint(latest)
            ckpt.check_identity(saved, identity)

    # FSDP2 (an fsdp_version 2 accelerate config): every stage trains the model sharded in place (a model
    # sharded by an earlier stage stays as it is); a LoRA adapter goes on the sharded model, its small
    # factors replicated on every process (their gradients averaged at each step, as DDP would)
    sharded = fsdp2_requested()
    if sharded and cfg.compile:
        raise FlearnError(f"{description}: compile: true is not supported under FSDP2; set compile: false")
    if sharded and not is_sharded(model):
        shard_model(model, accelerator.device.type)
    if cfg.lora is not None:
        model = attach_lora(model, cfg.lora)
    elif cfg.freeze_embeddings:
        freeze_embeddings(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    # fused AdamW: one kernel over all parameters instead of a Python loop of foreach ops; on this
    # 2-core CPU the optimizer step of a 135M model is a large share of a short-sequence step.
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    sampler = LengthGroupedBatches(
        [len(e) for e in examples],
        cfg.batch_size,
        cfg.seed,
        short_last=world > 1,
        # an optimizer step's rows (all processes' micro-batches) of similar length; one process with
        # accumulation k·W still sees the batches W processes with k see, round-robin (accelerate)
        step=cfg.grad_accum * world,
    )
    # A private generator: creating an epoch's iterator draws a (worker) seed from the loader's generator,
    # which would otherwise advance the global one and make a resumed run's dropout masks differ.
    loader = torch.utils.data.DataLoader(
        examples,
        batch_sampler=sampler,
        collate_fn=partial(collate, pad_id=tokenizer.pad_token_id),
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    # Each process takes every world-th batch (accelerate pads the last round): an epoch is that many.
    steps_per_epoch = math.ceil(math.ceil(len(sampler) / world) / cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler = get_scheduler(
        cfg.scheduler,
        optimizer,
        num_warmup_steps=int(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    trained = model
    if cfg.compile:
        model = compile_blocks(model)
    if sharded:  # sharded above; accelerate's MULTI_CPU preparation would wrap it in DDP
        optimizer, loader, scheduler = accelerator.prepare(optimizer, loader, scheduler)
    else:
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    # ft-c: the starting point every weight must stay within ε of (taken before a checkpoint is loaded).
    anchors = [p.detach().clone() for p in params] if cfg.linf_bound is not None else None
    # keep_start: the same, for every parameter (local shards under FSDP2: no whole copy of the model)
    start = {n: p.detach().clone() for n, p in trained.named_parameters()} if keep_start else None

    pos = ckpt.Position()
    if saved is not None:
        ckpt.restore(saved, named, optimizer, scheduler, accelerator, sharded)
        pos = saved.position
        log.info(
            "%s: resuming from %s (optimizer step %d of %d)", description, saved.path, pos.step, total_steps
        )
    return _Run(
        cfg=cfg,
        description=description,
        accelerator=accelerator,
        trained=trained,
        model=model,
        named=named,
        optimizer=optimizer,
        scheduler=scheduler,
        sampler=sampler,
        loader=loader,
        anchors=anchors,
        start=start,
        sharded=sharded,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        checkpoint=checkpoint,
        identity=identity,
        pos=pos,
        finished=saved is not None and saved.complete,
        # where the loop stands at the last completed optimizer step: what a checkpoint taken now holds
        rng_at_step=ckpt.capture_rng() if checkpoint is not None else None,
        last_saved=pos.step,  # nothing new to save before the first step
        pad_id=tokenizer.pad_token_id,
    )


def _run_epoch(run: _Run, bar, on_step: StepCallback | None, on_stats: StatsCallback | None = None) -> None:
    """The rest of the current epoch (from the batch a resumed run stopped at), ending early when the
    stage has taken its last optimizer step."""
    pos, cfg, accelerator = run.pos, run.cfg, run.accelerator
    # accelerate's loader re-sets its sampler's epoch from its own counter: set both.
    if hasattr(run.loader, "set_epoch"):
        run.loader.set_epoch(pos.epoch)
    run.sampler.set_epoch(pos.epoch)
    running = 0.0
    pending_tokens = 0
    skip = pos.batches_done  # a resumed epoch: these batches were consumed before the checkpoint
    last = len(run.loader) - 1
    step_batches: list[dict[str, torch.Tensor]] = []  # fused: the current step's micro-batches
    for batch_index, batch in enumerate(run.loader):
        if batch_index < skip:
            continue
        lr = run.optimizer.param_groups[0]["lr"]  # before the schedule steps: the rate this step uses
        pending_tokens += int(batch["attention_mask"].sum())
        if run.fused:  # a step ends after grad_accum micro-batches or with the epoch, as accelerate's
            step_batches.append(batch)
            if (batch_index + 1) % cfg.grad_accum and batch_index != last:
                continue
            for loss_value in _fused_step(run, step_batches, batch_index + 1 - len(step_batches)):
                running += loss_value / cfg.grad_accum  # as below, term by term: the same float
            step_batches = []
        else:
            loss = _optimizer_step(run, batch, batch_index)
            running += loss.item() / cfg.grad_accum
            if not accelerator.sync_gradients:
                continue
        if run.world > 1:  # the step's loss and tokens over all processes, as one process reports them
            stats = accelerator.reduce(
                torch.tensor([running, float(pending_tokens)], device=accelerator.device), "sum"
            )
            running, pending_tokens = stats[0].item() / run.world, int(stats[1].item())
        if run.anchors is not None:
            _project_linf([p for _, p in run.named], run.anchors, cfg.linf_bound)
        pos.step += 1
        pos.tokens += pending_tokens
        pending_tokens = 0
        pos.batches_done = batch_index + 1
        pos.accelerator_step = accelerator.step
        pos.losses.append(running)
        pos.seconds = run.elapsed()
        if run.checkpoint is not None:
            run.rng_at_step = ckpt.capture_rng()
        run.updating = False
        running = 0.0
        bar.set_postfix(loss=f"{pos.losses[-1]:.4f}", epoch=pos.epoch + 1, refresh=False)
        bar.update(1)
        _maybe_checkpoint(run)
        if on_step is not None:
            on_step(pos.step, pos.losses[-1])
        if on_stats is not None:
            epochs = pos.step / run.steps_per_epoch
            on_stats(StepStats(pos.step, pos.losses[-1], lr, epochs, pos.tokens, pos.seconds))
        if pos.step >= run.total_steps:
            if pos.step % run.steps_per_epoch:
                return  # the last step falls inside the epoch (max_steps): the epoch is not complete
            break  # the stage's last step ends an epoch
    pos.epoch += 1
    pos.batches_done = 0


def _optimizer_step(run: _Run, batch: dict[str, torch.Tensor], batch_index: int) -> torch.Tensor:
    """Forward and backward one micro-batch; on the last micro-batch of a step (accelerate's
    ``sync_gradients``) clip, step the optimizer and the schedule. Returns the micro-batch's loss."""
    accelerator = run.accelerator
    with accelerator.accumulate(run.model):
        # one process only: DDP's reducer expects one forward per backward
        loss = answer_loss(run.model, batch, share_prefix=run.world == 1 and not run.sharded)
        _check_finite(run, loss, batch_index)
        accelerator.backward(loss)
        if run.sharded and accelerator.sync_gradients:
            average_replicated_grads([p for _, p in run.named])
        _apply_step(run)
    return loss


def _fused_step(run: _Run, batches: list[dict[str, torch.Tensor]], first_index: int) -> list[float]:
    """One optimizer step whose micro-batches (the first of them the epoch's batch ``first_index``) run
    as one batch (``training.fused``; one process, so no gradient to reduce). Returns their losses."""
    run.accelerator.sync_gradients = True  # every backward here ends a step: accelerate's optimizer steps

    def check(loss: torch.Tensor, m: int) -> None:
        _check_finite(run, loss, first_index + m)

    losses = accumulate(run.model, batches, pad_id=run.pad_id, backward=run.accelerator.backward, check=check)
    _apply_step(run)
    return losses


def _check_finite(run: _Run, loss: torch.Tensor, batch_index: int) -> None:
    """Stop with the step and batch named when a micro-batch's loss is NaN or infinite (every process at
    the same batch, not only the one that saw it)."""
    finite = torch.isfinite(loss)
    if run.world > 1:
        finite = run.accelerator.reduce(finite.float().reshape(1), "sum").item() == run.world
    if not finite:
        raise TrainingDivergedError(
            f"{run.description}: loss became {loss.item()} at optimizer step {run.pos.step + 1} "
            f"(epoch {run.pos.epoch + 1}, batch {batch_index + 1}); nothing was written. Lower the "
            "learning rate or check the data."
        )


def _apply_step(run: _Run) -> None:
    """After a micro-batch's backward: on the step's last one (``sync_gradients``) clip the gradients,
    step the optimizer and the schedule; zero the gradients (accelerate skips both otherwise)."""
    accelerator, cfg = run.accelerator, run.cfg
    run.updating = accelerator.sync_gradients
    if accelerator.sync_gradients and cfg.max_grad_norm is not None:
        if run.sharded:  # torch's clip takes the norm over every process's shards
            torch.nn.utils.clip_grad_norm_([p for _, p in run.named], cfg.max_grad_norm)
        else:  # the prepared model's parameters
            accelerator.clip_grad_norm_(run.model.parameters(), cfg.max_grad_norm)
    run.optimizer.step()
    if accelerator.sync_gradients:
        run.scheduler.step()
    run.optimizer.zero_grad()


def _maybe_checkpoint(run: _Run) -> None:
    """The periodic checkpoint, every ``checkpoint.every`` optimizer steps (the last one is saved as the
    stage's complete checkpoint instead)."""
    every = run.checkpoint.every if run.checkpoint is not None else 0
    if every and run.pos.step % every == 0 and run.pos.step < run.total_steps:
        run.save()


def _save_on_interrupt(run: _Run, ex: BaseException) -> None:
    """After an interruption or a crash, keep the state of the last completed optimizer step (unless it
    is already saved, a step is half applied, or the error is one a checkpoint cannot help with)."""
    if (
        run.checkpoint is None
        or not run.checkpoint.save_on_error
        or run.updating
        or run.pos.step <= run.last_saved
        or isinstance(ex, FlearnError)  # a diverged loss or a failed checkpoint: saving cannot help
    ):
        return
    if run.sharded:  # gathering the shards needs every process, which may not be here: periodic only
        log.warning(
            "%s: interrupted under FSDP2; resuming starts from the last periodic checkpoint", run.description
        )
        return
    try:
        run.save(barrier=False)  # the other processes may not be here: do not wait for them
        log.warning(
            "%s: interrupted; state after optimizer step %d saved in %s",
            run.description,
            run.pos.step,
            run.checkpoint.directory,
        )
    except Exception as save_error:  # the original error matters more
        log.warning("%s: could not save a checkpoint after the interruption: %s", run.description, save_error)


@torch.no_grad()
def _project_linf(params: list[torch.Tensor], anchors: list[torch.Tensor], eps: float) -> None:
    """Clamp every weight into [θ₀ − ε, θ₀ + ε] (ft-c's constraint, applied after each step)."""
    for p, p0 in zip(params, anchors, strict=True):
        p.copy_(torch.minimum(torch.maximum(p, p0 - eps), p0 + eps))
