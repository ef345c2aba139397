from __future__ import annotations

import json
import pickle
import re
import runpy
from pathlib import Path

import pytest
import torch

from flearning.cli import main
from flearning.errors import FlearnError
from flearning.models import check_model_dir, load_model, model_fingerprint, resolve_model
from tiny import tiny_llama, tiny_tokenizer


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


def test_model_info_cli_on_local_dir(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLEARN_CACHE", str(tmp_path / "my-cache"))
    assert main(["model", "info", "--model", str(tiny_model_dir), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["architecture"] == "LlamaForCausalLM"
    assert facts["parameters"] == 26816  # tied embedding counted once
    assert facts["tied_embeddings"] is True
    assert facts["dtype"] == "float32"
    assert facts["path"] == str(tiny_model_dir)
    assert facts["cache"] == str(tmp_path / "my-cache")


def test_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    commands = {m.group(1) for m in re.finditer(r"^│ ([a-z]+)  ", out, flags=re.MULTILINE)}
    assert {"data", "model", "update", "bench", "eval", "vector"} <= commands


def remote_code_model(root: Path, model_type: str) -> Path:
    """A model directory whose config points at its own Python code, which leaves a marker file when it
    is imported."""
    marker = root / "remote-code-ran"
    path = root / "remote-code-model"
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {
        "AutoConfig": "custom_model.CustomConfig",
        "AutoModelForCausalLM": "custom_model.CustomForCausalLM",
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "custom_model.py").write_text(f"from pathlib import Path\n\nPath({str(marker)!r}).touch()\n")
    return path


def test_remote_code_is_refused_by_default(tmp_path, capsys):
    path = remote_code_model(tmp_path, model_type="flearn-custom")  # no built-in class: needs its code
    marker = tmp_path / "remote-code-ran"
    runpy.run_path(str(path / "custom_model.py"))  # the marker works ...
    assert marker.is_file()
    marker.unlink()

    with pytest.raises(FlearnError, match="contains custom code which must be executed"):
        load_model(path)
    assert main(["-q", "model", "info", "--model", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot load model '{path}': ") and "trust_remote_code=True" in err
    assert not marker.exists()  # ... and the model's code never ran


def test_remote_code_is_ignored_when_a_built_in_class_exists(tmp_path):
    path = remote_code_model(tmp_path, model_type="llama")
    model, _ = load_model(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not (tmp_path / "remote-code-ran").exists()
