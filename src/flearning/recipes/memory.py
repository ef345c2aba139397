"""How much memory an update needs, per training stage, before anything is loaded (``--dry-run``).

The edit step of ROME, MEMIT and AlphaEdit is planned too (``_edit_stage``): the model, the key
statistics C of the edited layers, the updates and the value optimisation's activations.

``plan_memory`` takes the ``StagePlan`` config builds and counts fp32 weights, gradients and AdamW state
(exact), the tensors the recipe keeps beside the model (the copy of θ a full-FT forget stage trains,
Δ_old, ft-c's anchor, the θ kept to write θ* − θ), activations (an estimate from the architecture, the
batch and the sequence length) and a runtime allowance, and suggests what to change when it does not fit.
The model's shape comes from its config on torch's ``meta`` device, no weights read
(``recipes.model_shape``). What is
counted, and how the activation term was calibrated: docs/DISTRIBUTED.md, "Memory planning".
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from flearning.config import StagePlan, UpdateConfig, stage_plan
from flearning.errors import FlearnError
from flearning.methods import Method, get_method
from flearning.recipes.model_shape import (
    ACTIVATION_FACTOR,
    FP32,
    ModelShape,
    activation_bytes,
    is_lora_target,
    model_shape,
)
from flearning.training.config import LoraSettings

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from flearning.training.config import TrainConfig

ADAM = 2 * FP32  # AdamW's m and v per trainable parameter
RUNTIME_OVERHEAD = 512 * 2**20  # resident Python + torch + transformers, per process (rough)
TIGHT = 0.9  # a plan using more than this share of the available memory gets a warning
# the sequence length assumed when no data is read (facts are short: ~10-40 tokens)
ASSUMED_SEQ_LEN = 32
ASSUMED = "assumed: no data read; facts are short, ~10-40 tokens"
# the edit step: facts per batch assumed when no data is read, and the tokens a context prefix adds
# (editing.requests.CONTEXT_PREFIXES: five short sentences before the prompt, ~8 tokens each)
ASSUMED_REQUESTS = 100
PREFIX_TOKENS = 12
COVARIANCE_BATCH = 8  # texts per forward of the covariance pass (editing.CovarianceSettings)
ACCELERATE_CONFIGS = "configs/accelerate"


@dataclass(frozen=True)
class StageMemory:
    """Peak bytes of one training stage, by what holds them."""

    name: str  # "forget", "learn" or "edit"
    kind: str  # "full" or "lora"; the editor (rome, memit, alphaedit) of an edit step
    batch_size: int
    trainable: int  # parameters the optimizer updates
    weights: int  # the model being trained (all its weights, trainable or frozen)
    gradients: int
    optimizer: int
    activations: int
    other: tuple[tuple[str, int], ...] = ()  # other live tensors: copy of θ, Δ_old, anchors, snapshot
    overhead: int = RUNTIME_OVERHEAD

    @property
    def total(self) -> int:
        return (
            self.weights + self.gradients + self.optimizer + self.activations + self.overhead
            + sum(b for _, b in self.other)
        )  # fmt: skip


@dataclass(frozen=True)
class MemoryPlan:
    """Per-stage memory of an update and how it compares with what the machine has."""

    model: ModelShape
    method: str
    seq_len: int
    processes: int  # processes sharing this machine's memory (DDP on one host: each holds everything)
    stages: tuple[StageMemory, ...]  # per process (under FSDP2: its shards)
    available: int | None  # bytes, None when unknown
    available_source: str
    suggestions: tuple[str, ...] = field(default=())
    seq_len_source: str = ASSUMED  # where seq_len comes from (the data's longest text, or an assumption)
    sharding: str = "none"  # "fsdp2": weights, gradients and AdamW state split over ``processes``
    # FSDP2: what the main process holds on top while it writes the output (whole θ*, θ, and Δ_old and
    # θ* − θ whole or a group of decoder-block tensors at a time, as ``vector_files`` says)
    main_save: int = 0
    vector_files: str = "consolidated"

    @property
    def peak(self) -> int:
        """Bytes the machine must hold at the worst moment (all processes of this machine)."""
        return max(s.total for s in self.stages) * self.processes

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.peak <= self.available


# --- available memory --------------------------------------------------------------------------


def available_memory() -> tuple[int | None, str]:
    """(bytes this process could still use, where the figure comes from).

    ``MemAvailable`` of /proc/meminfo (what the kernel can hand out without swapping), capped by a
    cgroup v2 memory limit when the process runs in a container with one; ``os.sysconf`` elsewhere.
    Training runs on CPU here; with a GPU, its free memory is what counts and is reported instead.
    """
    try:
        import torch

        if torch.cuda.is_available():
            free = min(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
            return free, "free memory of the smallest GPU (torch.cuda.mem_get_info)"
    except Exception:  # noqa: BLE001 - a broken CUDA set-up must not break a dry run
        pass
    available, source = None, "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available, source = int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
                break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            source = "os.sysconf(SC_AVPHYS_PAGES)"
        except (ValueError, OSError, AttributeError):
            return None, "unknown"
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max" and int(limit) - used < available:
            available, source = int(limit) - used, "cgroup memory.max − memory.current"
    except (OSError, ValueError):
        pass
    return available, source


# --- the plan ----------------------------------------------------------------------------------


def plan_memory(
    model_config_or_dir: PretrainedConfig | str | os.PathLike | ModelShape,
    method: str | Method,
    stages: StagePlan | None = None,
    batch_size: int | None = None,
    seq_len: int = ASSUMED_SEQ_LEN,
    *,
    seq_len_source: str = ASSUMED,
    lora: LoraSettings | None = None,
    keep_theta: bool = False,
    processes: int = 1,
    available: int | None = None,
    trust_remote_code: bool = False,
    sharding: str = "none",
    requests: int | None = None,
    vector_files: str = "consolidated",
) -> MemoryPlan:
    """Estimate the peak memory of each training stage of ``method`` and compare it with the machine's.

    Args:
        model_config_or_dir: a transformers config, a model directory or hub id (config.json only is
            read), or a ``ModelShape`` from ``model_shape``.
        method: a method name of the registry (``ft``, ``flearning-ft``, ...) or a ``Method``.
        stages: the stages' settings as ``config.stage_plan`` builds them; by default the plan of an
            update config with ``method`` and ``lora``, every other setting at its default.
        batch_size: micro-batch size of every stage, overriding ``stages``.
        seq_len: tokens per training sequence (prompt + answer + EOS; facts are short: ~10-40).
        seq_len_source: where ``seq_len`` comes from, as the plan states it.
        lora: LoRA shape of the default plan's LoRA stages (default ``LoraSettings()``).
        keep_theta: the run keeps a copy of θ to write θ* − θ (``flearn update`` with an output directory).
        processes: training processes sharing this machine's memory (DDP on one host holds everything
            once per process).
        available: the budget in bytes; default: what ``available_memory`` finds.
        trust_remote_code: passed to transformers when reading the config.
        sharding: "fsdp2" plans each of ``processes`` processes (one per device) of an FSDP2 run: its
            shards of the weights, gradients, AdamW state, θ and Δ_old (the forget arithmetic is local),
            one decoder block gathered whole (twice, with prefetching), a LoRA adapter whole; plus what
            the main process gathers to write the output.
        requests: the facts an editor writes (``ASSUMED_REQUESTS`` when None); MEMIT and AlphaEdit take
            at most ``edit.batch_size`` of them at a time, ROME one.
        vector_files: how the run writes its vectors ("consolidated" or "sharded"), which decides what
            the main process of an FSDP2 run holds while writing them (``main_save``).
    Returns:
        A ``MemoryPlan``; its ``suggestions`` say what to change when the plan does not fit.
    """
    shape = (
        model_config_or_dir
        if isinstance(model_config_or_dir, ModelShape)
        else model_shape(model_config_or_dir, trust_remote_code=trust_remote_code)
    )
    method = get_method(method) if isinstance(method, str) else method
    lora = lora or LoraSettings()
    stages = stages or stage_plan(UpdateConfig(method=method.name, lora=lora))
    configs: dict[str, TrainConfig] = {"learn": stages.learn} if stages.learn is not None else {}
    if method.forget is not None:  # a plan made by hand may leave the forget stage at its default
        configs["forget"] = stages.forget or stage_plan(UpdateConfig(method=method.name, lora=lora)).forget
    if batch_size is not None:
        configs = {name: cfg.model_copy(update={"batch_size": batch_size}) for name, cfg in configs.items()}

    snapshot = (("θ snapshot", shape.params * FP32),) if keep_theta else ()
    plan_stages = []
    vector_after_forget: tuple[tuple[str, int], ...] = ()
    if "forget" in configs:
        cfg = configs["forget"]
        if cfg.lora is None:
            stage = _full_stage("forget", shape, cfg, seq_len, extra=(("θ (kept)", shape.params * FP32),))
            vector_after_forget = (("Δ_old", shape.params * FP32),)
        else:
            stage = _lora_stage("forget", shape, cfg, seq_len, extra=())
            dense = shape.lora_shape(cfg.lora)[1]
            vector_after_forget = (("Δ_old (LoRA)", dense * FP32),)
        plan_stages.append(_with_other(stage, snapshot))
    if method.editor is not None:
        edit = stages.edit or stage_plan(UpdateConfig(method=method.name)).edit
        stage = _edit_stage(shape, edit, requests or ASSUMED_REQUESTS, seq_len, extra=vector_after_forget)
        plan_stages.append(_with_other(stage, snapshot))
    else:
        cfg = configs["learn"]
        if cfg.lora is None:
            anchors = (("ft-c anchor", _trainable_full(shape, cfg) * FP32),) if method.constrained else ()
            stage = _full_stage("learn", shape, cfg, seq_len, extra=vector_after_forget + anchors)
        else:
            stage = _lora_stage("learn", shape, cfg, seq_len, extra=vector_after_forget)
        plan_stages.append(_with_other(stage, snapshot))

    main_save = 0
    if sharding == "fsdp2" and method.editor is not None:
        raise FlearnError(
            f"{method.name} does not run under FSDP2 (the editors need whole layers): plan it unsharded"
        )
    if sharding == "fsdp2":
        plan_stages = [_sharded(stage, shape, processes) for stage in plan_stages]
        full_forget = "forget" in configs and configs["forget"].lora is None
        main_save = main_process_save(shape, full_forget, keep_theta, vector_files)
    elif sharding != "none":
        raise FlearnError(f"sharding must be 'none' or 'fsdp2', not {sharding!r}")
    if available is None:
        available, source = available_memory()
    else:
        source = "given"
    plan = MemoryPlan(
        model=shape,
        method=method.name,
        seq_len=seq_len,
        seq_len_source=seq_len_source,
        processes=processes,
        stages=tuple(plan_stages),
        available=available,
        available_source=source,
        sharding=sharding,
        main_save=main_save,
        vector_files=vector_files,
    )
    return MemoryPlan(**{**plan.__dict__, "suggestions": tuple(suggestions(plan, lora, keep_theta))})


def main_process_save(shape: ModelShape, full_forget: bool, keep_theta: bool, vector_files: str) -> int:
    """What the main process of an FSDP2 run holds in CPU memory while it writes the output: θ* gathered
    whole (the model), the θ kept for ``update_vector/``, and the vectors: with ``vector_files``
    "consolidated" Δ_old (a full-FT one, gathered whole by the forget stage and kept) and θ* − θ whole;
    with "sharded" one group of a vector at a time (a decoder block, or the embeddings with the other
    tensors outside the blocks, whichever is larger) and the buffer it is gathered through."""
    if vector_files not in ("consolidated", "sharded"):
        raise FlearnError(f"vector_files must be 'consolidated' or 'sharded', not {vector_files!r}")
    vectors = full_forget + keep_theta
    if vector_files == "sharded":
        block = (shape.params - shape.embedding_params) // max(shape.layers, 1)
        rest = shape.params - block * shape.layers  # embeddings, final norm (and an untied head)
        # the group, and the buffer a tensor is gathered through (measured: 2 × the largest group,
        # benchmarks/vector_files_memory.py)
        held = 2 * max(block, rest) if vectors else 0
    else:
        held = shape.params * vectors
    return (shape.params * (1 + keep_theta) + held) * FP32


def _trainable_full(shape: ModelShape, cfg: TrainConfig) -> int:
    return shape.params - shape.embedding_params if cfg.freeze_embeddings else shape.params


def _rows(cfg: TrainConfig) -> int:
    """Rows whose activations one forward holds: a micro-batch, or a whole step's when fused (an
    upper bound: the fused step runs its micro-batches whole when they share no prompt prefix)."""
    return cfg.batch_size * (cfg.grad_accum if cfg.fused_accumulation else 1)


def _full_stage(name: str, shape: ModelShape, cfg: TrainConfig, seq_len: int, extra) -> StageMemory:
    trainable = _trainable_full(shape, cfg)
    return StageMemory(
        name=name,
        kind="full",
        batch_size=cfg.batch_size,
        trainable=trainable,
        weights=shape.params * FP32,
        gradients=trainable * FP32,
        optimizer=trainable * ADAM,
        activations=activation_bytes(shape, _rows(cfg), seq_len),
        other=tuple(extra),
    )


def _lora_stage(name: str, shape: ModelShape, cfg: TrainConfig, seq_len: int, extra) -> StageMemory:
    adapter, _ = shape.lora_shape(cfg.lora)
    targets = sum(1 for n, _, _ in shape.linears if is_lora_target(n, cfg.lora))
    return StageMemory(
        name=name,
        kind="lora",
        batch_size=cfg.batch_size,
        trainable=adapter,
        weights=(shape.params + adapter) * FP32,
        gradients=adapter * FP32,
        optimizer=adapter * ADAM,
        activations=activation_bytes(shape, _rows(cfg), seq_len, lora_rank_width=targets * cfg.lora.r),
        other=tuple(extra),
    )


def _edit_stage(shape: ModelShape, edit, requests: int, seq_len: int, extra) -> StageMemory:
    """The edit step: the model (frozen), one δ per fact with its Adam state, the activations of the value
    optimisation (for ``requests_per_pass`` facts at a time: each one's prompt alone and after each
    context prefix, and its KL prompt, backpropagated to δ; logits at a few positions only, so the
    training count without its vocabulary term: measured 1.47 MB a token on SmolLM2-135M, the count
    1.63) and, beside them, C of each edited layer (float32, accumulated in float64 over batches of the
    corpus), AlphaEdit's projection P (float64), the updates ΔW and the saved weights of the edited layers."""
    from flearning.editing import CONTEXT_PREFIXES, ValueSettings

    layers = len(edit.layers)
    batch = 1 if edit.editor == "rome" else min(requests, edit.batch_size or requests)
    together = min(batch, ValueSettings.requests_per_pass)
    sequences = together * (2 + len(CONTEXT_PREFIXES))
    tokens = seq_len + PREFIX_TOKENS
    per_layer = 7 * shape.hidden + 3 * shape.kv_hidden + 4 * shape.intermediate + shape.heads * tokens
    activations = int(sequences * tokens * ACTIVATION_FACTOR * shape.layers * per_layer * FP32)
    key = shape.intermediate  # the edited module's input: the MLP's hidden activation
    square = key * key
    weight = key * shape.hidden
    other = [
        ("C per edited layer (fp32)", layers * square * FP32),
        ("C accumulation (fp64)", layers * square * 2 * FP32),
        ("ΔW and the saved weights", 2 * layers * weight * FP32),
    ]
    if edit.editor == "alphaedit":
        other.append(("null-space projections P (fp64)", layers * square * 2 * FP32))
    other.append(
        (
            "covariance pass (no gradients)",
            COVARIANCE_BATCH * 512 * (4 * shape.intermediate + 7 * shape.hidden) * 2 * FP32,
        )
    )
    return StageMemory(
        name="edit",
        kind=edit.editor,
        batch_size=batch,
        trainable=batch * shape.hidden,
        weights=shape.params * FP32,
        gradients=batch * shape.hidden * FP32,
        optimizer=batch * shape.hidden * ADAM,
        activations=activations,
        other=(*extra, *other),
    )


def _sharded(stage: StageMemory, shape: ModelShape, n: int) -> StageMemory:
    """One FSDP2 process's part of a stage: the model's weights and, for full FT, its gradients, AdamW
    state, kept θ and Δ_old split n ways (``torch.chunk`` rows: at most one row more than 1/n); a LoRA
    adapter and its state whole (replicated); one decoder block gathered whole, two with prefetching."""
    block = (shape.params - shape.embedding_params) // max(shape.layers, 1)
    full = stage.kind == "full"
    adapter = 0 if full else stage.trainable * FP32

    def split(b: int) -> int:
        return math.ceil(b / n)

    # the θ kept for θ* − θ: on the main process only, in CPU memory (``main_save``)
    other = tuple((f"{label} (shards)", split(b)) for label, b in stage.other if label != "θ snapshot")
    return StageMemory(
        name=stage.name,
        kind=stage.kind,
        batch_size=stage.batch_size,
        trainable=stage.trainable,
        weights=split(stage.weights - adapter) + adapter,
        gradients=split(stage.gradients) if full else stage.gradients,
        optimizer=split(stage.optimizer) if full else stage.optimizer,
        activations=stage.activations,
        other=(*other, ("FSDP2 gathered blocks", 2 * block * FP32)),
        overhead=stage.overhead,
    )


def _with_other(stage: StageMemory, extra) -> StageMemory:
    return StageMemory(**{**stage.__dict__, "other": stage.other + tuple(extra)})


# --- what to change when it does not fit -------------------------------------------------------


def suggestions(plan: MemoryPlan, lora: LoraSettings, keep_theta: bool) -> list[str]:
    """Concrete changes, each with the peak it would give, when ``plan`` does not fit (or barely)."""
    if plan.available is None or plan.peak <= TIGHT * plan.available:
        return []
    out = []

    def alternative(method: str, **kwargs) -> MemoryPlan:
        return plan_memory(
            plan.model, method, kwargs.pop("stages", None), seq_len=plan.seq_len,
            seq_len_source=plan.seq_len_source, lora=lora,
            keep_theta=keep_theta, processes=plan.processes, available=plan.available, **kwargs,
        )  # fmt: skip

    worst = max(plan.stages, key=lambda s: s.total)
    editor = get_method(plan.method).editor is not None  # no learning stage to make LoRA or to shard
    if plan.method == "flearning-ft":
        alt = alternative("flearning-lora-ft", batch_size=worst.batch_size)
        if alt.peak < 0.9 * plan.peak:
            out.append(
                "Forget with LoRA instead of a full-FT copy of θ: method flearning-lora-ft "
                f"(the paper's best CounterFact variant) needs {fmt_bytes(alt.peak)}."
            )
    if any(s.kind == "full" for s in plan.stages) and not editor:
        lora_method = "flearning-lora" if plan.method.startswith("flearning") else "lora"
        alt = alternative(lora_method, batch_size=worst.batch_size)
        if alt.peak < 0.9 * plan.peak:
            out.append(f"LoRA in both stages (method {lora_method}) needs {fmt_bytes(alt.peak)}.")
    if worst.batch_size > 1 and worst.activations > 0.1 * worst.total:
        small = max(1, worst.batch_size // 4)
        accum = math.ceil(worst.batch_size / small)
        saved = worst.activations - worst.activations * small // worst.batch_size
        out.append(
            f"Activations take {fmt_bytes(worst.activations)} at batch {worst.batch_size}: batch_size={small} "
            f"with grad_accum={accum} keeps the effective batch and saves {fmt_bytes(saved * plan.processes)} "
            f"({worst.name}.batch_size={small} {worst.name}.grad_accum={accum})."
        )
    if keep_theta:
        out.append(
            f"Without the vectors (--no-vectors, save_vectors=false) the run does not keep θ for θ* − θ "
            f"({fmt_bytes(plan.model.params * FP32)})."
        )
    if plan.sharding == "none" and not editor:
        out.append(_sharding_suggestion(plan, lora, keep_theta, worst))
    return out


def _sharding_suggestion(plan: MemoryPlan, lora: LoraSettings, keep_theta: bool, worst: StageMemory) -> str:
    """The fewest FSDP2 processes (one GPU each, with this plan's memory per GPU) whose per-process plan
    fits, or why none does."""
    budget = plan.available / plan.processes  # one device's memory
    for n in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        sharded = plan_memory(
            plan.model, plan.method, seq_len=plan.seq_len, seq_len_source=plan.seq_len_source, lora=lora,
            keep_theta=keep_theta, processes=n, sharding="fsdp2", available=int(budget * n),
            batch_size=worst.batch_size,
        )  # fmt: skip
        per = max(s.total for s in sharded.stages)
        if per <= budget:
            return (
                f"Shard weights, gradients and Adam state over {n} GPUs with FSDP2: `accelerate launch "
                f"--config_file {ACCELERATE_CONFIGS}/fsdp2.yaml` (num_processes: {n}) needs ≈ {fmt_bytes(per)} "
                f"per GPU (plan it: --dry-run --processes {n} --sharding fsdp2); the main process also holds "
                f"{fmt_bytes(sharded.main_save)} of CPU memory while writing the output. See docs/DISTRIBUTED.md."
            )
    held = ", ".join(label for label, _ in worst.other) or "none"
    return (
        "Even sharded over 1024 GPUs, activations, runtime and the tensors the recipe holds beside the model "
        f"({held}) take more than one device's memory: use smaller batches or LoRA stages first."
    )


# --- sizes as text ------------------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# --- flearn update --dry-run -----------------------------------------------------------------


def dry_run_plan(
    cfg: UpdateConfig,
    *,
    seq_len: int | None = None,
    seq_len_source: str | None = None,
    processes: int = 1,
    available: int | None = None,
    sharding: str = "none",
    requests: int | None = None,
) -> MemoryPlan:
    """The memory plan of an update config: its model (config only; the embedded default is converted
    once if it was not yet), method, stage settings and LoRA shape. ``seq_len``: the longest training
    text of the data in tokens (``recipes.dry_run`` measures it), described by ``seq_len_source``;
    None: ``ASSUMED_SEQ_LEN``, and the plan says it was assumed."""
    from flearning.models import resolve_model

    source = resolve_model(cfg.model)
    return plan_memory(
        source,
        cfg.method,
        stage_plan(cfg),
        seq_len=seq_len if seq_len is not None else ASSUMED_SEQ_LEN,
        seq_len_source=seq_len_source or ASSUMED,
        lora=cfg.lora,
        keep_theta=cfg.out is not None and cfg.save_vectors,
        processes=processes,
        available=available,
        trust_remote_code=cfg.trust_remote_code,
        sharding=sharding,
        requests=requests,
        vector_files=cfg.vector_files,
    )
