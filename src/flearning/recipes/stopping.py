"""Train until the facts are held: one stop rule for the prime stage (old facts) and the learning stage
(new facts).

After every epoch the stage's own pairs are scored (teacher-forced accuracy, batched); the stage ends at
the first epoch that reaches ``StopRule.until_accuracy``, else at its cap (the stage's epochs). With a
locality budget, the epoch's Locality on held-out probes (against the model before the update) is
measured too; the first epoch that falls more than ``max_locality_drop`` points ends the stage, and the
best epoch within the budget (highest accuracy, the earlier on a tie) is kept. Every check is recorded
in the stage's checkpoints and the kept epoch's weights beside them, so a resumed stage stops where an
uninterrupted one would and keeps the same epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flearning.config import StopRule
from flearning.distributed import on_main_process
from flearning.evaluation.definitions import DEFAULT_BATCH_SIZE
from flearning.training import EpochCheck, TrainConfig, TrainResult, train

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from flearning.training.checkpoint import Checkpointing
    from flearning.training.trainer import StatsCallback, StepCallback

log = logging.getLogger(__name__)

STOPPED_BY = {
    "accuracy": "reached the target accuracy",
    "max_epochs": "reached the cap of epochs before the target accuracy",
    "epochs": "ran its fixed epochs",
    "locality": "Locality fell more than the budget",
}
_KEPT = "kept-epoch-{epoch:04d}.safetensors"
_KEPT_GLOB = "kept-epoch-*.safetensors"


@dataclass
class LocalityBudget:
    """Locality on probes that are not the evaluated records': the model before the update's argmax
    predictions on them, and how many points the stage may lose."""

    pairs: list[tuple[str, str]]
    reference: list[tuple[int, ...]]
    max_drop: float
    template: str = "plain"  # the prompt template the probes are encoded with (data.templates)

    @classmethod
    def measure(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        pairs: Sequence[tuple[str, str]],
        max_drop: float,
        batch_size: int = DEFAULT_BATCH_SIZE,
        template: str = "plain",
    ) -> LocalityBudget:
        """Take ``model`` (the model before the update) as the reference on ``pairs``."""
        from flearning.evaluation.evaluate import pair_scores

        scores = pair_scores(model, tokenizer, pairs, batch_size=batch_size, template=template)
        return cls(list(pairs), [s.argmax for s in scores], max_drop, template)

    def locality(self, model, tokenizer, batch_size: int = DEFAULT_BATCH_SIZE) -> float:
        from flearning.evaluation.evaluate import pair_locality, pair_scores

        scores = pair_scores(model, tokenizer, self.pairs, batch_size=batch_size, template=self.template)
        return pair_locality(self.reference, scores)


def locality_budget(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rule: StopRule | None,
    batch_size: int,
    template: str = "plain",
) -> LocalityBudget | None:
    """The budget of ``rule`` with ``model`` as the reference (None without one), its probes under the
    prompt ``template`` the stage trains with."""
    if rule is None or rule.max_locality_drop is None:
        return None
    from flearning.data.probes import load_probe_pairs

    pairs = load_probe_pairs(rule.locality_probes)
    return LocalityBudget.measure(model, tokenizer, pairs, rule.max_locality_drop, batch_size, template)


@dataclass
class StoppedStage:
    """A stage trained under a stop rule: the training result (its model is the kept epoch's) and why
    it ended."""

    result: TrainResult
    stopped_by: str  # a key of STOPPED_BY
    kept_epoch: int | None  # the epoch whose weights were kept (None: a fixed schedule, no checks)
    accuracy_before: float | None = None  # 0..1, before the first epoch
    history: list[dict[str, Any]] = field(default_factory=list)  # per epoch: epoch, accuracy, locality

    @property
    def epochs(self) -> int:
        """Epochs trained (the last check's epoch)."""
        return self.history[-1]["epoch"] if self.history else int(round(self.result.epochs))

    def to_json(self, rule: StopRule | None) -> dict[str, Any]:
        return {
            "rule": rule.to_json() if rule is not None else None,
            "stopped_by": self.stopped_by,
            "why": STOPPED_BY[self.stopped_by],
            "epochs_trained": self.epochs,
            "kept_epoch": self.kept_epoch,
            "accuracy_before": self.accuracy_before,
            "history": self.history,
        }


def train_until(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    cfg: TrainConfig,
    rule: StopRule | None,
    *,
    budget: LocalityBudget | None = None,
    description: str = "train",
    progress: bool = True,
    checkpoint: Checkpointing | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_step: StepCallback | None = None,
    on_stats: StatsCallback | None = None,
) -> StoppedStage:
    """``train`` on ``pairs``, ending the stage by ``rule`` (``cfg.epochs`` is the cap).

    Args:
        rule: when to stop; None (or an empty rule without a budget) runs ``cfg``'s schedule unchecked.
        budget: the locality budget of ``rule`` (``locality_budget``), measured on the model before the
            update; required when ``rule.max_locality_drop`` is set.
        checkpoint: the stage's checkpoints (``train``); the kept epoch's weights are saved beside them
            while a later epoch may still exceed the budget.
        batch_size: rows per forward pass of the checks.
        on_step, on_stats: ``train``'s per-step callbacks.
    """
    if rule is not None and rule.max_locality_drop is not None and budget is None:
        raise ValueError("a stop rule with a locality budget needs the budget measured (locality_budget)")
    checked = rule is not None and (rule.until_accuracy is not None or rule.max_locality_drop is not None)
    kept = _KeptEpoch(checkpoint.directory if checkpoint is not None else None)

    def accuracy(trained) -> float:
        from flearning.evaluation.evaluate import teacher_forced_accuracy

        scores = teacher_forced_accuracy(
            trained, tokenizer, pairs, batch_size=batch_size, template=cfg.template
        )
        return float(sum(scores) / len(scores))

    def check(epoch: int, trained, earlier: list[dict[str, Any]]) -> EpochCheck:
        row: dict[str, Any] = {"epoch": epoch, "accuracy": accuracy(trained)}
        reached = rule.until_accuracy is not None and row["accuracy"] >= rule.until_accuracy
        if budget is not None:
            row["locality"] = budget.locality(trained, tokenizer, batch_size)
            row["within_budget"] = 100.0 - row["locality"] <= budget.max_drop
            best = max((r["accuracy"] for r in earlier if r["within_budget"]), default=None)
            if row["within_budget"] and (best is None or row["accuracy"] > best):
                kept.keep(epoch, trained)  # the best epoch within the budget so far
        log.info("%s: after epoch %d %s", description, epoch, _describe(row))
        return EpochCheck(stop=reached or row.get("within_budget") is False, record=row)

    before = accuracy(model) if checked else None
    result = train(
        model,
        tokenizer,
        pairs,
        cfg,
        description=description,
        progress=progress,
        checkpoint=checkpoint,
        on_epoch_end=check if checked else None,
        on_step=on_step,
        on_stats=on_stats,
    )
    if not checked:  # a fixed schedule: nothing was checked
        return StoppedStage(result, "epochs", None)
    history = result.epoch_log
    last = history[-1]
    kept_epoch = last["epoch"]
    if last.get("within_budget") is False:
        stopped_by = "locality"
        within = [r for r in history if r["within_budget"]]
        if within:
            kept_epoch = max(within, key=lambda r: (r["accuracy"], -r["epoch"]))["epoch"]
            kept.restore(kept_epoch, result.model)
        else:
            log.warning(
                "%s: Locality fell more than %.1f points already after epoch 1; keeping epoch 1",
                description,
                budget.max_drop,
            )
    elif rule.until_accuracy is not None and last["accuracy"] >= rule.until_accuracy:
        stopped_by = "accuracy"
    else:
        stopped_by = "max_epochs" if rule.until_accuracy is not None else "epochs"
    if stopped_by == "max_epochs":
        log.warning(
            "%s: accuracy %.3f after %d epochs is below the target %.2f",
            description,
            last["accuracy"],
            last["epoch"],
            rule.until_accuracy,
        )
    return StoppedStage(result, stopped_by, kept_epoch, before, history)


def _describe(row: dict[str, Any]) -> str:
    text = f"accuracy {row['accuracy']:.3f}"
    if "locality" in row:
        text += f", held-out Locality {row['locality']:.1f}" + (
            "" if row["within_budget"] else " (over budget)"
        )
    return text


class _KeptEpoch:
    """The trainable weights of the best epoch within the budget: in memory, and (with a checkpoint
    directory) in a safetensors file beside the checkpoints, which a resumed stage reads back."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.epoch: int | None = None
        self.weights: dict[str, torch.Tensor] | None = None

    def _file(self, epoch: int) -> Path:
        return self.directory / _KEPT.format(epoch=epoch)

    def keep(self, epoch: int, model: torch.nn.Module) -> None:
        self.epoch = epoch
        self.weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if self.directory is not None:
            on_main_process(self._save, epoch, self.weights)

    def _save(self, epoch: int, weights: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        from flearning.io.atomic import atomic_write

        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(
            self._file(epoch),
            lambda tmp: save_file({n: w.contiguous() for n, w in weights.items()}, str(tmp)),
        )
        for old in self.directory.glob(_KEPT_GLOB):
            if old != self._file(epoch):
                old.unlink(missing_ok=True)

    def restore(self, epoch: int, model: torch.nn.Module) -> None:
        """Put the kept epoch's weights back into ``model``."""
        weights = self.weights if self.epoch == epoch else None
        if weights is None:  # kept by the process that was interrupted: read it back
            from safetensors.torch import load_file

            if self.directory is None or not self._file(epoch).is_file():
                raise RuntimeError(f"the weights of epoch {epoch} were not kept")
            weights = load_file(str(self._file(epoch)))
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, value in weights.items():
                params[name].copy_(value)
