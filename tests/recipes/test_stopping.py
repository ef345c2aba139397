"""The stop rule of a training stage (``recipes.stopping.train_until``) on a tiny model: it stops at the
first epoch that reaches the target accuracy, at the cap otherwise; a locality budget that is exceeded
ends the stage and restores the best epoch within it; and a stage interrupted anywhere (inside an epoch,
inside an epoch-end check) and resumed ends exactly as an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch

from flearning.config import StopRule
from flearning.recipes.stopping import LocalityBudget, train_until
from flearning.training import TrainConfig, train
from flearning.training.checkpoint import Checkpointing
from tiny import tiny_llama

PAIRS = [(f"Fact number {i} is", f"answer{i % 5}") for i in range(8)]
PROBES = [(f"Colour {i} is", "blue and green") for i in range(6)]
# 2 optimizer steps an epoch, constant lr: k epochs of a longer stage are the same k epochs as a k-epoch one
CFG = TrainConfig(lr=1e-2, epochs=8, batch_size=4)
WATCH = StopRule(max_locality_drop=100.0)  # checks every epoch, never stops: the reference trajectory


class Stop(Exception):
    """The injected failure."""


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_weights(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def budget_for(model, tokenizer, max_drop: float) -> LocalityBudget:
    return LocalityBudget.measure(model, tokenizer, PROBES, max_drop)


def until(tokenizer, rule, cfg=CFG, **kw):
    model = tiny_llama()
    budget = (
        budget_for(model, tokenizer, rule.max_locality_drop) if rule.max_locality_drop is not None else None
    )
    return train_until(model, tokenizer, PAIRS, cfg, rule, budget=budget, progress=False, **kw)


@pytest.fixture(scope="module")
def trajectory():
    """Accuracy and held-out Locality after each of 8 epochs, unstopped."""
    from tiny import tiny_tokenizer

    stage = until(tiny_tokenizer(), WATCH)
    assert stage.stopped_by == "epochs" and [r["epoch"] for r in stage.history] == list(range(1, 9))
    return stage.history


def fixed(tokenizer, epochs: int):
    return train(tiny_llama(), tokenizer, PAIRS, CFG.model_copy(update={"epochs": epochs}), progress=False)


def first_rise(values: list[float], start: int = 3) -> int:
    """The first epoch (1-based, ≥ ``start``) whose value is above every earlier one."""
    for k in range(start - 1, len(values)):
        if values[k] > max(values[:k]):
            return k + 1
    raise AssertionError(f"no epoch rises above the earlier ones: {values}")


def test_stops_at_the_first_epoch_that_reaches_the_target(tokenizer, trajectory):
    accuracies = [r["accuracy"] for r in trajectory]
    k = first_rise(accuracies)
    target = accuracies[k - 1]
    stage = until(tokenizer, StopRule(until_accuracy=target))
    assert stage.stopped_by == "accuracy" and stage.kept_epoch == k and stage.epochs == k
    assert [r["accuracy"] for r in stage.history] == accuracies[:k]
    assert stage.accuracy_before < accuracies[0] or stage.accuracy_before == pytest.approx(accuracies[0])
    assert stage.result.steps == 2 * k
    assert_same_weights(stage.result.model, fixed(tokenizer, k).model)


def test_stops_at_the_cap_when_the_target_is_not_reached(tokenizer):
    cfg = TrainConfig(lr=1e-6, epochs=3, batch_size=4)  # a random model far from 100 % accuracy
    stage = until(tokenizer, StopRule(until_accuracy=1.0), cfg)
    assert stage.stopped_by == "max_epochs" and stage.epochs == 3 and stage.kept_epoch == 3
    assert [r["epoch"] for r in stage.history] == [1, 2, 3]
    assert all(r["accuracy"] < 1.0 for r in stage.history)
    assert stage.result.steps == 6


def over_budget(trajectory) -> tuple[int, float, int]:
    """(the first epoch ≥ 3 whose Locality drop is above every earlier one, a budget only it and later
    ones may exceed, the best epoch within that budget before it)."""
    drops = [100.0 - r["locality"] for r in trajectory]
    k = first_rise(drops)
    budget = (drops[k - 1] + max(drops[: k - 1])) / 2
    best = max(trajectory[: k - 1], key=lambda r: (r["accuracy"], -r["epoch"]))["epoch"]
    return k, budget, best


def test_an_exceeded_locality_budget_keeps_the_best_epoch_within_it(tokenizer, trajectory):
    k, max_drop, best = over_budget(trajectory)
    stage = until(tokenizer, StopRule(max_locality_drop=max_drop))
    assert stage.stopped_by == "locality" and stage.epochs == k and stage.kept_epoch == best
    assert [r["within_budget"] for r in stage.history] == [True] * (k - 1) + [False]
    assert [r["locality"] for r in stage.history] == [r["locality"] for r in trajectory[:k]]
    assert_same_weights(stage.result.model, fixed(tokenizer, best).model)  # the kept epoch's weights


def test_a_budget_exceeded_after_the_first_epoch_keeps_it(tokenizer, trajectory):
    stage = until(tokenizer, StopRule(max_locality_drop=0.0))
    drop = 100.0 - trajectory[0]["locality"]
    assert drop > 0  # lr 1e-2 moves the held-out predictions at once
    assert stage.stopped_by == "locality" and stage.epochs == 1 and stage.kept_epoch == 1
    assert_same_weights(stage.result.model, fixed(tokenizer, 1).model)


def test_the_target_and_the_budget_together_stop_at_whichever_comes_first(tokenizer, trajectory):
    k, max_drop, _ = over_budget(trajectory)
    accuracies = [r["accuracy"] for r in trajectory]
    reachable = max(accuracies[: k - 1])  # reached within the budget
    stage = until(tokenizer, StopRule(until_accuracy=reachable, max_locality_drop=max_drop))
    first = accuracies.index(reachable) + 1
    assert stage.stopped_by == "accuracy" and stage.epochs == first < k


def stopper(at_step: int):
    def on_step(step: int, loss: float) -> None:
        if step == at_step:
            raise Stop(f"injected failure after step {step}")

    return on_step


@pytest.mark.parametrize("stop_at", [1, 3, 4])  # inside epoch 1, inside epoch 2, at the end of epoch 2
def test_a_resumed_accuracy_stopped_stage_equals_an_uninterrupted_one(
    tokenizer, trajectory, tmp_path, stop_at
):
    accuracies = [r["accuracy"] for r in trajectory]
    k = first_rise(accuracies)
    rule = StopRule(until_accuracy=accuracies[k - 1])
    reference = until(tokenizer, rule)
    directory = tmp_path / "ckpt"
    with pytest.raises(Stop):
        until(tokenizer, rule, checkpoint=Checkpointing(directory, every=0), on_step=stopper(stop_at))
    resumed = until(tokenizer, rule, checkpoint=Checkpointing(directory, every=0))
    assert (resumed.stopped_by, resumed.kept_epoch, resumed.history) == (
        reference.stopped_by,
        reference.kept_epoch,
        reference.history,
    )
    assert resumed.result.losses == reference.result.losses
    assert_same_weights(resumed.result.model, reference.result.model)


def test_a_stage_interrupted_inside_an_epoch_check_runs_the_check_on_resume(
    tokenizer, trajectory, tmp_path, monkeypatch
):
    """Killed while scoring epoch 1: the checkpoint holds epoch 1's weights without its check; the
    resumed stage runs that check before training on."""
    from flearning.evaluation import evaluate as evaluation

    accuracies = [r["accuracy"] for r in trajectory]
    k = first_rise(accuracies)
    rule = StopRule(until_accuracy=accuracies[k - 1])
    reference = until(tokenizer, rule)
    real = evaluation.teacher_forced_accuracy
    calls = []

    def dies_at_the_first_check(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # call 1 is the accuracy before training
            raise Stop("killed inside the check of epoch 1")
        return real(*args, **kwargs)

    directory = tmp_path / "ckpt"
    monkeypatch.setattr(evaluation, "teacher_forced_accuracy", dies_at_the_first_check)
    with pytest.raises(Stop):
        until(tokenizer, rule, checkpoint=Checkpointing(directory, every=0))
    monkeypatch.setattr(evaluation, "teacher_forced_accuracy", real)
    saved = json.loads(next(directory.glob("step-*/state.json")).read_text())
    assert saved["position"]["epoch"] == 1 and saved["position"]["epoch_log"] == []
    resumed = until(tokenizer, rule, checkpoint=Checkpointing(directory, every=0))
    assert resumed.history == reference.history and resumed.kept_epoch == reference.kept_epoch
    assert_same_weights(resumed.result.model, reference.result.model)


def test_a_resumed_budget_stopped_stage_restores_the_kept_epoch_saved_before_the_interruption(
    tokenizer, trajectory, tmp_path
):
    k, max_drop, best = over_budget(trajectory)
    rule = StopRule(max_locality_drop=max_drop)
    reference = until(tokenizer, rule)
    directory = tmp_path / "ckpt"
    with pytest.raises(Stop):  # inside epoch k: the kept epoch is known only from its file
        until(tokenizer, rule, checkpoint=Checkpointing(directory, every=0), on_step=stopper(2 * k - 1))
    assert [p.name for p in directory.glob("kept-epoch-*")] == [f"kept-epoch-{best:04d}.safetensors"]
    resumed = until(tokenizer, rule, checkpoint=Checkpointing(directory, every=0))
    assert resumed.kept_epoch == best and resumed.history == reference.history
    assert_same_weights(resumed.result.model, reference.result.model)
