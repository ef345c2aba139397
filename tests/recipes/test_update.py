"""End-to-end updates on a tiny random Llama: every method writes a loadable model and honest files."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from flearning.cli import main
from flearning.config import UpdateConfig
from flearning.errors import FlearnError
from flearning.methods import FINE_TUNING, METHODS
from flearning.recipes.update import update
from tiny import toy_facts

FACTS = toy_facts(12)

FAST = {
    "learn": {"lr": 1e-2, "epochs": 2},
    "forget": {"lr": 1e-2, "epochs": 1},
    "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
    "eval_batch_size": 8,
}


@pytest.fixture
def facts_file(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    return path


# the editors (ROME, MEMIT, AlphaEdit and their F-Learning variants): tests/recipes/test_edit_methods.py
@pytest.mark.parametrize("method", list(FINE_TUNING))
def test_every_method_writes_a_loadable_model_and_report(method, tiny_model_dir, facts_file, tmp_path):
    out = tmp_path / f"out-{method}"
    cfg = UpdateConfig(model=str(tiny_model_dir), data=facts_file, method=method, out=out, **FAST)
    result = update(cfg, progress=False)
    assert result.out == out.resolve()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), b in zip(reloaded.named_parameters(), result.outcome.model.parameters(), strict=True):
        assert torch.equal(a, b), name
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == method
    assert run["data"]["new"]["records"] == 12
    after, before = run["metrics_after"], run["metrics_before"]
    assert after["reliability"]["n"] == 12 and after["locality"]["n"] == 12
    assert before["locality"]["mean"] == pytest.approx(100.0)  # θ against itself
    assert (out / "update_vector" / "vector.safetensors").is_file()
    assert (out / "report" / "summary.json").is_file()
    assert (out / "README.md").read_text().startswith("---")
    assert (out / "knowledge_vector").is_dir() == (METHODS[method].forget is not None)
    assert (out / "adapter" / "adapter_config.json").is_file() == (METHODS[method].learn == "lora")
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_update_vector_replays_the_update(tiny_model_dir, facts_file, tmp_path):
    from flearning.models import load_model
    from flearning.vectors import KnowledgeVector

    out = tmp_path / "out"
    update(
        UpdateConfig(model=str(tiny_model_dir), data=facts_file, method="flearning-ft", out=out, **FAST),
        progress=False,
    )
    theta, _ = load_model(tiny_model_dir)
    KnowledgeVector.load(out / "update_vector").apply_to(theta, 1.0)
    updated, _ = load_model(out)
    for (name, a), b in zip(theta.named_parameters(), updated.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_forget_stage_subtracts_lambda_times_old_vector(tiny_model_dir, facts_file, tmp_path):
    """θ' = θ − λ·Δ_old, then learning: with a learning stage of zero steps' effect (lr tiny) θ* ≈ θ'."""
    from flearning.models import load_model
    from flearning.vectors import KnowledgeVector

    out = tmp_path / "out"
    cfg = UpdateConfig(
        model=str(tiny_model_dir),
        data=facts_file,
        method="flearning-ft",
        out=out,
        **{**FAST, "learn": {"lr": 1e-12, "epochs": 1, "max_grad_norm": None}, "lambda": 0.5},
    )
    update(cfg, progress=False)
    theta, _ = load_model(tiny_model_dir)
    old = KnowledgeVector.load(out / "knowledge_vector")
    expected = {k: p.detach() - 0.5 * old[k] if k in old else p.detach() for k, p in theta.named_parameters()}
    updated, _ = load_model(out)
    for name, p in updated.named_parameters():
        torch.testing.assert_close(p, expected[name], atol=1e-6, rtol=0, msg=name)


def test_refuses_non_empty_output_and_input_model_dir(tiny_model_dir, facts_file, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("precious")
    with pytest.raises(FlearnError, match="not empty"):
        update(UpdateConfig(model=str(tiny_model_dir), data=facts_file, out=busy, **FAST), progress=False)
    with pytest.raises(FlearnError, match="input model's directory"):
        update(
            UpdateConfig(
                model=str(tiny_model_dir), data=facts_file, out=tiny_model_dir, overwrite=True, **FAST
            ),
            progress=False,
        )
    assert (busy / "keep.txt").read_text() == "precious"


def test_failure_while_saving_leaves_previous_output_untouched(
    tiny_model_dir, facts_file, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    update(
        UpdateConfig(model=str(tiny_model_dir), data=facts_file, method="ft", out=out, **FAST), progress=False
    )
    before = (out / "model.safetensors").read_bytes()

    import flearning.recipes.update as recipe

    def explode(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(recipe, "model_card", explode)
    with pytest.raises(OSError, match="disk full"):
        update(
            UpdateConfig(
                model=str(tiny_model_dir), data=facts_file, method="ft", out=out, overwrite=True, **FAST
            ),
            progress=False,
        )
    assert (out / "model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_update_with_config_and_overrides(tiny_model_dir, facts_file, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\ndata: {facts_file}\nmethod: flearning-lora-ft\nlambda: 0.3\n"
        "learn:\n  lr: 5e-5\n  epochs: 1\nforget:\n  epochs: 1\nlora:\n  r: 2\n  target_modules: [q_proj]\n"
    )
    out = tmp_path / "cli-out"
    code = main(
        ["update", "--config", str(config), "--no-progress", f"out={out}", "learn.lr=1e-2", "lambda=0.9"]
    )
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    assert run["lambda"] == 0.9
    assert run["stages"]["learn"]["lr"] == 1e-2  # override beat the YAML; "5e-5" string parsed as float
    assert run["stages"]["forget"]["lora"]["r"] == 2
    assert "reliability" in capsys.readouterr().out


def test_cli_reports_every_config_error_at_once(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("method: magic\nlambda: .nan\nlearn:\n  lr: fast\n  colour: red\n")
    code = main(["update", "--config", str(config), "out=x"])
    err = capsys.readouterr().err
    assert code == 2
    assert "invalid configuration: 4 problems" in err
    assert f"{config}:method: Value error, unknown method 'magic'" in err
    assert f"{config}:learn.lr:" in err and f"{config}:learn.colour: Extra inputs are not permitted" in err
    assert f"{config}:lambda:" in err


def test_prime_command_teaches_old_facts_and_reports(tiny_model_dir, facts_file, tmp_path, capsys):
    out = tmp_path / "primed"
    code = main(
        [
            "prime",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(facts_file),
            "--out",
            str(out),
            "--lr",
            "1e-2",
            "--max-epochs",
            "30",
            "--threshold",
            "0.5",
            "--no-progress",
        ]
    )
    assert code == 0
    info = json.loads((out / "prime.json").read_text())
    assert info["accuracy"] >= 0.5 > info["accuracy_before"]
    assert info["epochs"] < 30 and info["history"][-1][1] == info["accuracy"]
    assert "reached 0.5" in capsys.readouterr().out
    AutoModelForCausalLM.from_pretrained(out)
