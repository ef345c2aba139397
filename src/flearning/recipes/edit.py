"""The edit step of a method with an editor (ROME, MEMIT, AlphaEdit; ``flearning.editing``), in place of
the learning stage:

    ΔW = editor(θ', K_new)           # edit_stage: closed-form edits of edit.layers, the model unchanged
    θ* = θ' + ΔW                     # run_method applies it (θ' = θ for the baselines)

ΔW is a knowledge vector like any other (``EditOutcome.vector``: ``flearn update`` writes it as
``edit_vector/``). The checks an update makes before any work (every fact has a subject in its prompt,
the layers exist in the model, the corpus of C can be read) are here too. This module is where the
editors meet the rest of the project: ``flearning.editing`` knows nothing of configs or vectors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flearning.config import EditPlan
from flearning.errors import FlearnError, InputError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from flearning.data.records import KnowledgeRecord
    from flearning.editing import CovarianceSettings
    from flearning.vectors import KnowledgeVector, Provenance

log = logging.getLogger(__name__)


@dataclass
class EditOutcome:
    """ΔW of an edit step and how it was found."""

    deltas: dict[str, torch.Tensor]  # {parameter name: ΔW}, in the parameter's layout
    plan: EditPlan
    fingerprint: str  # ``model_fingerprint`` of the model edited (θ, or θ' after forgetting)
    seconds: float
    requests: int
    batches: int
    # the value optimisation per request: its loss at the first and the last evaluation, Adam steps
    loss_before: list[float] = field(default_factory=list)
    loss_after: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """What ``run.json`` records of the edit step (its settings are in ``stages.edit``)."""

        def mean(xs: Sequence[float]) -> float | None:
            return round(sum(xs) / len(xs), 6) if xs else None

        return {
            "editor": self.plan.editor,
            "layers": list(self.plan.layers),
            "requests": self.requests,
            "batches": self.batches,
            "parameters": sorted(self.deltas),
            "value_loss_before": mean(self.loss_before),
            "value_loss_after": mean(self.loss_after),
            "value_steps": mean(self.steps),
            "seconds": round(self.seconds, 3),
        }

    def scalars(self) -> dict[str, float]:
        """The step's numbers for the experiment trackers (``edit/value_loss_after`` ...)."""
        summary = self.to_json()
        keys = ("value_loss_before", "value_loss_after", "value_steps", "seconds")
        return {f"edit/{k}": float(summary[k]) for k in keys if summary.get(k) is not None}

    def vector(self, provenance: Provenance) -> KnowledgeVector:
        """ΔW as a knowledge vector (kind "full", the unedited tensors left out), its provenance naming the
        editor, the layers and every setting, on the model it was computed on."""
        import dataclasses

        from flearning.vectors import KnowledgeVector

        provenance = dataclasses.replace(
            provenance,
            method=self.plan.editor,
            base_fingerprint=self.fingerprint,
            hyperparameters=self.plan.to_json(),
        )
        deltas = {name: delta.detach().float() for name, delta in self.deltas.items()}
        return KnowledgeVector.from_deltas(deltas, provenance, kind="full")


def apply_edit(model: PreTrainedModel, edit: EditOutcome) -> None:
    """θ* = θ' + ΔW, in place."""
    from flearning.editing import apply_deltas

    apply_deltas(model, edit.deltas)


def covariance_settings(
    plan: EditPlan, model: PreTrainedModel, *, progress: bool = False
) -> CovarianceSettings:
    """Where the edit step's C = E[k kᵀ] comes from: ``plan.corpus``, its first ``covariance_tokens``
    tokens, each text cut at 512 tokens or the model's context (cached under the model cache's
    ``covariance/``)."""
    from flearning.config.edit import COVARIANCE_MAX_LENGTH
    from flearning.data.context import context_limit
    from flearning.editing import CovarianceSettings

    limit = context_limit(model.config)
    max_length = min(COVARIANCE_MAX_LENGTH, limit[0]) if limit else COVARIANCE_MAX_LENGTH
    return CovarianceSettings(
        corpus=plan.corpus, max_tokens=plan.covariance_tokens, max_length=max_length, progress=progress
    )


def edit_stage(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[KnowledgeRecord],
    plan: EditPlan,
    *,
    progress: bool = True,
) -> EditOutcome:
    """ΔW writing each record's ``target_new`` (at its ``subject``) into ``plan.layers``; the model is left
    unchanged. ROME edits the facts one after the other (``rome_edits``); MEMIT and AlphaEdit edit
    ``plan.batch_size`` facts at a time (default all at once), each batch on the model holding the
    earlier ones, with C measured once on the model as given (AlphaEdit carries the earlier batches' keys).

    Raises:
        FlearnError: a record without a usable subject, a layer the model does not have, an architecture
            the editors do not know, or a corpus that cannot be read.
    """
    from flearning.editing import second_moment, second_moments
    from flearning.editing.architectures import architecture_of, check_layers
    from flearning.editing.deltas import add_delta, apply_deltas, original_weights
    from flearning.editing.requests import as_requests
    from flearning.editing.value_cache import ValueCache
    from flearning.editing.values import ValueSettings
    from flearning.models import cache_root, model_fingerprint

    start = time.perf_counter()
    arch = architecture_of(model)
    layers = check_layers(model, plan.layers, arch)
    requests = as_requests(records)
    fingerprint = model_fingerprint(model)  # also the covariance cache's key: computed once
    settings = covariance_settings(plan, model, progress=progress)
    values = ValueSettings(**plan.values)
    value_cache = ValueCache(cache_root() / "values")  # a rerun or a resumed bench reuses each value
    found = []
    deltas: dict[str, torch.Tensor] = {}
    log.info("edit: %s on layers %s, %d facts", plan.editor, layers, len(requests))
    if plan.editor == "rome":
        if len(layers) != 1:
            raise FlearnError(f"ROME edits one layer, not {layers}: give edit.layers=[N]")
        c = (
            second_moment(model, tokenizer, arch.rewrite_name(layers[0]), settings, fingerprint=fingerprint)
            if plan.mom2_adjustment
            else None
        )
        deltas, results = _rome(model, tokenizer, requests, layers[0], c, plan, values, value_cache)
        found = [r.values for r in results]
        batches = len(requests)
    else:
        modules = [arch.rewrite_name(layer) for layer in layers]
        measured = second_moments(model, tokenizer, modules, settings, fingerprint=fingerprint)
        moments = {layer: measured[m] for layer, m in zip(layers, modules, strict=True)}
        size = plan.batch_size or len(requests)
        chunks = [requests[i : i + size] for i in range(0, len(requests), size)]
        projections = previous = None
        with original_weights(model, [arch.weight_name(layer) for layer in layers]):
            for i, chunk in enumerate(chunks):
                result = _batch(
                    model, tokenizer, chunk, layers, moments, plan, values, projections, previous, value_cache
                )
                if plan.editor == "alphaedit":
                    projections, previous = result.projections, result.keys_moment
                if i < len(chunks) - 1:  # the next batch is edited on the model holding this one
                    apply_deltas(model, result.deltas)
                for name, delta in result.deltas.items():
                    add_delta(deltas, name, delta)
                found.append(result.values)
        batches = len(chunks)
    outcome = EditOutcome(
        deltas=deltas,
        plan=plan,
        fingerprint=fingerprint,
        seconds=time.perf_counter() - start,
        requests=len(requests),
        batches=batches,
    )
    for values_found in found:
        outcome.loss_before.extend(losses[0] for losses in values_found.losses)
        outcome.loss_after.extend(losses[-1] for losses in values_found.losses)
        outcome.steps.extend(values_found.steps)
    log.info(
        "edit: %s done in %.1f s (value loss %s -> %s)",
        plan.editor,
        outcome.seconds,
        outcome.to_json()["value_loss_before"],
        outcome.to_json()["value_loss_after"],
    )
    return outcome


def _rome(model, tokenizer, requests, layer, covariance, plan: EditPlan, values, value_cache):
    from flearning.editing import rome_edits

    return rome_edits(
        model,
        tokenizer,
        requests,
        layer,
        covariance=covariance,
        mom2_adjustment=plan.mom2_adjustment,
        values=values,
        value_cache=value_cache,
    )


def _batch(
    model, tokenizer, requests, layers, moments, plan: EditPlan, values, projections, previous, value_cache
):
    from flearning.editing import alphaedit_edit, memit_edit

    if plan.editor == "memit":
        return memit_edit(
            model,
            tokenizer,
            requests,
            layers,
            mom2_update_weight=plan.mom2_update_weight,
            covariance=moments,
            values=values,
            value_cache=value_cache,
        )
    return alphaedit_edit(
        model,
        tokenizer,
        requests,
        layers,
        nullspace_threshold=plan.nullspace_threshold,
        l2=plan.l2,
        covariance=moments,
        projections=projections,
        previous_keys=previous,
        values=values,
        value_cache=value_cache,
    )


# ---- the checks before any work ----------------------------------------------------------------------


def check_requests(records: Sequence[KnowledgeRecord], locations: Sequence[Any] | None = None) -> None:
    """Every fact can be edited: it has a subject, found in its prompt, and a new target.

    Raises:
        InputError: every record that cannot, as ``file:record N:subject: why``.
    """
    from flearning.editing.requests import request_problems

    problems = request_problems(records, locations)
    if problems:
        raise InputError(problems, what="facts for an editor (ROME, MEMIT, AlphaEdit)")


def check_edit_target(model_config: Any, plan: EditPlan) -> None:
    """The model's architecture is one the editors know and has every layer of ``plan`` (from its config:
    before its weights are loaded).

    Raises:
        FlearnError: naming the supported model types, or the layers and the range the model has.
    """
    from flearning.editing.architectures import ARCHITECTURES, supported_model_types

    model_type = getattr(model_config, "model_type", None)
    if not any(model_type in arch.model_types for arch in ARCHITECTURES):
        raise FlearnError(
            f"{plan.editor} cannot edit a model of type '{model_type}' (it needs to know which module is the "
            f"MLP's output projection); supported model types: {', '.join(supported_model_types())}"
        )
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    n = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    if n is None:
        return  # check_layers names the range once the weights are loaded
    bad = [layer for layer in plan.layers if not 0 <= layer < n]
    if bad:
        raise FlearnError(
            f"edit.layers {list(plan.layers)}: the model has layers 0 to {n - 1} (layer {bad[0]} does not "
            "exist); give edit.layers=[...] within that range"
        )


def check_corpus(plan: EditPlan) -> None:
    """The corpus of C can be read (a file, a datasets directory, a shipped sample) and holds text."""
    from flearning.editing import load_corpus

    load_corpus(plan.corpus)
