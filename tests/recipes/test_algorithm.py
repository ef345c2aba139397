"""The one forget stage: Δ_old is trained once per cache directory, read back unchanged, θ left as it was."""

from __future__ import annotations

import json

import pytest
import torch

import flearning.recipes.algorithm as algorithm
from flearning.data.records import KnowledgeRecord
from flearning.recipes.algorithm import forget_stage
from flearning.training import LoraSettings, TrainConfig
from tiny import tiny_llama, toy_facts

PAIRS = [KnowledgeRecord(**f).old_pair for f in toy_facts(8)]


def stage(lora: bool) -> TrainConfig:
    settings = LoraSettings(r=2, target_modules=["q_proj"]) if lora else None
    return TrainConfig(lr=1e-2, max_steps=2, batch_size=4, seed=0, lora=settings)


def no_training(*args, **kwargs):
    raise AssertionError("the forget stage trained although its cache holds Δ_old")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_forget_stage_trains_once_per_cache_and_leaves_theta_unchanged(
    lora, tokenizer, tmp_path, monkeypatch
):
    model = tiny_llama()
    theta = {k: v.clone() for k, v in model.state_dict().items()}
    cache = tmp_path / "forget" / "key"

    first = forget_stage(model, tokenizer, PAIRS, stage(lora), cache=cache, progress=False)
    assert first.trained and len(first.losses) == first.steps == 2 and first.tokens > 0
    assert sorted(p.name for p in cache.iterdir()) == ["vector.json", "vector.safetensors"]
    state = model.state_dict()
    assert state.keys() == theta.keys() and all(torch.equal(state[k], theta[k]) for k in theta)
    assert all(p.requires_grad for p in model.parameters())  # a LoRA stage's freezing is undone

    monkeypatch.setattr(algorithm, "train", no_training)
    again = forget_stage(model, tokenizer, PAIRS, stage(lora), cache=cache, progress=False)
    assert not again.trained and again.losses is None and again.tokens is None  # no trace was kept
    assert again.vector.deltas.keys() == first.vector.deltas.keys()
    assert all(torch.equal(again.vector.deltas[k], first.vector.deltas[k]) for k in first.vector.deltas)


def test_a_requested_trace_is_part_of_a_finished_stage(tokenizer, tmp_path, monkeypatch):
    model, cache, trace = tiny_llama(), tmp_path / "knowledge_vector", tmp_path / "forget.json"
    forget_stage(model, tokenizer, PAIRS, stage(False), cache=cache, progress=False)

    # Δ_old without its trace (another caller's cache, or one whose trace was lost) is trained again
    trained = forget_stage(model, tokenizer, PAIRS, stage(False), cache=cache, trace=trace, progress=False)
    assert trained.trained and json.loads(trace.read_text())["losses"] == trained.losses

    monkeypatch.setattr(algorithm, "train", no_training)
    read = forget_stage(model, tokenizer, PAIRS, stage(False), cache=cache, trace=trace, progress=False)
    assert not read.trained
    assert (read.losses, read.tokens, read.steps) == (trained.losses, trained.tokens, trained.steps)
