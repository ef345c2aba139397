"""Pure functions on named tensors: differences, layout checks and the guarded update θ + λ·Δ.

Everything here takes and returns plain ``dict[str, Tensor]`` so it can be tested without models.
Arithmetic is done in fp32 whatever the storage dtype: a fine-tuning delta is ~1e-4 of a weight, which
bf16 (8 mantissa bits) cannot even represent as a difference.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from numbers import Real
from typing import TYPE_CHECKING

from flearning.errors import FlearnError, format_names
from flearning.sharding import all_finite, count_nonzero, is_dtensor, like, local

if TYPE_CHECKING:
    import torch


class VectorError(FlearnError):
    """A knowledge vector does not fit a model or another vector, or its files are broken."""


def check_scalar(value: object, what: str = "lambda") -> float:
    """A finite real number as ``float``; bools and NaN/inf are refused.

    Args:
        value: the number to check.
        what: its name in the error message.

    Returns:
        ``float(value)``.
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise VectorError(f"{what} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise VectorError(f"{what} must be finite, got {value}")
    return value


def dedupe_shared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop entries that alias an earlier entry's memory, keeping the first name.

    A tied model's ``state_dict()`` lists the embedding twice (``model.embed_tokens.weight`` and
    ``lm_head.weight``, one storage); ``named_parameters()`` lists it once, under the first name. We keep
    the same convention so that applying a vector never updates a tied weight twice.

    Args:
        tensors: name → tensor, in module order.

    Returns:
        A new dict without the aliases.
    """
    seen: set[tuple[int, tuple[int, ...], tuple[int, ...], int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if tensor.device.type == "meta":
            out[name] = tensor
            continue
        part = local(tensor)  # an FSDP2 shard: its local memory
        key = (part.data_ptr(), tuple(tensor.shape), tuple(part.stride()), tensor.dtype.itemsize)
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


def check_same_layout(
    first: Mapping[str, torch.Tensor],
    second: Mapping[str, torch.Tensor],
    names: tuple[str, str] = ("base", "fine-tuned"),
) -> None:
    """Raise ``VectorError`` unless both mappings have the same keys and the same shape per key.

    Args:
        first: name → tensor.
        second: name → tensor.
        names: how the two are called in the error message.

    Returns:
        None; all differences are listed together in the error.
    """
    problems: list[str] = []
    only_first = [k for k in first if k not in second]
    only_second = [k for k in second if k not in first]
    problems += [f"{k}: only in {names[0]}" for k in only_first]
    problems += [f"{k}: only in {names[1]}" for k in only_second]
    for key, tensor in first.items():
        other = second.get(key)
        if other is not None and tuple(tensor.shape) != tuple(other.shape):
            problems.append(
                f"{key}: shape {tuple(tensor.shape)} in {names[0]}, {tuple(other.shape)} in {names[1]}"
            )
    if problems:
        raise VectorError(
            f"{names[0]} and {names[1]} have different parameters ({len(problems)} differences):"
            + format_names(problems)
        )


def difference(
    base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``finetuned − base`` per tensor, in fp32 on the CPU; keys and shapes must match exactly.

    Args:
        base: parameters before fine-tuning.
        finetuned: parameters after fine-tuning.

    Returns:
        name → fp32 delta, in the order of ``base``.
    """
    import torch

    check_same_layout(base, finetuned)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, b in base.items():
            f = finetuned[key]
            if not (b.is_floating_point() and f.is_floating_point()):
                raise VectorError(f"{key}: not a floating-point tensor ({b.dtype} / {f.dtype})")
            out[key] = f.detach().to("cpu", torch.float32) - b.detach().to("cpu", torch.float32)
    return out


def drop_zero(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Split off tensors that are exactly zero everywhere (frozen parameters).

    Dropping them is lossless: θ + λ·0 = θ bit for bit.

    Args:
        tensors: name → delta.

    Returns:
        (the non-zero tensors, the names that were dropped).
    """
    kept: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, tensor in tensors.items():
        if count_nonzero(tensor) == 0:  # over every process's shard
            dropped.append(key)
        else:
            kept[key] = tensor
    return kept, dropped


def parameter_aliases(model: torch.nn.Module) -> dict[str, str]:
    """Every parameter name of a model, shared ones included, mapped to its canonical name.

    Args:
        model: any ``torch.nn.Module``.

    Returns:
        name → the name ``named_parameters()`` uses for the same tensor (itself if not shared).
    """
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases[name] = canonical.setdefault(id(param), name)
    return aliases


def check_applicable(
    params: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    aliases: Mapping[str, str] | None = None,
) -> None:
    """Raise ``VectorError`` unless every key of ``delta`` names a parameter of the same shape.

    A delta may cover a subset of the parameters. A key that is a second name of a tied parameter is
    refused: the tensor would otherwise be updated under one name while the vector thinks of two.

    Args:
        params: the model's parameters (``dict(model.named_parameters())``).
        delta: name → delta.
        aliases: ``parameter_aliases(model)``, to explain tied names in the error.

    Returns:
        None; all problems are listed together in the error.
    """
    aliases = aliases or {}
    problems: list[str] = []
    for key, d in delta.items():
        param = params.get(key)
        if param is None:
            target = aliases.get(key)
            if target is not None and target != key:
                problems.append(
                    f"{key}: tied to {target} in this model; a vector must hold a tied weight once, "
                    f"under {target}"
                )
            else:
                problems.append(f"{key}: no such parameter in the model")
        elif tuple(param.shape) != tuple(d.shape):
            problems.append(f"{key}: shape {tuple(d.shape)} in the vector, {tuple(param.shape)} in the model")
        elif not param.is_floating_point():
            problems.append(f"{key}: the model parameter is {param.dtype}, not floating point")
    if problems:
        raise VectorError(
            f"the vector does not fit the model ({len(problems)} problems):" + format_names(problems)
        )


def updated_values(
    params: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], lam: float
) -> dict[str, torch.Tensor]:
    """New values ``θ + lam·Δ`` for the keys of ``delta``, computed in (at least) fp32, cast back to θ's dtype.

    Nothing is written: callers write only after every tensor was computed and checked, so a NaN or
    inf in any tensor leaves the model untouched.

    Args:
        params: name → current parameter (any floating dtype, any device).
        delta: name → fp32 delta; every key must be in ``params`` with the same shape.
        lam: the finite scale λ.

    Returns:
        name → new tensor (dtype and device of the parameter).
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    with torch.no_grad():
        for key, d in delta.items():
            param = params[key]
            # At least fp32 (bf16/fp16 cannot hold a small delta); fp64 stays fp64.
            compute = torch.promote_types(param.dtype, torch.float32)
            if is_dtensor(param) and not is_dtensor(d):  # a whole delta (read from disk): this shard's rows
                d = like(d, param)
            new = param.detach().to(compute) + lam * d.to(param.device, compute)
            new = new.to(param.dtype)
            if not all_finite(new):  # over every process's shard
                n_bad = new.numel() - count_nonzero(torch.isfinite(new))
                bad.append(f"{key}: {n_bad} of {new.numel()} values not finite")
            out[key] = new
    if bad:
        raise VectorError(
            f"applying the vector with lambda={lam} gives NaN/inf values; the model was not changed:"
            + format_names(bad)
        )
    return out


def global_norm(tensors: Iterable[torch.Tensor]) -> float:
    """The L2 norm of all tensors taken together (accumulated in fp64).

    Args:
        tensors: the tensors.

    Returns:
        sqrt(Σ x²) as a float.
    """
    import torch

    total = 0.0
    for tensor in tensors:
        total += float(torch.linalg.vector_norm(tensor, dtype=torch.float64) ** 2)
    return math.sqrt(total)
