"""Locate-then-edit: ROME, MEMIT and AlphaEdit write facts into the MLP output projections of chosen
layers by closed-form updates (docs/EDITING.md).

Each method returns ``{parameter name: ΔW}`` in the parameter's layout and leaves the model unchanged;
``apply_deltas`` applies an update. ``rome_edit`` (one request, one layer), ``rome_edits`` (several, one
after the other), ``memit_edit`` and ``alphaedit_edit`` (a batch over a range of layers); the closed forms
alone: ``rome_update``, ``memit_update``, ``alphaedit_update``, ``null_space_projection``; the key
statistics: ``second_moment(s)`` with ``CovarianceSettings``. Names are imported lazily (no torch at
import time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flearning.editing.alphaedit import (
        ALPHAEDIT_VALUES,
        AlphaEditResult,
        alphaedit_edit,
        alphaedit_update,
        null_space_projection,
    )
    from flearning.editing.architectures import Architecture, architecture_of, supported_model_types
    from flearning.editing.covariance import (
        Corpus,
        CovarianceSettings,
        load_corpus,
        second_moment,
        second_moments,
    )
    from flearning.editing.deltas import apply_deltas
    from flearning.editing.memit import MemitResult, memit_edit, memit_update
    from flearning.editing.requests import CONTEXT_PREFIXES, EditRequest, as_request, edit_request
    from flearning.editing.rome import RomeResult, rome_edit, rome_edits, rome_update
    from flearning.editing.value_cache import ValueCache
    from flearning.editing.values import Values, ValueSettings

_LAZY = {
    "ALPHAEDIT_VALUES": "alphaedit",
    "AlphaEditResult": "alphaedit",
    "alphaedit_edit": "alphaedit",
    "alphaedit_update": "alphaedit",
    "null_space_projection": "alphaedit",
    "Architecture": "architectures",
    "architecture_of": "architectures",
    "supported_model_types": "architectures",
    "Corpus": "covariance",
    "CovarianceSettings": "covariance",
    "load_corpus": "covariance",
    "second_moment": "covariance",
    "second_moments": "covariance",
    "apply_deltas": "deltas",
    "MemitResult": "memit",
    "memit_edit": "memit",
    "memit_update": "memit",
    "CONTEXT_PREFIXES": "requests",
    "EditRequest": "requests",
    "as_request": "requests",
    "edit_request": "requests",
    "RomeResult": "rome",
    "rome_edit": "rome",
    "rome_edits": "rome",
    "rome_update": "rome",
    "ValueCache": "value_cache",
    "ValueSettings": "values",
    "Values": "values",
}

__all__ = [
    "ALPHAEDIT_VALUES",
    "AlphaEditResult",
    "Architecture",
    "CONTEXT_PREFIXES",
    "Corpus",
    "CovarianceSettings",
    "EditRequest",
    "MemitResult",
    "RomeResult",
    "ValueCache",
    "ValueSettings",
    "Values",
    "alphaedit_edit",
    "alphaedit_update",
    "apply_deltas",
    "architecture_of",
    "as_request",
    "edit_request",
    "load_corpus",
    "memit_edit",
    "memit_update",
    "null_space_projection",
    "rome_edit",
    "rome_edits",
    "rome_update",
    "second_moment",
    "second_moments",
    "supported_model_types",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flearning.editing' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"flearning.editing.{module}"), name)
