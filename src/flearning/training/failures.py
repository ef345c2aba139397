"""A training stage's failures told as what to change: out of memory, and a compiler that could not
compile (``train`` raises these instead of the library's error)."""

from __future__ import annotations

import torch

from flearning.errors import FlearnError
from flearning.training.config import TrainConfig


def translate_error(ex: BaseException, cfg: TrainConfig) -> FlearnError | None:
    """A compiler failure or an out-of-memory error as a ``FlearnError`` saying what to change; None
    for any other error (raised unchanged)."""
    if cfg.compile and _is_compile_failure(ex):
        return _compile_error(ex)
    if isinstance(ex, torch.OutOfMemoryError):
        return _oom_error(ex, cfg)
    if isinstance(ex, RuntimeError) and (
        "out of memory" in str(ex).lower() or "can't allocate memory" in str(ex).lower()
    ):
        return _oom_error(ex, cfg)
    return None


def _is_compile_failure(ex: BaseException) -> bool:
    """The backend (inductor) failed; an error of the traced code itself is not the compiler's."""
    try:
        from torch._dynamo.exc import BackendCompilerFailed
    except ImportError:  # pragma: no cover - every supported torch has it
        return False
    return isinstance(ex, BackendCompilerFailed)


def _compile_error(ex: BaseException) -> FlearnError:
    return FlearnError(
        f"compile: torch.compile could not compile the model ({type(ex).__name__}: {str(ex)[:500]}). On CPU "
        "inductor needs a C++ compiler (g++); set compile=false (the stage's compile setting) to train "
        "without compiling."
    )


def _oom_error(ex: BaseException, cfg: TrainConfig) -> FlearnError:
    """What to change, by the names each command takes: a stage's ``batch_size``/``grad_accum`` keys
    (``flearn update``: ``learn.*``/``forget.*``), ``flearn prime``'s ``--batch-size``."""
    b, g = cfg.batch_size, cfg.grad_accum
    if b > 1:
        # halve the micro-batch (or go to 1 when it is odd), keeping batch_size × grad_accum exact
        half, more = (b // 2, g * 2) if b % 2 == 0 else (1, g * b)
        batch = (
            f"a smaller batch_size with a larger grad_accum to keep the effective batch of {b * g} "
            f"(flearn update: learn.batch_size={half} learn.grad_accum={more}, forget.* likewise; "
            f"flearn prime: --batch-size {half}), "
        )
    else:
        batch = ""
    return FlearnError(
        f"out of memory while training (batch size {b}, grad_accum {g}): {ex}. Try {batch}LoRA stages "
        "(method flearning-lora or flearning-lora-ft), or an accelerate config that shards the model "
        "(configs/accelerate/)."
    )
