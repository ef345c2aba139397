from __future__ import annotations

import json
import pickle

import pytest
import torch

from flearning.cli import main
from flearning.errors import FlearnError
from flearning.models import check_model_dir, load_model, model_fingerprint, resolve_model


def test_local_directory_loads_in_fp32_with_pad_token(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    assert next(model.parameters()).dtype == torch.float32
    assert tok.pad_token is not None and tok.padding_side == "right"
    assert not model.training


def test_missing_path_and_bad_spec_are_clear_errors(tmp_path):
    with pytest.raises(FlearnError, match="not found: not a local directory"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FlearnError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_pickle_weights_are_refused_and_never_unpickled(tmp_path, tiny_model_dir):
    class Boom:
        def __reduce__(self):  # would run on unpickling
            return (open, (str(tmp_path / "pwned"), "w"))

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (bad / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(FlearnError, match="only in pickle format"):
        load_model(bad)
    assert not (tmp_path / "pwned").exists()


def test_not_a_causal_lm_is_a_clear_error(tmp_path):
    from transformers import T5Config, T5Model

    path = tmp_path / "t5"
    T5Model(T5Config(vocab_size=50, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)).save_pretrained(
        path
    )
    with pytest.raises(FlearnError, match="not a causal language model"):
        load_model(path)


def test_fingerprint_changes_with_one_weight(tiny_model):
    before = model_fingerprint(tiny_model)
    assert model_fingerprint(tiny_model) == before
    with torch.no_grad():
        tiny_model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert model_fingerprint(tiny_model) != before


def test_check_model_dir_accepts_saved_model(tiny_model_dir):
    check_model_dir(tiny_model_dir)


def test_model_info_cli_on_local_dir(tiny_model_dir, capsys):
    assert main(["model", "info", "--model", str(tiny_model_dir), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["architecture"] == "LlamaForCausalLM"
    assert facts["parameters"] == 26816  # tied embedding counted once
    assert facts["tied_embeddings"] is True
