"""Integration tests on the embedded SmolLM2-135M (converted once per test session)."""

from __future__ import annotations

import pytest
import torch

from flearning.models import cache_root, ensure_embedded, load_model
from flearning.models.embedded import load_from_gguf

pytestmark = pytest.mark.slow


def test_conversion_runs_once_and_matches_gguf_logits(monkeypatch):
    path = ensure_embedded()
    assert path == cache_root() / "models" / "smollm2-135m"
    assert (path / "model.safetensors").is_file() and (path / ".flearn-complete").is_file()

    # A second call must not convert again.
    import flearning.models.embedded as embedded

    monkeypatch.setattr(embedded, "load_from_gguf", lambda name: pytest.fail("converted twice"))
    assert ensure_embedded() == path

    # How long this load takes is measured by benchmarks/model_load.py, not asserted here.
    converted, tok = load_model()

    reference, ref_tok = load_from_gguf("smollm2-135m")
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    assert ids.tolist() == ref_tok("The capital of France is", return_tensors="pt")["input_ids"].tolist()
    with torch.inference_mode():
        a = converted(ids).logits
        b = reference(ids).logits
    assert torch.equal(a, b)
    assert tok.decode(a[0, -1].argmax()).strip() == "Paris"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>"
