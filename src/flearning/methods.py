"""The update methods of the paper, one registry.

Each method is a pair of stages: an optional *forget* stage (fine-tune a copy on the old facts, take
the knowledge vector Δ_old and subtract λ·Δ_old) and a *learn* stage (fine-tune on the new facts).
Baselines have no forget stage. All methods share the learning hyper-parameters of their learning
kind, so their results are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flearning.errors import FlearnError

StageKind = Literal["full", "lora"]


@dataclass(frozen=True)
class Method:
    name: str
    forget: StageKind | None  # None: no forgetting (baselines)
    learn: StageKind
    constrained: bool  # ft-c: L∞ bound on each weight's change while learning
    summary: str


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("ft", None, "full", False, "baseline: full fine-tuning on the new facts"),
        Method("lora", None, "lora", False, "baseline: LoRA on the new facts"),
        Method("ft-c", None, "full", True, "baseline (Zhu et al. 2020): full FT, each weight within ±ε of θ"),
        Method(
            "flearning-ft",
            "full",
            "full",
            False,
            "F-Learning: forget with a full-FT delta, learn with full FT",
        ),
        Method(
            "flearning-lora", "lora", "lora", False, "F-Learning: forget with a LoRA delta, learn with LoRA"
        ),
        Method(
            "flearning-lora-ft",
            "lora",
            "full",
            False,
            "F-Learning: forget with a LoRA delta, learn with full FT",
        ),
    )
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise FlearnError(f"unknown method '{name}'; choose one of: {', '.join(METHODS)}") from None
