"""Shared bits of the benchmark scripts: machine facts, the matmul roofline, JSON output."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parent.parent


def repo_path(path: str | os.PathLike) -> str:
    """``path`` as results record it: relative to the repository, or, outside it, its last two parts
    marked as such (never an absolute path of this machine)."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(REPO))
    except ValueError:
        return f"{Path(*resolved.parts[-2:])} (outside the repository)"


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Sustained fp32 matmul rate of this machine (GFLOP/s), the roofline for training throughput."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    seconds = time.perf_counter() - start
    return 2 * n**3 * repeats / seconds / 1e9


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path
