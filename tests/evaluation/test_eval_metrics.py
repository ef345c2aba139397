"""The metric math on crafted logits, with hand-computed expected values."""

from __future__ import annotations

import math

import pytest
import torch

from flearning.evaluation.metrics import (
    argmax_agreement,
    group_mean,
    mean_or_none,
    mean_target_nll,
    nll_prefers_new,
    prediction_view,
    target_argmax,
    token_accuracy,
)

V = 5
PAD = 4
# prompt tokens 0, 1; target tokens 2, 3, 1
IDS = [0, 1, 2, 3, 1]
TARGET = [False, False, True, True, True]


def _log_probs(probs: list[float]) -> list[float]:
    return [math.log(p) for p in probs]


# Logits at positions 0..4 (rows = position). Position t predicts token t+1.
# pos 1 predicts target 2 with p=0.5 (argmax, correct); pos 2 predicts target 3 with p=0.2 while token 0
# has 0.6 (argmax wrong); pos 3 predicts target 1 with p=0.4 (argmax, correct). pos 0 and 4 unused.
LOGITS = [
    [9.0, -9.0, 9.0, 9.0, 9.0],  # garbage: not a predicting position
    _log_probs([0.1, 0.1, 0.5, 0.2, 0.1]),
    _log_probs([0.6, 0.1, 0.05, 0.2, 0.05]),
    _log_probs([0.2, 0.4, 0.1, 0.2, 0.1]),
    [0.0, 0.0, 0.0, 0.0, 50.0],  # garbage: the last position predicts nothing
]
EXPECTED_ACC = 2 / 3
EXPECTED_NLL = (-math.log(0.5) - math.log(0.2) - math.log(0.4)) / 3


def _single():
    return torch.tensor([LOGITS]), torch.tensor([IDS]), torch.tensor([TARGET])


def _padded_both_sides():
    """Row 0: the example left-padded by 2; row 1: right-padded by 2. Padding logits are garbage."""
    garbage = [100.0, -3.0, 7.0, 0.0, 1.0]
    logits = torch.tensor([[garbage, garbage, *LOGITS], [*LOGITS, garbage, garbage]])
    ids = torch.tensor([[PAD, PAD, *IDS], [*IDS, PAD, PAD]])
    mask = torch.tensor([[False, False, *TARGET], [*TARGET, False, False]])
    return logits, ids, mask


def test_token_accuracy_two_of_three_correct():
    acc = token_accuracy(*_single())
    assert acc.tolist() == pytest.approx([EXPECTED_ACC])
    assert round(float(acc[0]) * 100, 2) == 66.67


def test_mean_target_nll_hand_computed():
    assert mean_target_nll(*_single()).tolist() == pytest.approx([EXPECTED_NLL], abs=1e-6)


def test_padding_on_either_side_changes_nothing():
    logits, ids, mask = _padded_both_sides()
    assert token_accuracy(logits, ids, mask).tolist() == pytest.approx([EXPECTED_ACC] * 2)
    assert mean_target_nll(logits, ids, mask).tolist() == pytest.approx([EXPECTED_NLL] * 2, abs=1e-6)
    assert target_argmax(logits, mask) == [[2, 0, 1], [2, 0, 1]]


def test_target_argmax_is_the_prediction_at_each_target_position():
    logits, _, mask = _single()
    assert target_argmax(logits, mask) == [[2, 0, 1]]


def test_prediction_view_rows_and_order():
    logits, ids, mask = _padded_both_sides()
    pred, labels, rows = prediction_view(logits, ids, mask)
    assert pred.shape == (6, V)
    assert labels.tolist() == [2, 3, 1, 2, 3, 1]
    assert rows.tolist() == [0, 0, 0, 1, 1, 1]


def test_target_at_position_zero_is_rejected():
    logits, ids, _ = _single()
    with pytest.raises(ValueError, match="position 0"):
        token_accuracy(logits, ids, torch.tensor([[True, False, False, False, False]]))


def test_row_without_targets_is_nan():
    logits, ids, _ = _single()
    acc = token_accuracy(logits, ids, torch.zeros(1, 5, dtype=torch.bool))
    assert math.isnan(float(acc[0]))


def test_group_mean():
    values = torch.tensor([1.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1])
    assert group_mean(values, groups, 3).tolist()[:2] == [0.5, 1.0]
    assert math.isnan(group_mean(values, groups, 3).tolist()[2])


def test_locality_agreement_fraction():
    # Answer of 4 tokens: 3 argmaxes unchanged -> 75 %; correctness of the answer is irrelevant.
    assert argmax_agreement([5, 6, 7, 8], [5, 6, 0, 8]) == 0.75
    assert argmax_agreement([1], [1]) == 1.0
    with pytest.raises(ValueError):
        argmax_agreement([1, 2], [1])


def test_efficacy_is_strictly_lower_nll():
    assert nll_prefers_new(1.0, 2.0) == 1.0
    assert nll_prefers_new(2.0, 1.0) == 0.0
    assert nll_prefers_new(1.5, 1.5) == 0.0  # a tie does not count as preferring the new fact


def test_mean_or_none():
    assert mean_or_none([]) is None
    assert mean_or_none([1.0, 0.0, 0.5]) == 0.5
