"""Shared bits of the benchmark scripts: machine facts, the matmul roofline, JSON output."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parent.parent


def repo_path(path: str | os.PathLike) -> str:
    """``path`` as results record it: relative to the repository; a file of the shared data as
    ``../shared/data/...`` (where the README puts it beside the repository, wherever this script runs
    from: a snapshot worktree too); elsewhere outside it, its last two parts marked as such (never an
    absolute path of this machine)."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(REPO))
    except ValueError:
        pass
    parts = resolved.parts
    for i in range(len(parts) - 1):
        if parts[i : i + 2] == ("shared", "data"):
            return str(Path("..", *parts[i:]))
    return f"{Path(*parts[-2:])} (outside the repository)"


def machine() -> dict:
    """Where a benchmark ran: the run records' machine facts (CPU model and vector instructions: hosts of
    this project differ, AVX-512 Xeons and AVX2-only EPYCs) and torch's version."""
    from flearning.recipes.run_record import machine_facts

    facts = machine_facts()
    return {
        "platform": facts["platform"],
        "processor": facts["cpu"],
        "simd": facts["simd"],
        "cpu_count": facts["cores"],
        "torch_threads": facts["threads"],
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
