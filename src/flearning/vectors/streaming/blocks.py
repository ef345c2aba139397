"""Block arithmetic for streaming: θ + λ·Δ and tuned − base on a block of rows, into reused buffers.

The expressions are those of ``ops.updated_values`` (fp32, cast back) and ``ops.difference``, through
the same kernels with ``out=``; both are elementwise, so blocks give bit-identical results (tests
compare them on every float dtype). Also here: the background checks and what an operation returns.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class BlockBuffers:
    """Reusable output buffers for the block arithmetic.

    A fresh block-sized tensor costs more than the arithmetic on it (page faults and zeroing), so every
    block result is written into a buffer that lives for the whole operation. A tensor returned from
    here is valid until the same slot is asked again.
    """

    def __init__(self) -> None:
        self._store: dict[tuple[str, Any], torch.Tensor] = {}

    def get(self, slot: str, dtype: torch.dtype, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        import torch

        n = math.prod(shape)
        buffer = self._store.get((slot, dtype))
        if buffer is None or buffer.numel() < n:
            buffer = self._store[(slot, dtype)] = torch.empty(max(n, 1), dtype=dtype)
        return buffer[:n].view(shape)


def _as(tensor: torch.Tensor, dtype: torch.dtype, buffers: BlockBuffers, slot: str) -> torch.Tensor:
    """``tensor.to(dtype)`` (the same conversion: ``to`` is a ``copy_``), into a buffer if it converts."""
    if tensor.dtype == dtype:
        return tensor
    return buffers.get(slot, dtype, tensor.shape).copy_(tensor)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, in one pass: min and max propagate NaN and ±inf (faster than
    ``torch.isfinite(t).all()``, which builds several temporaries)."""
    import torch

    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.reshape(-1))
    return math.isfinite(float(low)) and math.isfinite(float(high))


def updated_block(
    theta: torch.Tensor, delta: torch.Tensor, lam: float, buffers: BlockBuffers
) -> tuple[torch.Tensor, int]:
    """θ + lam·Δ for one block: ``ops.updated_values``' arithmetic without its allocations.

    The same operations in the same order (``θ.to(compute) + lam * Δ.to(compute)``, compute = at least
    fp32, then ``.to(θ.dtype)``), so the values are bit-identical.

    Args:
        theta: a block of the stored parameter.
        delta: the same block of Δ (fp32).
        lam: the finite scale.
        buffers: where the result goes.

    Returns:
        (the new block in θ's dtype, valid until the next call; how many values are not finite).
    """
    import torch

    compute = torch.promote_types(theta.dtype, torch.float32)
    out = buffers.get("new", compute, theta.shape)
    torch.mul(_as(delta, compute, buffers, "delta"), lam, out=out)
    torch.add(_as(theta, compute, buffers, "theta"), out, out=out)
    new = _as(out, theta.dtype, buffers, "cast")
    if all_finite(new):
        return new, 0
    return new, int((~torch.isfinite(new)).sum())


def difference_block(base: torch.Tensor, tuned: torch.Tensor, buffers: BlockBuffers) -> torch.Tensor:
    """``tuned − base`` in fp32 for one block: ``ops.difference``' expression, into a buffer."""
    import torch

    out = buffers.get("difference", torch.float32, base.shape)
    return torch.sub(
        _as(tuned, torch.float32, buffers, "tuned"), _as(base, torch.float32, buffers, "base"), out=out
    )


class Background:
    """Run hashing (base fingerprint, vector checksums) on the second core while the main thread writes.

    Hashing releases the GIL, and the main thread is mostly in the kernel (reads, writes) or torch, so
    the checks cost little wall time. They must all pass before the output is renamed into place
    (``wait``); the main thread also polls them between shards (``raise_failed``) to stop early.
    """

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="flearn-check")
        self._futures: list[Any] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        future = self._pool.submit(fn, *args)
        self._futures.append(future)
        return future

    def raise_failed(self) -> None:
        for future in self._futures:
            if future.done() and future.exception() is not None:
                raise future.exception()

    def wait(self) -> None:
        for future in self._futures:
            future.result()

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class StreamResult:
    """What a streaming operation wrote."""

    path: Path
    num_tensors: int  # tensors in the vector / tensors changed in the model
    num_params: int
    num_shards: int
    bytes_written: int
    seconds: float
    norm: float | None = None  # vectors: ‖Δ‖₂ (fp32 dot per block, summed in fp64: for display)
    max_abs: float | None = None
    dropped_zero: tuple[str, ...] = field(default_factory=tuple)
