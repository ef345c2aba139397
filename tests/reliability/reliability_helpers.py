"""Shared pieces of the reliability tests: a small fact file and the ``flearn update`` command for a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tiny import toy_facts

FACTS = toy_facts(12)

# 12 facts, batch 8: 2 optimizer steps per epoch → forget 4 steps, learn 6 steps.
FAST = [
    "learn.lr=1e-2",
    "learn.epochs=3",
    "forget.lr=1e-2",
    "forget.epochs=2",
    "lora.r=4",
    "lora.target_modules=[q_proj, v_proj]",
    "lora.dropout=0.1",
    "eval_batch_size=8",
]


def write_facts(path: Path) -> Path:
    path.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    return path


def update_args(
    model_dir: Path, facts: Path, out: Path, method: str = "flearning-ft", *extra: str, evaluate: bool = False
) -> list[str]:
    args = [
        "update",
        "--model",
        str(model_dir),
        "--data",
        str(facts),
        "--method",
        method,
        "--out",
        str(out),
        "--no-progress",
        *FAST,
        *extra,
    ]
    if not evaluate:
        args.append("--no-eval")
    return args


def bench_args(model_dir: Path, facts: Path, out: Path, *methods: str) -> list[str]:
    """``flearn bench`` on a tiny model: one dataset ("toy", 6 edits), one seed, one epoch per stage."""
    return [
        "bench",
        "--model",
        str(model_dir),
        "--data",
        f"toy={facts}",
        "--methods",
        ",".join(methods),
        "--n",
        "6",
        "--seeds",
        "1",
        "--lambda",
        "0.5",
        "--out",
        str(out),
        "--no-progress",
        "prime.lr=1e-2",
        "prime.max_epochs=1",
        "full.lr=1e-2",
        "full.epochs=1",
        "forget_full.lr=1e-2",
        "forget_full.epochs=1",
        "generation=false",
        "eval_batch_size=4",
    ]


def assert_same_model(a: Path, b: Path) -> None:
    """Same tensors (torch.equal) and the same safetensors bytes."""
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


TIMING_WORDS = ("timing", "seconds", "time", "created", "duration", "elapsed", "per_second")


def strip_timings(value):
    """Drop every key that names a timing (``timings_seconds``, ``seconds``, ``*_per_second``, ...)."""
    if isinstance(value, dict):
        return {
            k: strip_timings(v)
            for k, v in value.items()
            if not any(w in str(k).lower() for w in TIMING_WORDS)
        }
    if isinstance(value, list):
        return [strip_timings(v) for v in value]
    return value
