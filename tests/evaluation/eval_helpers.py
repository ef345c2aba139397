"""Helpers for the evaluation tests: a context-sensitive tiny model and crafted records."""

from __future__ import annotations

import math

import torch

from flearning.data.records import KnowledgeRecord, PromptAnswer
from flearning.evaluation.definitions import METRICS
from tiny import tiny_llama


def sharp_llama(seed: int = 0, attn: str = "sdpa"):
    """A tiny Llama whose predictions depend on the context.

    The default initialisation (std 0.02, tied embeddings) makes a random model mostly predict the
    current token again, so attention, masks and positions would hardly matter; unit-variance weights
    and untied embeddings make every position depend on what it may attend to.
    """
    model = tiny_llama(seed, tie=False)
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[1]))
    model.config._attn_implementation = attn
    return model


WORDS = ["Paris", "Rome", "Berlin", "London", "Madrid", "Oslo", "Lima"]


def crafted_records(n: int = 14) -> list[KnowledgeRecord]:
    """Records of varied lengths: some without rephrases, locality or portability, shared prompts and
    shared locality pairs, so batching, packing and missing metrics are all exercised."""
    records = []
    for i in range(n):
        prompt = f"The capital of land {i} is" if i % 5 else "A shared prompt is"
        records.append(
            KnowledgeRecord(
                id=f"r{i}",
                prompt=prompt * (1 + i % 3),
                target_old=WORDS[i % 7] + "x" * (i % 3),
                target_new=WORDS[(i + 2) % 7],
                rephrase_prompts=[f"Land {i}'s capital:", f"Capital of {i}"][: i % 3],
                locality=[PromptAnswer(prompt="Water boils at", answer="100 degrees")] * (i % 2)
                + [PromptAnswer(prompt=f"Loc {i}", answer=f"ans {i % 4}")] * (i % 3 == 0),
                portability=[PromptAnswer(prompt=f"Where is land {i}?", answer="far")] if i % 4 == 0 else [],
            )
        )
    return records


def assert_same_records(batched: list[dict], single: list[dict], tol: float = 1e-6) -> float:
    """Every metric equal within ``tol`` (None where the other is None); generated text identical.

    Returns:
        The largest absolute difference seen.
    """
    assert len(batched) == len(single)
    worst = 0.0
    for a, b in zip(batched, single, strict=True):
        assert a["id"] == b["id"]
        for key in METRICS:
            if a[key] is None or b[key] is None:
                assert a[key] is None and b[key] is None, (a["id"], key, a[key], b[key])
            else:
                worst = max(worst, abs(a[key] - b[key]))
                assert abs(a[key] - b[key]) <= tol, (a["id"], key, a[key], b[key])
        for key in ("locality_by_category", "portability_by_category"):
            assert set(a.get(key, {})) == set(b.get(key, {})), (a["id"], key)
            for name, value in a.get(key, {}).items():
                worst = max(worst, abs(value - b[key][name]))
                assert abs(value - b[key][name]) <= tol, (a["id"], key, name)
        assert a.get("generated") == b.get("generated"), a["id"]
        assert a.get("fluency_text") == b.get("fluency_text"), a["id"]
        assert a.get("fluency_sampled_text") == b.get("fluency_sampled_text"), a["id"]
    return worst
