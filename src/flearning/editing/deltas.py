"""Weight updates by parameter name: applying them for good, or for the duration of a computation.

Every method of this package returns ``{parameter name: ΔW}`` in the parameter's own layout and leaves
the model as it found it (the invariant of ROME's ``execute_rome`` and MEMIT's ``execute_memit``); the
caller applies the update with ``apply_deltas`` or stores it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def apply_deltas(model: torch.nn.Module, deltas: Mapping[str, torch.Tensor], scale: float = 1.0) -> None:
    """W ← W + scale·ΔW for each named parameter, in place (``scale=-1`` takes an update back out, up to
    float rounding)."""
    import torch

    with torch.no_grad():
        for name, delta in deltas.items():
            param = model.get_parameter(name)
            if tuple(delta.shape) != tuple(param.shape):
                raise ValueError(
                    f"update of {name} has shape {tuple(delta.shape)}, the weight {tuple(param.shape)}"
                )
            param.add_(delta.to(device=param.device, dtype=param.dtype), alpha=scale)


@contextmanager
def original_weights(model: torch.nn.Module, names: list[str]) -> Iterator[None]:
    """Inside, the named parameters may be changed; on exit they are restored bit for bit."""
    import torch

    saved = {name: model.get_parameter(name).detach().clone() for name in names}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                model.get_parameter(name).copy_(value)


def add_delta(deltas: dict[str, torch.Tensor], name: str, delta: torch.Tensor) -> None:
    """Accumulate ``delta`` into ``deltas[name]``."""
    deltas[name] = deltas[name] + delta if name in deltas else delta
