"""C = E[k kᵀ] of a layer's keys: its value (padding masked, token budget), the corpus readers and the
cache (a hit runs no forward; another corpus, model or budget misses)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from editing_helpers import SAMPLE, gpt2, llama

from flearning.editing.covariance import CovarianceSettings, load_corpus, second_moment, second_moments
from flearning.errors import FlearnError

DOWN_1 = "model.layers.1.mlp.down_proj"
TEXTS = [
    "The cat sat on the mat.",
    "A much longer text about lobsters and their shells, and where they live.",
    "Hi",
]


def _settings(tmp_path, **kwargs) -> CovarianceSettings:
    base = dict(corpus=TEXTS, max_tokens=10_000, max_length=128, dtype="float64", cache_dir=tmp_path / "c")
    return CovarianceSettings(**{**base, **kwargs})


def _forward_counter(model) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    return calls


def _keys_one_by_one(model, tok, module: str, texts: list[str]) -> torch.Tensor:
    """Every token's input to ``module``, each text run alone (no padding at all)."""
    rows = []
    handle = model.get_submodule(module).register_forward_hook(lambda m, args, out: rows.append(args[0][0]))
    with torch.no_grad():
        for text in texts:
            model(**tok(text, return_tensors="pt"))
    handle.remove()
    return torch.cat(rows).double()


def test_the_second_moment_masks_padding_and_keeps_the_token_budget(tmp_path, tok):
    model = llama()
    keys = _keys_one_by_one(model, tok, DOWN_1, TEXTS)
    expected = keys.T @ keys / len(keys)
    for batch_size in (1, 3):  # batches of 3 pad two of the texts
        c = second_moment(model, tok, DOWN_1, _settings(tmp_path, batch_size=batch_size, cache=False))
        assert c.dtype == torch.float64 and tuple(c.shape) == (64, 64)
        assert torch.allclose(c, expected, rtol=1e-5, atol=1e-5)
    # a budget of 30 tokens: the first 30 tokens of the corpus, in order, whatever the batching
    first = keys[:30]
    for batch_size in (1, 2):
        c = second_moment(
            model, tok, DOWN_1, _settings(tmp_path, batch_size=batch_size, max_tokens=30, cache=False)
        )
        assert torch.allclose(c, first.T @ first / 30, rtol=1e-5, atol=1e-5)
    # float32 storage is the default (ROME's mom2_dtype)
    assert (
        second_moment(model, tok, DOWN_1, _settings(tmp_path, dtype="float32", cache=False)).dtype
        == torch.float32
    )


def test_the_cache_hits_without_a_forward_and_misses_on_any_change(tmp_path, tok):
    model = llama()
    calls = _forward_counter(model)
    settings = _settings(tmp_path)
    first = second_moment(model, tok, DOWN_1, settings)
    assert calls[0] == 1  # three texts, one batch of 8
    again = second_moment(model, tok, DOWN_1, settings)
    assert calls[0] == 1 and torch.equal(first, again)
    entries = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert len(entries) == 2 and entries[0].endswith(".json") and entries[1].endswith(".safetensors")
    meta = json.loads((tmp_path / "c" / entries[0]).read_text())
    assert meta["module"] == DOWN_1 and meta["dim"] == 64 and meta["max_tokens"] == 10_000
    assert meta["tokens"] == sum(len(t) for t in TEXTS)  # one token per byte

    second_moment(model, tok, DOWN_1, replace(settings, corpus=[*TEXTS, "one more text"]))
    assert calls[0] == 2  # another corpus
    second_moment(model, tok, DOWN_1, replace(settings, max_tokens=20))
    assert calls[0] == 3  # another budget
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    changed = second_moment(model, tok, DOWN_1, settings)
    assert calls[0] == 4 and not torch.equal(changed, first)  # another model
    # several layers in one pass; the one already cached is read, not recomputed
    both = second_moments(model, tok, [DOWN_1, "model.layers.2.mlp.down_proj"], settings)
    assert calls[0] == 5 and torch.equal(both[DOWN_1], changed)
    second_moments(model, tok, [DOWN_1, "model.layers.2.mlp.down_proj"], settings)
    assert calls[0] == 5


def test_a_damaged_cache_entry_is_recomputed(tmp_path, tok):
    model = llama()
    calls = _forward_counter(model)
    settings = _settings(tmp_path)
    first = second_moment(model, tok, DOWN_1, settings)
    (tensor_file,) = (tmp_path / "c").glob("*.safetensors")
    tensor_file.write_bytes(b"not safetensors")
    assert torch.equal(second_moment(model, tok, DOWN_1, settings), first) and calls[0] == 2


def test_gpt2_keys_are_c_proj_inputs(tmp_path, tok):
    model = gpt2()
    module = "transformer.h.1.mlp.c_proj"
    keys = _keys_one_by_one(model, tok, module, TEXTS)
    c = second_moment(model, tok, module, _settings(tmp_path, cache=False))
    assert tuple(c.shape) == (64, 64)
    assert torch.allclose(c, keys.T @ keys / len(keys), rtol=1e-5, atol=1e-5)


def test_corpora_from_files_samples_and_datasets_directories(tmp_path):
    paragraphs = tmp_path / "paragraphs.txt"
    paragraphs.write_text("First paragraph,\nstill the first.\n\n  \nSecond one.\n")
    assert load_corpus(paragraphs).texts == ("First paragraph,\nstill the first.", "Second one.")
    lines = tmp_path / "lines.txt"
    lines.write_text("one\ntwo\nthree\n")
    assert load_corpus(lines).texts == ("one", "two", "three")
    assert load_corpus(lines).sha256 != load_corpus(paragraphs).sha256
    sample = load_corpus(SAMPLE)
    assert len(sample.texts) > 50 and sample.texts[0].startswith("Homarus gammarus")

    import datasets

    datasets.Dataset.from_dict({"text": ["alpha", "", "beta"], "id": [1, 2, 3]}).save_to_disk(tmp_path / "ds")
    assert load_corpus(tmp_path / "ds").texts == ("alpha", "beta")
    datasets.Dataset.from_dict({"body": ["alpha"]}).save_to_disk(tmp_path / "nodata")
    with pytest.raises(FlearnError, match="no 'text' column .*body"):
        load_corpus(tmp_path / "nodata")


def test_a_missing_corpus_says_how_to_pass_one(tmp_path, tok):
    with pytest.raises(
        FlearnError, match="does not exist; pass a text file .*sample:wikitext-2-valid-200.txt"
    ):
        load_corpus(tmp_path / "nowhere.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(FlearnError, match="holds no text"):
        load_corpus(empty)
    with pytest.raises(FlearnError, match="dtype"):
        second_moment(llama(), tok, DOWN_1, CovarianceSettings(dtype="float16"))
