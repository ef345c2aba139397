"""FSDP2: a model's weights sharded over the processes, and the arithmetic on their local shards.

Under ``accelerate launch`` with an FSDP2 config (``fsdp_version: 2``; accelerate then sets
``ACCELERATE_USE_FSDP=true`` and ``FSDP_VERSION=2``) the trainer shards the model with torch's own
FSDP2 API (``torch.distributed.fsdp.fully_shard``): one shard unit per decoder block, plus the root for
the embeddings, final norm and (tied) head. Every parameter then is a ``DTensor`` whose local tensor holds
rows ``chunk(dim 0)[rank]`` of the whole parameter. It is torch's API rather than accelerate's model
preparation because accelerate applies FSDP only on GPUs (its ``MULTI_CPU`` mode is DDP), and the same
code must run, and be tested, on CPU processes with gloo; on GPUs accelerate leaves an already sharded
model as it is.

Element-wise arithmetic (Δ = θ_T − θ, θ' = θ − λ·Δ, ft-c's clamp) runs on the local shards with no
communication. Reductions to a number do not: a DTensor's ``.item()`` after ``count_nonzero`` or
``abs().max()`` gives the *local* value (measured, torch 2.13), so ``count_nonzero``, ``all_finite`` and
``abs_max`` here reduce over the processes explicitly. Gathering a whole parameter (``full``) is a
collective every process must call in the same order; it is used only to write files (checkpoints,
vectors, the model) one parameter at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from flearning.distributed import launched_processes, state
from flearning.errors import FlearnError

if TYPE_CHECKING:
    import torch


def fsdp_version_requested() -> int | None:
    """The FSDP version the launcher asked for (accelerate's ``ACCELERATE_USE_FSDP`` / ``FSDP_VERSION``),
    or None when it asked for none."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ("1", "true", "yes"):
        return None
    try:
        return int(os.environ.get("FSDP_VERSION", "1"))
    except ValueError:
        return 1


def fsdp2_requested() -> bool:
    """Whether the training stages shard the model with FSDP2 (launched as several processes with an
    FSDP2 config).

    Raises:
        FlearnError: FSDP version 1 was asked for (not supported: use ``fsdp_version: 2``).
    """
    version = fsdp_version_requested()
    if version is None or launched_processes() == 1:
        return False
    if version != 2:
        raise FlearnError(
            f"the accelerate config asks for FSDP version {version}; flearn shards with FSDP2 only: set "
            "fsdp_config.fsdp_version: 2 (configs/accelerate/fsdp2.yaml, docs/DISTRIBUTED.md)"
        )
    return True


def is_dtensor(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (DTensors)."""
    return any(is_dtensor(p) for p in model.parameters())


def block_classes(model: torch.nn.Module) -> set[str]:
    """Class names of the modules that become one shard unit each: ``FSDP_TRANSFORMER_CLS_TO_WRAP``
    (accelerate's ``fsdp_transformer_layer_cls_to_wrap``, comma-separated) or the model's own
    ``_no_split_modules`` (``LlamaDecoderLayer``, ...), looked up through a peft wrapper."""
    given = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    if given.strip():
        return {name.strip() for name in given.split(",") if name.strip()}
    inner = model
    while True:
        names = getattr(inner, "_no_split_modules", None)
        if names:
            return set(names)
        nxt = getattr(inner, "base_model", None) or getattr(inner, "model", None)
        if nxt is None or nxt is inner:
            return set()
        inner = nxt


def shard_model(model: torch.nn.Module, device_type: str) -> torch.nn.Module:
    """Shard ``model`` in place over the launched processes (FSDP2): each decoder block, then the root.

    Args:
        model: a plain or peft-wrapped model, the same on every process.
        device_type: ``"cpu"`` or the accelerator's device type (``"cuda"``).
    Returns:
        The same module, now an ``FSDPModule`` whose parameters are DTensors.
    Raises:
        FlearnError: no module of the block classes was found.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    classes = block_classes(model)
    blocks = [m for m in model.modules() if type(m).__name__ in classes]
    if not blocks:
        looked = sorted(classes) if classes else "its _no_split_modules (none)"
        raise FlearnError(
            f"FSDP2: no decoder block to shard in {type(model).__name__} (looked for {looked}); set "
            "fsdp_config.fsdp_transformer_layer_cls_to_wrap in the accelerate config"
        )
    mesh = init_device_mesh(device_type, (launched_processes(),))
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in ("1", "true", "yes")
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    return model


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor; any other tensor as it is."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every process calls it, in the same order); any
    other tensor as it is."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def like(whole: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``whole`` sharded as ``reference`` is (this process keeps its rows, no communication: every process
    holds ``whole``); ``whole`` itself when ``reference`` is not a DTensor."""
    if not is_dtensor(reference):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        whole.to(reference.dtype), reference.device_mesh, reference.placements, src_data_rank=None
    )


def _reduce(value: float, op: str) -> float:
    import torch
    import torch.distributed as dist

    box = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(box, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return float(box.item())


def count_nonzero(tensor: torch.Tensor) -> int:
    """Non-zero elements of the whole tensor (over every process's shard of a DTensor)."""
    count = int(local(tensor).count_nonzero().item())
    return int(_reduce(count, "sum")) if is_dtensor(tensor) else count


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element of the whole tensor is finite."""
    import torch

    bad = float((~torch.isfinite(local(tensor))).any().item())
    return (_reduce(bad, "max") if is_dtensor(tensor) else bad) == 0.0


def abs_max(tensor: torch.Tensor) -> float:
    """The largest magnitude in the whole tensor (0 for an empty shard)."""
    part = local(tensor)
    value = float(part.abs().max()) if part.numel() else 0.0
    return _reduce(value, "max") if is_dtensor(tensor) else value


def gathered(items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor on the CPU) one at a time, on the main process; the other processes take
    part in each gather and yield nothing. Peak memory: one whole tensor per process."""
    s = state()
    main = s is None or s.is_main_process
    for name, tensor in items:
        whole = full(tensor.detach())
        if main:
            yield name, whole.cpu()
        del whole


def gathered_dict(items: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``gathered`` collected into a dict (empty on the other processes)."""
    return dict(gathered(items))


def whole_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole ``state_dict()`` on the main process (empty on the others), gathered one tensor
    at a time; a tied weight's second name points at the same tensor, as in a live model, so that
    ``save_pretrained(state_dict=...)`` writes it once. Peak memory of the main process: the whole
    model once, plus one tensor."""
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases[name] = canonical.setdefault(id(param), name)
    items = [(k, v) for k, v in model.state_dict().items() if aliases.get(k, k) == k]
    whole = gathered_dict(items)
    if whole:
        for name, target in aliases.items():
            if name != target and target in whole:
                whole[name] = whole[target]
    return whole


def average_replicated_grads(params: Iterable[torch.Tensor]) -> None:
    """Average over the processes the gradients of trainable tensors that are not sharded (a LoRA
    adapter's factors on a sharded model): FSDP2 reduces only its own DTensors' gradients."""
    import torch.distributed as dist

    world = dist.get_world_size()
    for p in params:
        if p.grad is not None and not is_dtensor(p):
            dist.all_reduce(p.grad)
            p.grad.div_(world)
