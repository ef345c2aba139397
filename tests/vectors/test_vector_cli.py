"""``flearn vector compute | apply | scale | info`` on tiny model directories."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner
from vector_helpers import finetuned_copy, params, randomize_lora

from flearning.cli.vector import vector_app
from flearning.errors import FlearnError
from flearning.models import model_fingerprint
from flearning.vectors import KnowledgeVector, VectorError
from flearning.vectors.metadata import PROVENANCE_FILE
from tiny import tiny_llama


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(vector_app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture
def tuned_dir(tmp_path, tokenizer):
    path = tmp_path / "tuned"
    finetuned_copy(tiny_llama()).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def vector_dir(tmp_path, tiny_model_dir, tuned_dir):
    out = tmp_path / "vec"
    run("compute", "--base", tiny_model_dir, "--finetuned", tuned_dir, "--out", out)
    return out


def test_compute_full(vector_dir):
    vector = KnowledgeVector.load(vector_dir)
    base, tuned = tiny_llama(), finetuned_copy(tiny_llama())
    reference = KnowledgeVector.from_models(base, tuned)
    assert vector.keys() == reference.keys()
    for key in vector:
        torch.testing.assert_close(vector[key], reference[key], atol=1e-7, rtol=0)
    assert vector.metadata.base_fingerprint == model_fingerprint(base)  # saving/loading keeps the weights
    assert vector.metadata.kind == "full" and vector.metadata.method == "ft"


def test_compute_lora(tmp_path, tiny_model_dir):
    peft_model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    randomize_lora(peft_model)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    out = tmp_path / "lora-vec"
    result = run("compute", "--base", tiny_model_dir, "--lora-adapter", adapter, "--out", out)
    assert "lora vector: 4 tensors" in result.output
    vector = KnowledgeVector.load(out)
    reference = KnowledgeVector.from_lora(peft_model)
    assert vector.keys() == reference.keys()
    assert all(torch.equal(vector[k], reference[k]) for k in vector)
    assert vector.metadata.base_fingerprint == reference.metadata.base_fingerprint


def test_compute_refuses_a_pickled_adapter(tmp_path, tiny_model_dir):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.bin").write_bytes(b"not really")
    result = run(
        "compute", "--base", tiny_model_dir, "--lora-adapter", adapter, "--out", tmp_path / "v", ok=False
    )
    assert isinstance(result.exception, FlearnError)
    assert "adapter_model.bin" in str(result.exception) and "refused" in str(result.exception)


def test_compute_needs_exactly_one_source(tmp_path, tiny_model_dir, tuned_dir):
    for extra in ([], ["--finetuned", tuned_dir, "--lora-adapter", tuned_dir]):
        result = run("compute", "--base", tiny_model_dir, "--out", tmp_path / "v", *extra, ok=False)
        assert "exactly one of" in str(result.exception)


@pytest.mark.parametrize("lambda_args", [["--lambda=-0.7"], ["--lambda", "-0.7"]])
def test_apply_forgets_with_a_negative_lambda(tmp_path, tiny_model_dir, vector_dir, lambda_args):
    out = tmp_path / "forgotten"
    result = run("apply", "--model", tiny_model_dir, "--vector", vector_dir, *lambda_args, "--out", out)
    assert "lambda=-0.7" in result.output
    model = AutoModelForCausalLM.from_pretrained(out)
    vector = KnowledgeVector.load(vector_dir)
    base = params(tiny_llama())
    for key, value in params(model).items():
        expected = base[key] - 0.7 * vector[key] if key in vector else base[key]
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=0, msg=key)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert provenance["lambda"] == -0.7 and provenance["operation"] == "theta + lambda * delta"
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary dirs left


def test_apply_refuses_to_write_into_the_input_model(tmp_path, tiny_model_dir, vector_dir):
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for out in (tiny_model_dir, tiny_model_dir / "sub", tiny_model_dir.parent):
        result = run(
            "apply",
            "--model",
            tiny_model_dir,
            "--vector",
            vector_dir,
            "--lambda",
            "1",
            "--out",
            out,
            "--overwrite",
            ok=False,
        )
        assert "input model" in str(result.exception)
    assert KnowledgeVector.load(vector_dir)  # nothing was touched
    assert (tiny_model_dir / "config.json").is_file()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_apply_refuses_a_non_empty_out_unless_overwrite(tmp_path, tiny_model_dir, vector_dir):
    """--overwrite replaces an earlier output of vector apply, never a directory of the user's."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ["apply", "--model", tiny_model_dir, "--vector", vector_dir, "--out", out]
    result = run(*args, "--lambda", "1", ok=False)
    assert "not empty" in str(result.exception)
    result = run(*args, "--lambda", "1", "--overwrite", ok=False)
    assert "replaces only an earlier output of flearn vector apply" in str(result.exception)
    assert (out / "keep.txt").read_text() == "x"
    earlier = tmp_path / "earlier"
    run(*args[:-1], earlier, "--lambda", "1")
    run(*args[:-1], earlier, "--lambda", "2", "--overwrite")
    assert json.loads((earlier / PROVENANCE_FILE).read_text())["lambda"] == 2.0


def test_apply_checks_the_base_model(tmp_path, tokenizer, vector_dir):
    other = tmp_path / "other"
    tiny_llama(9).save_pretrained(other)
    tokenizer.save_pretrained(other)
    result = run(
        "apply", "--model", other, "--vector", vector_dir, "--lambda", "1", "--out", tmp_path / "o", ok=False
    )
    assert isinstance(result.exception, VectorError) and "another base model" in str(result.exception)
    run(
        "apply",
        "--model",
        other,
        "--vector",
        vector_dir,
        "--lambda",
        "1",
        "--out",
        tmp_path / "o",
        "--no-check-base",
    )


def test_scale_writes_a_new_vector(tmp_path, vector_dir):
    out = tmp_path / "scaled"
    run("scale", vector_dir, "--by", "-0.5", "--out", out)
    original, scaled = KnowledgeVector.load(vector_dir), KnowledgeVector.load(out)
    assert all(torch.equal(scaled[k], original[k] * -0.5) for k in original)
    assert scaled.metadata.history == ["scale -0.5"]
    result = run("scale", vector_dir, "--by", "nan", "--out", tmp_path / "bad", ok=False)
    assert "finite" in str(result.exception)


def test_info_shows_metadata_and_top_norms(vector_dir):
    result = run("info", vector_dir, "--top", "3")
    out = result.output
    vector = KnowledgeVector.load(vector_dir)
    assert "full" in out and vector.metadata.base_fingerprint in out
    assert f"{vector.num_params:,}" in out and f"{vector.norm():.6g}" in out
    assert "layers by norm (top 3" in out and "tensors by norm (top 3" in out
    top = max(vector.tensor_norms().items(), key=lambda kv: kv[1])[0]
    assert top[:30] in out


def test_main_reports_user_errors_with_exit_code_2(tmp_path, capsys):
    cli = pytest.importorskip("flearning.cli")
    assert cli.main(["vector", "info", str(tmp_path / "missing")]) == 2
    assert "no such knowledge-vector directory" in capsys.readouterr().err


def test_written_model_files_get_ordinary_permissions(tmp_path, tiny_model_dir, vector_dir):
    import os

    out = tmp_path / "out"
    run("apply", "--model", tiny_model_dir, "--vector", vector_dir, "--lambda", "0.5", "--out", out)
    mask = os.umask(0)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~mask
    assert all((p.stat().st_mode & 0o777) == 0o666 & ~mask for p in out.iterdir())
