from __future__ import annotations

import json
import os
import pickle
import re
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from flearning.cli import main
from flearning.errors import FlearnError
from flearning.models import check_model_dir, load_model, model_fingerprint, resolve_model
from flearning.models.loading import (
    DECODER_FLAG_MODEL_TYPES,
    check_causal_lm,
    is_causal_lm_class,
    summarise_keys,
)
from tiny import tiny_llama, tiny_tokenizer, toy_facts


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


TINY_BERT = dict(
    vocab_size=257, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
)
CAUSAL_HEAD_HINT = "Use a model saved with a causal-LM head ({} or another *ForCausalLM class)."


def save_bert(path: Path, cls_name: str = "BertModel", **config) -> Path:
    """A tiny random BERT of class ``cls_name`` saved with safetensors, with a tokenizer."""
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(transformers.BertConfig(**TINY_BERT, **config))
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    assert (path / "model.safetensors").is_file()
    return path


def bert_refusal(path: Path) -> str:
    return (
        f"{path} is a BertModel checkpoint (architectures ['BertModel']), not a causal language model: "
        f"the weights of cls.predictions.* would be random. {CAUSAL_HEAD_HINT.format('BertLMHeadModel')}"
    )


def test_a_bert_encoder_is_refused_not_given_a_random_head(tmp_path, capsys):
    """transformers would load a saved BertModel as BertLMHeadModel with cls.predictions.* freshly random
    (and is_decoder false): a model that runs and predicts noise."""
    path = save_bert(tmp_path / "bert")
    with pytest.raises(FlearnError) as raised:
        load_model(path)
    assert str(raised.value) == bert_refusal(path)

    assert main(["-q", "model", "info", "--model", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {bert_refusal(path)}\n"  # no load report, no traceback


def facts_file(path: Path) -> Path:
    path.write_text("".join(json.dumps(f) + "\n" for f in toy_facts(2)))
    return path


def test_vector_apply_and_eval_refuse_a_bert_model_alike(tmp_path, tiny_model_dir, capsys):
    bert = save_bert(tmp_path / "bert")
    facts = facts_file(tmp_path / "facts.jsonl")
    finetuned = tmp_path / "finetuned"
    tiny_llama(seed=1).save_pretrained(finetuned)
    tiny_tokenizer().save_pretrained(finetuned)
    vector = tmp_path / "vector"
    assert main(["-q", "vector", "compute", "--base", str(tiny_model_dir), "--finetuned", str(finetuned),
                 "--out", str(vector)]) == 0  # fmt: skip
    capsys.readouterr()
    before = sorted(p.name for p in tmp_path.iterdir())
    commands = {
        "vector apply": ["vector", "apply", "--model", str(bert), "--vector", str(vector), "--lambda", "1",
                         "--out", str(tmp_path / "applied"), "--no-stream"],
        "eval": ["eval", "--model", str(bert), "--data", str(facts), "--out", str(tmp_path / "report")],
        "eval --reference": ["eval", "--model", str(tiny_model_dir), "--reference", str(bert), "--data",
                             str(facts), "--out", str(tmp_path / "report"), "--no-generation"],
    }  # fmt: skip
    for command, args in commands.items():
        assert main(["-q", *args]) == 2, command
        assert capsys.readouterr().err == f"error: {bert_refusal(bert)}\n", command
        assert sorted(p.name for p in tmp_path.iterdir()) == before, command


@pytest.mark.parametrize("kind", ["bert-mlm", "llama-trunk", "no-lm-head"])
def test_checkpoints_without_a_real_causal_lm_are_refused(kind, tmp_path):
    """No weight may be random, and a checkpoint that declares no causal-LM class must be a decoder."""
    path = tmp_path / kind
    if kind == "bert-mlm":  # every weight of BertLMHeadModel is there, but it attends to later tokens
        save_bert(path, "BertForMaskedLM")
        expected = (
            f"{path} is a BertForMaskedLM checkpoint (architectures ['BertForMaskedLM']), not a causal "
            "language model: its config is not a decoder (is_decoder is false): BertLMHeadModel would let "
            f"every position see the tokens after it. {CAUSAL_HEAD_HINT.format('BertLMHeadModel')}"
        )
    elif kind == "llama-trunk":  # tied embeddings: nothing is missing, but no head was saved
        tiny_llama().model.save_pretrained(path)
        expected = (
            f"{path} is a LlamaModel checkpoint (architectures ['LlamaModel']), not a causal language "
            "model: it was saved without a language-model head; LlamaForCausalLM would make one from its "
            f"input embeddings. {CAUSAL_HEAD_HINT.format('LlamaForCausalLM')}"
        )
    else:  # a LlamaForCausalLM with untied embeddings whose lm_head was lost
        from safetensors.torch import load_file, save_file

        tiny_llama(tie=False).save_pretrained(path)
        weights = load_file(path / "model.safetensors")
        del weights["lm_head.weight"]
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        expected = (
            f"{path} is incomplete for LlamaForCausalLM: the weights of lm_head.weight are not in the "
            "checkpoint and would be random. Use a complete checkpoint (save_pretrained of the whole "
            "causal language model)."
        )
    tiny_tokenizer().save_pretrained(path)
    with pytest.raises(FlearnError) as raised:
        load_model(path)
    assert str(raised.value) == expected


@pytest.mark.parametrize("kind", ["tied", "untied", "no-architectures", "bert-decoder"])
def test_complete_causal_lms_load(kind, tmp_path):
    """Tied weights (lm_head = embed_tokens, as in SmolLM2 and the tiny Llamas) are not reported missing;
    a config without ``architectures`` is judged by its weights; a BERT saved as a decoder is causal."""
    from transformers import AutoModelForCausalLM

    path = tmp_path / kind
    if kind == "bert-decoder":
        save_bert(path, "BertLMHeadModel", is_decoder=True)
    else:
        tiny_llama(tie=kind != "untied").save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
    if kind == "no-architectures":
        config = json.loads((path / "config.json").read_text())
        del config["architectures"]
        (path / "config.json").write_text(json.dumps(config))
    _, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    model, _ = load_model(path)
    assert type(model).__name__ == ("BertLMHeadModel" if kind == "bert-decoder" else "LlamaForCausalLM")


@pytest.mark.parametrize("architectures", [True, False], ids=["BertLMHeadModel", "no-architectures"])
def test_a_bert_lm_head_that_is_not_a_decoder_is_refused(architectures, tmp_path):
    """Every weight is there and the class is a causal LM's, but with is_decoder false BertLMHeadModel is
    bidirectional (transformers only warns "add `is_decoder=True`")."""
    path = save_bert(tmp_path / "bert-lm-head", "BertLMHeadModel")
    config = json.loads((path / "config.json").read_text())
    assert config.get("is_decoder", False) is False
    if not architectures:
        del config["architectures"]
        (path / "config.json").write_text(json.dumps(config))
    saved_as = (
        "BertLMHeadModel checkpoint (architectures ['BertLMHeadModel'])"
        if architectures
        else "bert checkpoint"
    )
    with pytest.raises(FlearnError) as raised:
        load_model(path)
    assert str(raised.value) == (
        f"{path} is a {saved_as} whose config is not a decoder (is_decoder is false): BertLMHeadModel would "
        "let every position see the tokens after it. If it was trained as a causal language model, set "
        '"is_decoder": true in its config.json.'
    )


def test_decoder_flag_model_types_are_those_whose_causal_lm_tests_is_decoder():
    """DECODER_FLAG_MODEL_TYPES lists exactly the causal-LM classes of the installed transformers whose
    __init__ tests config.is_decoder (warning "add `is_decoder=True`" or asserting it), not those that set
    it themselves (BartForCausalLM) or never read it (GPTNeoXForCausalLM)."""
    import inspect

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    tested = set()
    for model_type, names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        for name in (names,) if isinstance(names, str) else names:
            cls = getattr(transformers, name, None)
            if cls is None:
                continue
            source = inspect.getsource(cls.__init__)
            if re.search(r"(if not|assert) config\.is_decoder\b", source):
                tested.add(model_type)
    assert "bert" in tested and "bart" not in tested and "gpt_neox" not in tested
    assert tested == DECODER_FLAG_MODEL_TYPES


def chatglm_like_config(**overrides):
    """A remote-code causal LM's config as ChatGLM's: architectures names the base class, auto_map the
    causal LM."""
    from transformers import PretrainedConfig

    settings = {
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        **overrides,
    }
    return PretrainedConfig(**settings)


@pytest.mark.parametrize(
    "config",
    [
        {},  # auto_map says AutoModelForCausalLM loads this class
        {"auto_map": {"AutoModelForCausalLM": "org/repo--modeling_chatglm.ChatGLMForConditionalGeneration"}},
        {"auto_map": {}, "architectures": ["ChatGLMForConditionalGeneration"]},  # the loaded class is listed
    ],
    ids=["auto_map", "auto_map-from-another-repo", "listed-in-architectures"],
)
def test_custom_causal_lms_declared_by_auto_map_or_their_loaded_class_pass(config):
    info = {"missing_keys": [], "mismatched_keys": []}
    assert (
        check_causal_lm("glm", chatglm_like_config(**config), "ChatGLMForConditionalGeneration", info) is None
    )


def test_auto_map_of_another_class_declares_nothing():
    """A model whose auto_map was not used (a built-in class was loaded instead) is judged as before."""
    config = chatglm_like_config()
    info = {"missing_keys": [], "mismatched_keys": []}
    with pytest.raises(FlearnError) as raised:
        check_causal_lm("glm", config, "LlamaForCausalLM", info)
    assert str(raised.value) == (
        "glm is a ChatGLMModel checkpoint (architectures ['ChatGLMModel']), not a causal language model: it "
        "was saved without a language-model head; LlamaForCausalLM would make one from its input embeddings. "
        f"{CAUSAL_HEAD_HINT.format('LlamaForCausalLM')}"
    )


CUSTOM_GLM = textwrap.dedent("""
    from transformers import LlamaConfig, LlamaForCausalLM


    class FlearnGLMConfig(LlamaConfig):
        model_type = "flearn-glm"


    class FlearnGLMForConditionalGeneration(LlamaForCausalLM):
        config_class = FlearnGLMConfig
""")


def test_a_remote_code_causal_lm_named_by_its_auto_map_loads(tmp_path):
    """ChatGLM's layout, with real custom code: architectures ["FlearnGLMModel"] (its base class) and
    auto_map's AutoModelForCausalLM the class that is loaded. In a subprocess, so the copied code lands in a
    modules cache of the test's own (HF_MODULES_CACHE is read when transformers is imported)."""
    path = tmp_path / "flearn-glm"
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "flearn-glm"
    config["architectures"] = ["FlearnGLMModel"]
    config["auto_map"] = {
        "AutoConfig": "custom_glm.FlearnGLMConfig",
        "AutoModelForCausalLM": "custom_glm.FlearnGLMForConditionalGeneration",
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "custom_glm.py").write_text(CUSTOM_GLM)
    script = (
        "import sys\nfrom flearning.models import load_model\n"
        "model, _ = load_model(sys.argv[1], trust_remote_code=True)\nprint(type(model).__name__)\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "FlearnGLMForConditionalGeneration\n"
    assert (tmp_path / "modules").is_dir()


def test_causal_lm_classes_and_key_summaries():
    for name in (
        "LlamaForCausalLM",
        "GPT2LMHeadModel",
        "ReformerModelWithLMHead",
        "Gemma3ForConditionalGeneration",
    ):
        assert is_causal_lm_class(name), name
    for name in ("BertModel", "BertForMaskedLM", "LlamaModel", "T5ForConditionalGeneration"):
        assert not is_causal_lm_class(name), name
    assert summarise_keys(["lm_head.weight"]) == "lm_head.weight"
    assert (
        summarise_keys(["cls.predictions.bias", "cls.predictions.transform.dense.weight"])
        == "cls.predictions.*"
    )
    keys = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(2)] + [f"x{i}.w" for i in range(5)]
    assert summarise_keys(keys) == "model.layers.*, x0.w, x1.w, x2.w and 2 more"


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
