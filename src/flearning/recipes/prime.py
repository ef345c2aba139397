"""Prime: teach a base model the OLD facts until it demonstrably holds them.

Every method of the bench starts from the same θ that knows K_old. A fixed few epochs do not get a small
model there, so the priming stage trains until teacher-forced accuracy on K_old reaches a threshold,
checking after every epoch, up to a maximum number of epochs, and reports what was reached. Its
defaults are the bench's prime settings (``flearning.config.PrimeSettings``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from flearning.config import PrimeSettings, StopRule
from flearning.data.records import KnowledgeRecord
from flearning.recipes.stopping import train_until
from flearning.training import TrainConfig

if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from flearning.training.trainer import StatsCallback


@dataclass
class PrimeResult:
    model: PreTrainedModel
    accuracy_before: float  # teacher-forced accuracy of target_old, 0..1
    accuracy: float
    epochs: int
    seconds: float
    history: list[tuple[int, float]] = field(default_factory=list)  # (epoch, accuracy)
    losses: list[float] = field(default_factory=list)


def prime(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[KnowledgeRecord],
    cfg: TrainConfig | None = None,
    *,
    threshold: float | None | Literal["default"] = "default",
    progress: bool = True,
    on_stats: StatsCallback | None = None,
) -> PrimeResult:
    """Fine-tune ``model`` in place on (prompt, target_old) until old-fact accuracy ≥ ``threshold``
    or ``cfg.epochs`` epochs have run (threshold None: exactly ``cfg.epochs``, the paper's way).

    Args:
        model: the base model θ₀ (fp32).
        tokenizer: its tokenizer.
        records: the facts; their ``target_old`` is taught.
        cfg: stage settings; ``epochs`` is the maximum (default: ``PrimeSettings``, the bench's).
        threshold: stop as soon as accuracy reaches this (0..1; ``"default"``: ``PrimeSettings.threshold``;
            None: no threshold, accuracy measured before and after only).
        progress: progress bars.
        on_stats: ``train``'s per-step callback (experiment tracking).
    Returns:
        ``PrimeResult`` with θ, accuracy before/after and per-epoch history.
    """
    defaults = PrimeSettings()
    cfg = cfg or defaults.train_config(seed=0)
    threshold = defaults.threshold if threshold == "default" else threshold
    start = time.perf_counter()
    if threshold is None:
        return _prime_fixed(model, tokenizer, records, cfg, start, progress, on_stats)
    stage = train_until(
        model,
        tokenizer,
        [r.old_pair for r in records],
        cfg,
        StopRule(until_accuracy=threshold),
        description="prime: teach old facts",
        progress=progress,
        on_stats=on_stats,
    )
    history = [(row["epoch"], row["accuracy"]) for row in stage.history]
    return PrimeResult(
        stage.result.model,
        stage.accuracy_before,
        history[-1][1],
        history[-1][0],
        time.perf_counter() - start,
        history,
        stage.result.losses,
    )


def _prime_fixed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[KnowledgeRecord],
    cfg: TrainConfig,
    start: float,
    progress: bool,
    on_stats: StatsCallback | None,
) -> PrimeResult:
    """``prime`` without a threshold: ``cfg.epochs`` epochs, old-fact accuracy before and after."""
    from flearning.evaluation.evaluate import teacher_forced_accuracy

    pairs = [r.old_pair for r in records]

    def accuracy(trained: PreTrainedModel) -> float:
        scores = teacher_forced_accuracy(trained, tokenizer, pairs, template=cfg.template)
        return float(sum(scores) / len(scores))

    before = accuracy(model)
    stage = train_until(
        model,
        tokenizer,
        pairs,
        cfg,
        None,
        description="prime: teach old facts",
        progress=progress,
        on_stats=on_stats,
    )
    after = accuracy(stage.result.model)
    epochs = stage.epochs
    return PrimeResult(
        stage.result.model,
        before,
        after,
        epochs,
        time.perf_counter() - start,
        [(epochs, after)],
        stage.result.losses,
    )


def save_primed(
    directory: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    info: dict[str, Any],
    state_dict: dict[str, Any] | None = None,
) -> None:
    """Write a primed model directory atomically: the model (safetensors), its tokenizer and
    ``prime.json`` (``info``: what was taught and the accuracy reached). ``flearn prime`` and the bench's
    cache both write it; ``load_model`` reads it back. ``state_dict``: the model's whole weights when it
    is sharded (FSDP2; ``sharding.whole_state``, gathered onto the main process)."""
    import json

    from flearning.io.atomic import atomic_directory

    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        (tmp / "prime.json").write_text(json.dumps(info, indent=2) + "\n")
