"""Bad input anywhere in ``flearn update`` exits with code 2 and a clear message, and writes nothing: no
output directory, no temporary directory, no work directory; a previous output stays untouched."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from reliability_helpers import update_args

from config_checks import lax_values_refused
from flearning.cli import main
from flearning.config import LearnOverrides, StageOverrides, UpdateConfig, load_config, stage_plan
from flearning.errors import ConfigError, FlearnError
from flearning.recipes.work_dir import work_dir_for
from flearning.training import TrainConfig, train
from flearning.training.config import LoraSettings
from tiny import tiny_llama


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not work_dir_for(out).exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def run_cli(args, capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


# ---- configuration ---------------------------------------------------------------------------------


def test_config_unknown_keys_and_wrong_types(tiny_model_dir, facts, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("colour: red\nseed: many\nlearn:\n  epochs: [1, 2]\n  batch_size: -1\nlora: 3\n")
    out = tmp_path / "out"
    code, err = run_cli(
        [
            "update",
            "--config",
            str(config),
            "--model",
            str(tiny_model_dir),
            "--data",
            str(facts),
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 2
    assert "invalid configuration: 5 problems" in err
    for field in ("colour", "seed", "learn.epochs", "learn.batch_size", "lora"):
        assert f"{config}:{field}:" in err
    assert "Traceback" not in err
    assert_nothing_written(out)


def test_yaml_numbers_without_a_dot_are_floats(tmp_path):
    """PyYAML reads ``5e-5`` (no dot) as a string; the config still takes it as the number 5e-5."""
    config = tmp_path / "run.yaml"
    config.write_text("lambda: 3e-1\nlinf_bound: 1E-3\nlearn:\n  lr: 5e-5\nforget:\n  lr: 1e-4\n")
    cfg = load_config(UpdateConfig, config, ["learn.weight_decay=1e-2"])
    assert cfg.learn.lr == 5e-5 and isinstance(cfg.learn.lr, float)
    assert cfg.forget.lr == 1e-4 and cfg.lam == 0.3 and cfg.linf_bound == 1e-3
    assert cfg.learn.weight_decay == 1e-2


def test_quoted_yaml_numbers_are_floats(tmp_path):
    """A quoted ``"5e-5"`` is a string to YAML too; it becomes the same float as the unquoted form."""
    config = tmp_path / "run.yaml"
    config.write_text("lambda: '3e-1'\nlearn:\n  lr: \"5e-5\"\nforget:\n  lr: '1E-4'\n")
    cfg = load_config(UpdateConfig, config, ['learn.weight_decay="1e-2"'])
    assert cfg.learn.lr == 5e-05 and isinstance(cfg.learn.lr, float)
    assert cfg.forget.lr == 1e-04 and cfg.lam == 0.3 and cfg.learn.weight_decay == 1e-02


def test_yaml_reads_core_schema_scalars_not_yaml_1_1_ones(tmp_path):
    """Unquoted, YAML 1.1 (PyYAML's default) would read ``yes``/``off`` as booleans, ``1_000`` as 1000
    and ``010`` as octal 8: configs read them as YAML 1.2 does (text, text, decimal 10)."""
    config = tmp_path / "run.yaml"
    config.write_text("overwrite: yes\nevaluate: off\nseed: 1_000\nlimit: 010\n")
    with pytest.raises(ConfigError) as info:
        load_config(UpdateConfig, config, ["learn.compile=on", "checkpoint_every=0x10"])
    assert str(info.value) == "\n".join(
        [
            "invalid configuration: 5 problems",
            f"  {config}:learn.compile: Input should be true or false, not 'on'",
            f"  {config}:seed: Input should be an integer, got the text '1_000'",
            f"  {config}:checkpoint_every: Input should be an integer, got the text '0x10'",
            f"  {config}:evaluate: Input should be true or false, not 'off'",
            f"  {config}:overwrite: Input should be true or false, not 'yes'",
        ]
    )
    assert load_config(UpdateConfig, config, ["overwrite=true", "evaluate=false", "seed=7"]).limit == 10


def test_wrong_types_are_refused_not_coerced_all_at_once(tmp_path):
    """pydantic's lax mode would take ``true`` as 1, ``"yes"`` as true and ``"1_0"`` as 10."""
    config = tmp_path / "run.yaml"
    config.write_text(
        'overwrite: "yes"\nevaluate: "off"\nseed: true\nlearn:\n  epochs: true\n  batch_size: true\n'
        '  lr: "1_0"\nlora:\n  r: "1_0"\n  dropout: false\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(UpdateConfig, config, ["generation=0", "limit=yes", "forget.add_eos=1"])
    assert str(info.value) == "\n".join(
        [
            "invalid configuration: 11 problems",
            f"  {config}:limit: Input should be an integer, got the text 'yes'",
            f"  {config}:forget.add_eos: Input should be true or false, not 1",
            f"  {config}:learn.lr: Input should be a number, got the text '1_0'",
            f"  {config}:learn.epochs: Input should be a number, not a boolean",
            f"  {config}:learn.batch_size: Input should be an integer, not a boolean",
            f"  {config}:lora.r: Input should be an integer, got the text '1_0'",
            f"  {config}:lora.dropout: Input should be a number, not a boolean",
            f"  {config}:seed: Input should be an integer, not a boolean",
            f"  {config}:evaluate: Input should be true or false, not 'off'",
            f"  {config}:generation: Input should be true or false, not 0",
            f"  {config}:overwrite: Input should be true or false, not 'yes'",
        ]
    )


def test_booleans_from_yaml_and_the_command_line_still_work(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("overwrite: false\ngeneration: false\nlearn:\n  add_eos: false\n")
    cfg = load_config(
        UpdateConfig, config, ["overwrite=true", "forget.freeze_embeddings=true"], {"evaluate": False}
    )
    assert (cfg.overwrite, cfg.evaluate, cfg.generation) == (True, False, False)
    assert cfg.learn.add_eos is False and cfg.forget.freeze_embeddings is True
    cfg = load_config(UpdateConfig, None, ["learn.batch_size=4", "seed='7'", "learn.epochs=2"], {"seed": 3})
    assert (cfg.learn.batch_size, cfg.seed, cfg.learn.epochs) == (4, 7, 2.0)
    assert isinstance(cfg.learn.epochs, float)


@pytest.mark.parametrize("model", [UpdateConfig, StageOverrides, LearnOverrides, TrainConfig, LoraSettings])
def test_every_config_number_and_switch_refuses_what_lax_mode_would_coerce(model):
    """Every number field of every config model refuses inf, NaN, 1e400, booleans and ``"1_0"``; every
    switch refuses 1, 0, ``"yes"``, ``"off"``. A field added later with a plain float/int/bool fails here."""
    checked = lax_values_refused(model)
    assert len(checked) >= 3, checked


def test_unknown_scheduler_exits_2_naming_the_field(tiny_model_dir, facts, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(update_args(tiny_model_dir, facts, out, "ft", "learn.scheduler=bogus"), capsys)
    assert code == 2
    assert err == (
        "error: invalid configuration: 1 problem\n"
        "  command line:learn.scheduler: Input should be 'linear' or 'constant'\n"
    )
    assert_nothing_written(out)


def test_invalid_stage_settings_are_a_config_error_naming_file_and_field():
    """Stage settings that got past the config's own checks (here: built without validation) are
    reported as a ConfigError by stage_plan, never as a pydantic traceback."""
    cfg = UpdateConfig.model_construct(
        method="flearning-ft",
        learn=LearnOverrides.model_construct(scheduler="bogus", lr=-1.0),
        forget=StageOverrides.model_construct(batch_size=0),
        lora=LoraSettings(),
        seed=0,
        linf_bound=5e-4,
        lam=0.7,
    )
    with pytest.raises(ConfigError) as info:
        stage_plan(cfg, source="run.yaml")
    assert str(info.value) == (
        "invalid configuration: 2 problems\n"
        "  run.yaml:learn.lr: Input should be greater than 0\n"
        "  run.yaml:learn.scheduler: Input should be 'linear' or 'constant'"
    )
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    "text", [b"\xff\xfe\x00garbage", b"[[[[" * 400 + b"]]]]" * 400, b"- a\n- b\n", b"a: [1\n"]
)
def test_config_files_that_are_not_yaml_mappings(text, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_bytes(text)
    code, err = run_cli(["update", "--config", str(config), f"out={tmp_path / 'out'}"], capsys)
    assert code == 2 and err.startswith(f"error: invalid configuration: 1 problem\n  {config}")


def test_missing_config_file(tmp_path, capsys):
    code, err = run_cli(
        ["update", "--config", str(tmp_path / "nope.yaml"), f"out={tmp_path / 'out'}"], capsys
    )
    assert code == 2 and "cannot read config" in err


@pytest.mark.parametrize(
    "override",
    [
        "lambda=.nan",
        "lambda=.inf",
        "lambda=-.inf",
        "learn.lr=.nan",
        "linf_bound=.inf",
        "learn.weight_decay=.inf",
        "learn.weight_decay=1e400",
        "learn.max_grad_norm=.inf",
        "forget.warmup_ratio=.nan",
        "lora.alpha=.inf",
        "lora.dropout=.nan",
    ],
)
def test_non_finite_numbers_are_refused(override, tiny_model_dir, facts, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(update_args(tiny_model_dir, facts, out, "flearning-ft", override), capsys)
    field = override.partition("=")[0]
    assert code == 2
    assert err == (
        f"error: invalid configuration: 1 problem\n  command line:{field}: Input should be a finite number\n"
    )
    assert_nothing_written(out)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_lambda_option_is_refused(value, tiny_model_dir, facts, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli([*update_args(tiny_model_dir, facts, out), "--lambda", value], capsys)
    assert code == 2 and f"{'command line'}:lambda: Input should be a finite number" in err
    assert_nothing_written(out)


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_seed_out_of_range(seed, tiny_model_dir, facts, tmp_path, capsys):
    code, err = run_cli([*update_args(tiny_model_dir, facts, tmp_path / "out"), "--seed", seed], capsys)
    assert code == 2 and "seed" in err


def test_unknown_lora_target_modules(tiny_model_dir, facts, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(
        update_args(tiny_model_dir, facts, out, "lora", "lora.target_modules=[no_such_layer]"), capsys
    )
    assert code == 2 and "cannot attach a LoRA adapter" in err and "no_such_layer" in err
    assert_nothing_written(out)


# ---- data --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b"", "file is empty"),
        (b"\x80\x04\x95 a pickle", "not UTF-8"),
        (b'{"prompt": "x"', "invalid dataset"),
        (b'[{"prompt": "a", "target_old": "b", "target_new": "b"}]', "invalid dataset"),
        ("dir", "is a directory"),
    ],
)
def test_bad_data_files(content, message, tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "facts.jsonl"
    if content == "dir":
        data.mkdir()
    elif content is not None:
        data.write_bytes(content)
    out = tmp_path / "out"
    code, err = run_cli(update_args(tiny_model_dir, data, out), capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert_nothing_written(out)


# ---- models ------------------------------------------------------------------------------------------


def _model_dir(kind: str, tmp_path: Path, tokenizer) -> Path:
    path = tmp_path / f"model-{kind}"
    if kind == "missing":
        return path
    if kind == "file":
        path.write_text("not a model")
        return path
    path.mkdir()
    if kind == "empty":
        return path
    if kind == "not-causal":
        from transformers import T5Config, T5Model

        T5Model(
            T5Config(d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, vocab_size=300)
        ).save_pretrained(path)
    elif kind == "bert":  # transformers would load it as BertLMHeadModel with a random cls.predictions.*
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
        BertModel(config).save_pretrained(path, safe_serialization=True)
        assert (path / "model.safetensors").is_file()
    else:
        tiny_llama().save_pretrained(path)
    if kind == "broken-config":
        (path / "config.json").write_text("{not json")
    if kind == "pickle-only":
        (path / "model.safetensors").unlink()
        (path / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    if kind != "no-tokenizer":
        tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "not found"),
        ("file", "not a directory"),
        ("empty", "no config.json"),
        ("broken-config", "not a valid JSON file"),
        ("not-causal", "is not a causal language model (T5Config)"),
        (
            "bert",
            "{path} is a BertModel checkpoint (architectures ['BertModel']), not a causal language model: "
            "the weights of cls.predictions.* would be random. Use a model saved with a causal-LM head "
            "(BertLMHeadModel or another *ForCausalLM class).",
        ),
        ("pickle-only", "weights are only in pickle format"),
        ("no-tokenizer", "cannot load the model or its tokenizer"),
    ],
)
def test_bad_model_paths(kind, message, facts, tmp_path, tokenizer, capsys):
    model = _model_dir(kind, tmp_path, tokenizer)
    out = tmp_path / "out"
    code, err = run_cli(update_args(model, facts, out), capsys)
    assert code == 2 and message.format(path=model) in err and "Traceback" not in err
    if kind == "bert":  # the whole message, and nothing else (no transformers load report)
        assert err == f"error: {message.format(path=model)}\n"
    assert_nothing_written(out)


# ---- output paths and writing ------------------------------------------------------------------------


def test_output_path_that_is_a_file(tiny_model_dir, facts, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("precious")
    code, err = run_cli(update_args(tiny_model_dir, facts, out, "ft", "--overwrite"), capsys)
    assert code == 2 and "exists and is not a directory" in err
    assert out.read_text() == "precious"


def test_output_path_that_is_not_writable(tiny_model_dir, facts, tmp_path, capsys, monkeypatch):
    import os

    # The tests run as root, for whom every directory is writable: make the check see a read-only one.
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path and real(path, mode))
    out = tmp_path / "locked" / "out"
    code, err = run_cli(update_args(tiny_model_dir, facts, out), capsys)
    assert code == 2 and "cannot write here" in err and "not a writable directory" in err
    assert not out.parent.exists()


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (errno.ENOSPC, "no space left on device (disk full)"),
        (errno.EROFS, "read-only file system"),
        (errno.EACCES, "permission denied"),
        (errno.EDQUOT, "disk quota exceeded"),
        (errno.EPERM, "operation not permitted"),
    ],
)
def test_write_failure_leaves_the_previous_output_untouched(
    code, message, tiny_model_dir, facts, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    args = update_args(tiny_model_dir, facts, out, "flearning-ft", "--overwrite")
    assert main(args) == 0
    previous = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()

    from transformers import PreTrainedModel

    real = PreTrainedModel.save_pretrained

    def failing(self, *a, **kw):
        raise OSError(code, "simulated", str(out / "model.safetensors"))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", failing)
    exit_code, err = run_cli([*args, "seed=1"], capsys)
    assert exit_code == 2
    assert f"cannot write the output at {out / 'model.safetensors'}: {message}" in err
    assert "previous output (if any) is untouched" in err and "rerun the same command to resume" in err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == previous
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    # the trained stages were kept: once the disk is fixed, the same command finishes without retraining
    assert (work_dir_for(out) / "learn").is_dir()
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real)
    assert main([*args, "seed=1"]) == 0
    assert not work_dir_for(out).exists()
    assert json.loads((out / "run.json").read_text())["seed"] == 1


def test_write_errors_reported_by_safetensors_are_recognised():
    from safetensors import SafetensorError

    from flearning.io.atomic import write_errors_as_flearn

    full = SafetensorError(
        'Error while serializing: I/O error: No space left on device (os error 28) at "/x"'
    )
    message = r"cannot write a model at /x: no space left on device \(disk full\)"
    with pytest.raises(FlearnError, match=message), write_errors_as_flearn("/x", what="a model"):
        raise full
    # other failures keep their own error and traceback
    with pytest.raises(SafetensorError), write_errors_as_flearn("/x"):
        raise SafetensorError("Error while serializing: header too large")
    with pytest.raises(OSError), write_errors_as_flearn("/x"):
        raise OSError(errno.EIO, "Input/output error")


def test_disk_full_while_checkpointing(tiny_model_dir, facts, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "out"
    code, err = run_cli(update_args(tiny_model_dir, facts, out, "ft", "checkpoint_every=1"), capsys)
    assert code == 2 and "cannot write a training checkpoint" in err and "disk full" in err
    assert not out.exists()


# ---- numbers -----------------------------------------------------------------------------------------


def test_nan_loss_exits_2_and_writes_nothing(facts, tmp_path, tokenizer, capsys):
    model = tiny_llama()
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model_dir = tmp_path / "nan-model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    code, err = run_cli(update_args(model_dir, facts, out, "flearning-ft"), capsys)
    assert code == 2
    assert "forget: FT on old facts: loss became nan at optimizer step 1 (epoch 1, batch 1)" in err
    assert_nothing_written(out)


def test_inf_loss_at_a_later_step_names_it_and_leaves_nothing(
    tiny_model_dir, facts, tmp_path, capsys, monkeypatch
):
    """The loss becomes inf at learning step 3, after the forget stage finished and two learning
    checkpoints were taken (checkpoint_every=1): the error names step and batch, and the output, its
    temporary directory and the work directory with those checkpoints are all gone."""
    import flearning.training.trainer as trainer

    real = trainer.answer_loss
    calls = []
    seen: dict[str, list[str]] = {}
    out = tmp_path / "out"

    def loss(model, batch, **options):
        calls.append(1)
        value = real(model, batch, **options)
        if len(calls) == 4 + 3:  # forget: 4 steps of one batch; then learning step 3
            work = work_dir_for(out)
            seen["learn"] = sorted(p.name for p in (work / "learn").iterdir())
            seen["work"] = sorted(p.name for p in work.iterdir())
            return value * float("inf")
        return value

    monkeypatch.setattr(trainer, "answer_loss", loss)
    code, err = run_cli(update_args(tiny_model_dir, facts, out, "flearning-ft", "checkpoint_every=1"), capsys)
    assert code == 2
    assert err == (
        "error: learn (flearning-ft): loss became inf at optimizer step 3 (epoch 2, batch 1); nothing was "
        "written. Lower the learning rate or check the data.\n"
    )
    # there was something to remove: Δ_old of the finished forget stage and the step-2 learning checkpoint
    assert seen["learn"] == ["step-00000002"]  # the latest only
    assert {"identity.json", "knowledge_vector", "forget.json", "learn"} <= set(seen["work"])
    assert_nothing_written(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["facts.jsonl", "tiny-model"]


def test_non_finite_weights_after_arithmetic_exit_2_and_write_nothing(
    tiny_model_dir, facts, tmp_path, capsys
):
    out = tmp_path / "out"
    code, err = run_cli(update_args(tiny_model_dir, facts, out, "flearning-ft", "lambda=1e300"), capsys)
    assert code == 2 and "gives NaN/inf values; the model was not changed" in err
    assert_nothing_written(out)


# ---- resources ---------------------------------------------------------------------------------------


def _oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_is_reported_with_what_to_change(tokenizer, monkeypatch):
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "forward", _oom)
    with pytest.raises(FlearnError) as info:
        train(tiny_llama(), tokenizer, [("a", "b")] * 4, TrainConfig(batch_size=4), progress=False)
    assert str(info.value) == (
        "out of memory while training (batch size 4, grad_accum 1): CUDA out of memory. Tried to allocate "
        "20.00 GiB. Try a smaller batch_size with a larger grad_accum to keep the effective batch of 4 "
        "(flearn update: learn.batch_size=2 learn.grad_accum=2, forget.* likewise; flearn prime: "
        "--batch-size 2), LoRA stages (method flearning-lora or flearning-lora-ft), or an accelerate "
        "config that shards the model (configs/accelerate/)."
    )
    # an odd batch keeps its effective size exactly: 3 × 2 → 1 × 6
    with pytest.raises(FlearnError) as info:
        train(
            tiny_llama(), tokenizer, [("a", "b")] * 4, TrainConfig(batch_size=3, grad_accum=2), progress=False
        )
    assert "effective batch of 6 (flearn update: learn.batch_size=1 learn.grad_accum=6," in str(info.value)
    # already at batch size 1: no batch advice, the other two remain
    with pytest.raises(FlearnError) as info:
        train(tiny_llama(), tokenizer, [("a", "b")] * 4, TrainConfig(batch_size=1), progress=False)
    assert str(info.value).endswith(
        "20.00 GiB. Try LoRA stages (method flearning-lora or flearning-lora-ft), or an accelerate config "
        "that shards the model (configs/accelerate/)."
    )


def test_out_of_memory_in_update_exits_2(tiny_model_dir, facts, tmp_path, capsys, monkeypatch):
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "forward", _oom)
    out = tmp_path / "out"
    code, err = run_cli(update_args(tiny_model_dir, facts, out, "ft"), capsys)
    assert code == 2 and "Traceback" not in err
    # the advice names keys flearn update takes (12 facts → one batch of 8 at learn.batch_size default)
    assert "out of memory while training (batch size 8, grad_accum 1)" in err
    assert "flearn update: learn.batch_size=4 learn.grad_accum=2, forget.* likewise" in err
    assert not out.exists()


def test_a_failed_final_rename_puts_the_previous_output_back(tmp_path, monkeypatch):
    import os

    import flearning.io.atomic as outputs

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.txt").write_text("previous")
    real = os.replace
    calls = {"n": 0}

    def second_rename_fails(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # 1: previous output aside, 2: new output into place
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", second_rename_fails)
    with pytest.raises(OSError), outputs.atomic_directory(out) as tmp:
        (tmp / "model.txt").write_text("new")
    assert (out / "model.txt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
