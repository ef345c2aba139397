from __future__ import annotations

from pathlib import Path

import pytest

from tiny import tiny_llama, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer):
    """A tiny Llama saved as a Hugging Face directory (safetensors + tokenizer)."""
    path = tmp_path / "tiny-model"
    tiny_llama().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests never write to the user's cache; the embedded model's conversion is shared across tests
    through one session-wide directory so it runs once per test session."""
    cache = tmp_path_factory.getbasetemp() / "flearn-cache"
    monkeypatch.setenv("FLEARN_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
