"""F-Learning, read top to bottom (Ni et al., ACL 2024, Algorithm 1):

    Δ_old = FT(θ, K_old) − θ          # knowledge vector of the old facts
    θ'    = θ − λ · Δ_old              # forget
    θ*    = FT(θ', K_new)              # learn

``run_method`` executes any method of the registry from a model θ that holds the old facts.
The baselines (ft, lora, ft-c) skip the first two lines.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flearning.distributed import on_main_process
from flearning.methods import Method
from flearning.training import TrainConfig, train
from flearning.vectors import KnowledgeVector

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from flearning.training.checkpoint import Checkpointing

log = logging.getLogger(__name__)


@dataclass
class StagePlan:
    """Hyper-parameters of both stages; ``forget`` is ignored by methods without forgetting."""

    learn: TrainConfig
    forget: TrainConfig | None = None
    lam: float = 0.7


@dataclass
class MethodOutcome:
    model: PreTrainedModel  # θ*, a plain (merged) model
    old_vector: KnowledgeVector | None  # Δ_old, for F-Learning methods
    adapter_dir: Path | None  # where the LoRA learning stage's adapter was saved (peft format)
    timings: dict[str, float] = field(default_factory=dict)
    losses: dict[str, list[float]] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)


def old_knowledge_vector(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    old_pairs: Sequence[tuple[str, str]],
    cfg: TrainConfig,
    *,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
    checkpoint: Checkpointing | None = None,
) -> tuple[KnowledgeVector, Any]:
    """Δ_old = FT(θ, K_old) − θ, with full fine-tuning or LoRA as ``cfg.lora`` says.

    Full: fine-tune a copy and subtract (θ stays untouched). LoRA: train an adapter on θ itself,
    read Δ = B·A·scaling per layer, then remove the adapter (θ's weights were never changed).
    ``checkpoint``: where the training stage saves and resumes its state (``train``).
    """
    meta = dict(metadata or {})
    if cfg.lora is None:
        tuned = copy.deepcopy(model)
        result = train(
            tuned,
            tokenizer,
            old_pairs,
            cfg,
            description="forget: FT on old facts",
            progress=progress,
            checkpoint=checkpoint,
        )
        vector = KnowledgeVector.from_models(model, result.model, **meta)
        del tuned
    else:
        trainable = {name: p.requires_grad for name, p in model.named_parameters()}
        result = train(
            model,
            tokenizer,
            old_pairs,
            cfg,
            description="forget: LoRA on old facts",
            progress=progress,
            checkpoint=checkpoint,
        )
        vector = KnowledgeVector.from_lora(result.model, **meta)
        result.model.unload()  # removes the LoRA layers in place, base weights unchanged
        # peft froze the base weights; a full-FT learning stage must find them trainable again
        for name, p in model.named_parameters():
            p.requires_grad_(trainable[name])
    return vector, result


def run_method(
    method: Method,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    old_pairs: Sequence[tuple[str, str]],
    new_pairs: Sequence[tuple[str, str]],
    plan: StagePlan,
    *,
    progress: bool = True,
    vector_metadata: dict[str, Any] | None = None,
    old_vector: KnowledgeVector | None = None,
    adapter_dir: Path | None = None,
    learn_checkpoint: Checkpointing | None = None,
) -> MethodOutcome:
    """Update ``model`` (θ, holding the old facts) in place with ``method``; returns θ*.

    Args:
        method: an entry of ``METHODS``.
        model: θ in fp32; it is modified.
        tokenizer: its tokenizer.
        old_pairs: (prompt, old answer) — K_old, used by the forget stage only.
        new_pairs: (prompt, new answer) — K_new.
        plan: stage hyper-parameters and λ.
        progress: progress bars.
        vector_metadata: provenance stored with Δ_old (base model, data hash, ...).
        old_vector: a Δ_old computed earlier with the same forget settings (skips the forget training).
        adapter_dir: where to save the adapter of a LoRA learning stage, before it is merged.
        learn_checkpoint: where the learning stage saves and resumes its state (``train``).
    Returns:
        ``MethodOutcome`` with θ*, Δ_old and, for a LoRA learning stage, the adapter.
    """
    outcome = MethodOutcome(model=model, old_vector=None, adapter_dir=None)

    if method.forget is not None:
        if old_vector is None:
            if plan.forget is None:
                raise ValueError(f"{method.name} needs forget-stage settings")
            start = time.perf_counter()
            old_vector, result = old_knowledge_vector(
                model, tokenizer, old_pairs, plan.forget, progress=progress, metadata=vector_metadata
            )
            outcome.timings["forget_train"] = time.perf_counter() - start
            outcome.losses["forget"] = result.losses
            outcome.tokens["forget"] = result.tokens
        start = time.perf_counter()
        old_vector.apply_to(model, -plan.lam)  # θ' = θ − λ·Δ_old
        outcome.timings["forget_apply"] = time.perf_counter() - start
        outcome.old_vector = old_vector

    learn_cfg = plan.learn
    start = time.perf_counter()
    result = train(
        model,
        tokenizer,
        new_pairs,
        learn_cfg,
        description=f"learn ({method.name})",
        progress=progress,
        checkpoint=learn_checkpoint,
    )
    outcome.timings["learn_train"] = time.perf_counter() - start
    outcome.losses["learn"] = result.losses
    outcome.tokens["learn"] = result.tokens
    if learn_cfg.lora is not None:
        if adapter_dir is not None:  # before merging: merging drops A and B
            on_main_process(result.model.save_pretrained, adapter_dir)
            outcome.adapter_dir = adapter_dir
        outcome.model = result.model.merge_and_unload()
    else:
        outcome.model = result.model
    return outcome


def learn_config(method: Method, full: TrainConfig, lora: TrainConfig, linf_bound: float) -> TrainConfig:
    """The learning stage of ``method``: the shared full or LoRA settings, plus ε for ft-c."""
    if method.learn == "lora":
        return lora
    if method.constrained:
        return full.model_copy(update={"linf_bound": linf_bound})
    return full


def release(model: torch.nn.Module | None) -> None:
    """Drop gradients so a finished stage does not keep them alive."""
    if model is not None:
        for p in model.parameters():
            p.grad = None
