"""The update methods of the paper, one registry.

Each method is an optional *forget* stage (fine-tune on the old facts, take the knowledge vector Δ_old
and subtract λ·Δ_old) followed by one way of writing the new facts: a *learn* stage (fine-tuning) or an
*editor* (ROME, MEMIT or AlphaEdit: closed-form edits of chosen layers, ``flearning.editing``).
Baselines have no forget stage. All methods share the settings of their learning kind (or of the
editors, ``edit:``), so their results are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flearning.errors import FlearnError

StageKind = Literal["full", "lora"]
EditorKind = Literal["rome", "memit", "alphaedit"]


@dataclass(frozen=True)
class Method:
    name: str
    forget: StageKind | None  # None: no forgetting (baselines)
    learn: StageKind | None  # None: an editor writes the new facts instead of a learning stage
    constrained: bool  # ft-c: L∞ bound on each weight's change while learning
    summary: str
    editor: EditorKind | None = None  # rome, memit, alphaedit: the edit step in place of learning

    def __post_init__(self) -> None:
        if (self.learn is None) == (self.editor is None):
            raise ValueError(f"method {self.name}: give either a learning stage or an editor")


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
        # locate-then-edit (issue #12, docs/EDITING.md): the new facts written by closed-form edits of the
        # MLP output projections of ``edit.layers``; the F-Learning variants forget with a full-FT delta
        # first (as flearning-ft, the paper's best variant), then edit θ' = θ − λ·Δ_old
        Method(
            "rome",
            None,
            None,
            False,
            "baseline (Meng et al. 2022): ROME, a rank-one edit per fact at one layer, one after the other",
            editor="rome",
        ),
        Method(
            "memit",
            None,
            None,
            False,
            "baseline (Meng et al. 2023): MEMIT, the facts in one batch spread over a range of layers",
            editor="memit",
        ),
        Method(
            "alphaedit",
            None,
            None,
            False,
            "baseline (Fang et al. 2025): AlphaEdit, MEMIT projected onto the preserved keys' null space",
            editor="alphaedit",
        ),
        Method(
            "flearning-memit",
            "full",
            None,
            False,
            "F-Learning: forget with a full-FT delta, then write the new facts with MEMIT",
            editor="memit",
        ),
        Method(
            "flearning-alphaedit",
            "full",
            None,
            False,
            "F-Learning: forget with a full-FT delta, then write the new facts with AlphaEdit",
            editor="alphaedit",
        ),
    )
}
# The methods that learn by fine-tuning (no editor): the bench's default list (the editors are added by
# the ``paper`` profile or ``methods``).
FINE_TUNING: tuple[str, ...] = tuple(name for name, m in METHODS.items() if m.editor is None)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise FlearnError(f"unknown method '{name}'; choose one of: {', '.join(METHODS)}") from None
