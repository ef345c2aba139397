"""A training stage's state under FSDP2, in and out of the one checkpoint format.

A checkpoint holds whole tensors (``training.checkpoint``), whatever the process count: under FSDP2 the
parameters and the AdamW moments are gathered onto the main process one tensor at a time before it
writes, and on resume every process reads the whole tensors and keeps its own rows (no communication).
The main process's memory while saving: the whole trainable weights and their two AdamW moments, as a
one-process checkpoint (stated in docs/DISTRIBUTED.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from flearning.sharding import gathered_dict, like


def full_state(
    named: Sequence[tuple[str, torch.nn.Parameter]], optimizer: Mapping[str, Any] | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(whole parameters, the optimizer state dict with whole moments), on the main process; the other
    processes take part in every gather and get empty values back."""
    params = gathered_dict(named)
    if optimizer is None:
        return params, None
    state: dict[Any, dict[str, Any]] = {}
    for index in sorted(optimizer["state"]):
        entry = optimizer["state"][index]
        keys = sorted(entry)
        whole = gathered_dict((key, entry[key]) for key in keys if isinstance(entry[key], torch.Tensor))
        state[index] = {key: whole.get(key, entry[key]) for key in keys}
    return params, {"state": state, "param_groups": optimizer["param_groups"]}


def restore_sharded(
    params: Mapping[str, torch.Tensor],
    optimizer_state: Mapping[str, Any] | None,
    named: Sequence[tuple[str, torch.nn.Parameter]],
    optimizer: Any,
) -> None:
    """Load whole saved tensors into the sharded parameters and optimizer: each process its own rows."""
    with torch.no_grad():
        for name, p in named:
            p.copy_(like(params[name], p))
    if optimizer_state is None:
        return
    state: dict[Any, dict[str, Any]] = {}
    for index, entry in optimizer_state["state"].items():
        p = named[int(index)][1]
        state[index] = {
            key: like(value, p)
            if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(p.shape)
            else value
            for key, value in entry.items()
        }
    optimizer.load_state_dict({"state": state, "param_groups": optimizer_state["param_groups"]})
