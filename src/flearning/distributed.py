"""Which process writes, when launched as several (``accelerate launch``, ``torchrun``).

Training is data parallel through accelerate (``flearning.training.trainer``); every process holds the
whole model and runs the same recipe. Files are written by the main process only: the others wait at a
barrier where they would read what it wrote. A failure in a main-only section is sent to every process,
so none waits forever at the next barrier for a main process that has already given up.

One process (no ``WORLD_SIZE`` > 1 in the environment) needs no process group: every function here is
then a plain call, and accelerate is not imported.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from flearning.errors import FlearnError

T = TypeVar("T")


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 when not launched)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def has_accelerator_device() -> bool:
    """Whether torch sees a GPU-like device; without one, accelerate must be told it runs on CPU or it
    sets up no process group under torchrun / accelerate launch."""
    import torch

    if hasattr(torch, "accelerator"):  # torch >= 2.6
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def use_cpu() -> bool:
    """Whether accelerate must run on CPU: torch sees no GPU-like device, or ``ACCELERATE_USE_CPU`` asks
    for it (as accelerate's own ``use_cpu: true`` config does). The trainer's ``Accelerator`` and
    ``state()`` below both use this, so they set up the same process group whichever comes first."""
    from accelerate.utils import parse_flag_from_env

    return not has_accelerator_device() or parse_flag_from_env("ACCELERATE_USE_CPU")


def check_launch(num_processes: int) -> None:
    """Refuse to run when launched as N processes but accelerate set up fewer (every process would
    train alone, and each would write)."""
    launched = launched_processes()
    if launched > 1 and num_processes != launched:
        raise FlearnError(
            f"launched as {launched} processes but accelerate set up {num_processes}: every process "
            "would train alone. On CPU set ACCELERATE_USE_CPU=1; see docs/DISTRIBUTED.md."
        )


def state():
    """accelerate's process state, set up as the trainer's ``Accelerator`` does (``use_cpu()``), or None
    when this is the only process."""
    if launched_processes() == 1:
        return None
    from accelerate import PartialState

    s = PartialState(cpu=use_cpu())
    check_launch(s.num_processes)
    return s


def is_main_process() -> bool:
    s = state()
    return s is None or s.is_main_process


def same_on_every_process(value: T) -> T:
    """The main process's ``value`` on every process (a decision each process would otherwise take on
    its own, e.g. to stop early after an evaluation whose result could differ in the last bit)."""
    s = state()
    if s is None:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


class MainProcessFailed(FlearnError):
    """Raised on the other processes when a main-process-only section failed there."""


def on_main_process(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on the main process only; every process returns its result.

    The result (or the main process's error) is broadcast: when ``fn`` raises on the main process, it
    re-raises there and the other processes raise ``MainProcessFailed`` with the same message. The result
    must be picklable (paths, small dicts). With one process this is ``fn(*args, **kwargs)``.
    """
    s = state()
    if s is None:
        return fn(*args, **kwargs)
    from accelerate.utils import broadcast_object_list

    outcome: list[Any] = [None]
    error: BaseException | None = None
    if s.is_main_process:
        try:
            outcome[0] = ("ok", fn(*args, **kwargs))
        except BaseException as ex:  # sent to the others first, then re-raised here
            error = ex
            outcome[0] = ("error", f"{type(ex).__name__}: {ex}")
    broadcast_object_list(outcome, from_process=0)
    status, value = outcome[0]
    if error is not None:
        raise error
    if status == "error":
        raise MainProcessFailed(f"the main process failed, so process {s.process_index} stops too: {value}")
    return value
