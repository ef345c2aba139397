"""Loading models, vectors and adapters is safe and fails fast (issue #16, findings 5 and 6).

A mistyped local path is "no such model directory" at once (exit 2), never a hub lookup; a hub id is one
only when meant (``hf:org/name``, or ``org/name`` whose ``org`` is nothing local). A library's warning
prints once. Every weights file that is read (a model's ``model.safetensors``, each shard an index names,
the file config.json's ``transformers_weights`` names, a vector's files, an adapter's
``adapter_model.safetensors``) is checked before anything reads it: named ``*.safetensors`` and a valid
safetensors header whose offsets cover the file exactly. A pickle is refused unread, a truncated or
corrupt file is exit 2 naming it, never a traceback; for every command that takes the path.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from reliability_helpers import update_args

from flearning.cli import main
from flearning.errors import FlearnError
from tiny import tiny_llama

FAST_FAILURE_SECONDS = 3.0


class NetworkAttempt(BaseException):
    """Raised by the socket guard: a BaseException, so no retry loop swallows it."""


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Hub access as a user has it (HF_HUB_OFFLINE unset), with every socket refused loudly: a command
    that tries the network fails the test at once."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def refuse(*args, **kwargs):
        raise NetworkAttempt(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture
def no_unpickling(monkeypatch):
    """Every unpickler a loader could reach, recording each call (the tests assert there is none)."""
    calls: list[str] = []
    real_load, real_loads = torch.load, pickle.loads

    def spy_load(f, *args, **kwargs):
        calls.append(f"torch.load({f})")
        return real_load(f, *args, **kwargs)

    def spy_loads(data, *args, **kwargs):
        calls.append("pickle.loads")
        return real_loads(data, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy_load)
    monkeypatch.setattr(pickle, "loads", spy_loads)
    return calls


def run_cli(args: list, capsys) -> tuple[int, str, float]:
    """(exit code, stdout + stderr, seconds); an exception escaping ``main`` is what a user would see as
    a traceback, so it is returned as one (exit 1)."""
    start = time.perf_counter()
    try:
        code = main([str(a) for a in args])
        tb = ""
    except Exception:
        code, tb = 1, traceback.format_exc()
    seconds = time.perf_counter() - start
    captured = capsys.readouterr()
    return code, captured.out + captured.err + tb, seconds


def assert_refused(code: int, output: str, *needles: str) -> None:
    assert "Traceback" not in output, output
    assert code == 2, output
    for needle in needles:
        assert needle in output, (needle, output)


# ---- inputs ---------------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def tuned_dir(tmp_path, tokenizer) -> Path:
    path = tmp_path / "tuned"
    tiny_llama(1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def vector_dir(tmp_path) -> Path:
    """A knowledge vector of the tiny model (seed 0) towards seed 1, recording its base fingerprint."""
    from flearning.models import model_fingerprint
    from flearning.vectors import KnowledgeVector
    from flearning.vectors.metadata import Provenance

    base, tuned = tiny_llama(0), tiny_llama(1)
    out = tmp_path / "vector"
    KnowledgeVector.from_models(base, tuned, Provenance(base_fingerprint=model_fingerprint(base))).save(out)
    return out


@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.01)
    path = tmp_path / "adapter"
    peft_model.save_pretrained(path)
    assert (path / "adapter_model.safetensors").is_file()
    return path


def _torch_save_bytes(path: Path) -> bytes:
    """The weights of a safetensors file as ``torch.save`` writes them (a zip holding a pickle)."""
    from safetensors.torch import load_file

    target = path.with_suffix(".pt-tmp")
    torch.save(load_file(str(path)), target)
    data = target.read_bytes()
    target.unlink()
    return data


def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _sharded(tiny_model_dir: Path, path: Path) -> Path:
    """The tiny model saved in several shards with ``model.safetensors.index.json``."""
    from transformers import AutoTokenizer

    tiny_llama().save_pretrained(path, max_shard_size="20KB")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    assert (path / "model.safetensors.index.json").is_file() and not (path / "model.safetensors").exists()
    return path


# A corrupt model directory (named neutrally: the reason must be in the message, not in the path), the
# file the error must name and a word of the reason.
def corrupt_model(kind: str, good: Path, tmp_path: Path) -> tuple[Path, Path, str]:
    if kind.startswith("index") or kind == "shard-truncated":
        path = _sharded(good, tmp_path / "model-x")
    else:
        path = _copy(good, tmp_path / "model-x")
    weights = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if kind == "truncated":
        _truncate(weights)
        return path, weights, "truncated"
    if kind == "garbage":
        weights.write_bytes(b"\xff" * 64)
        return path, weights, "not a safetensors file"
    if kind == "zip-named-safetensors":
        weights.write_bytes(_torch_save_bytes(weights))
        return path, weights, "pickle"
    if kind == "shard-truncated":
        shard = sorted(set(json.loads(index.read_text())["weight_map"].values()))[-1]
        _truncate(path / shard)
        return path, path / shard, "truncated"
    if kind == "index-names-a-pickle":
        record = json.loads(index.read_text())
        shard = sorted(set(record["weight_map"].values()))[0]
        pickled = shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
        (path / pickled).write_bytes(_torch_save_bytes(path / shard))
        (path / shard).unlink()
        record["weight_map"] = {k: (pickled if v == shard else v) for k, v in record["weight_map"].items()}
        index.write_text(json.dumps(record))
        return path, path / pickled, "pickle"
    if kind == "index-malformed":
        record = json.loads(index.read_text())
        first = next(iter(record["weight_map"]))
        record["weight_map"][first] = 7
        index.write_text(json.dumps(record))
        return path, index, "not a safetensors index"
    if kind == "config-names-a-pickle":  # transformers reads config.json's transformers_weights first
        (path / "adapter_model.bin").write_bytes(_torch_save_bytes(weights))
        config = json.loads((path / "config.json").read_text())
        config["transformers_weights"] = "adapter_model.bin"
        (path / "config.json").write_text(json.dumps(config))
        return path, path / "adapter_model.bin", "pickle"
    raise AssertionError(kind)


MODEL_CORRUPTIONS = [
    "truncated",
    "garbage",
    "zip-named-safetensors",
    "shard-truncated",
    "index-names-a-pickle",
    "index-malformed",
    "config-names-a-pickle",
]


def model_commands(model: str, *, good: Path, tuned: Path, vector: Path, facts: Path, out: Path) -> dict:
    """Every command that takes a model path, with ``model`` in that place."""
    report = ["--data", facts, "--out", out, "--no-progress", "--no-generation"]
    return {
        "model info": ["model", "info", "--model", model],
        "update": update_args(model, facts, out, "ft"),
        "eval --model": ["eval", "--model", model, *report],
        "eval --reference": ["eval", "--model", good, "--reference", model, *report],
        "prime": ["prime", "--model", model, "--data", facts, "--out", out, "--no-progress"],
        "data check": ["data", "check", facts, "--model", model],
        "vector apply": [
            "vector",
            "apply",
            "--model",
            model,
            "--vector",
            vector,
            "--lambda=-0.5",
            "--out",
            out,
        ],
        "vector apply --stream": [
            *("vector", "apply", "--model", model, "--vector", vector, "--lambda=-0.5", "--out", out),
            "--stream",
        ],
        "vector compute --base": ["vector", "compute", "--base", model, "--finetuned", tuned, "--out", out],
        "vector compute --base --stream": [
            *("vector", "compute", "--base", model, "--finetuned", tuned, "--out", out, "--stream")
        ],
        "vector compute --finetuned": [
            *("vector", "compute", "--base", good, "--finetuned", model, "--out", out, "--no-stream")
        ],
        "vector compute --finetuned --stream": [
            *("vector", "compute", "--base", good, "--finetuned", model, "--out", out, "--stream")
        ],
    }


COMMANDS = list(model_commands("m", good=Path(), tuned=Path(), vector=Path(), facts=Path(), out=Path()))
# data check reads the tokenizer only, and loads no weights
WEIGHT_COMMANDS = [c for c in COMMANDS if c != "data check"]


# ---- finding 5: a mistyped local path --------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_a_mistyped_local_path_fails_at_once_without_the_network(
    command, tmp_path, monkeypatch, capsys, tiny_model_dir, tuned_dir, vector_dir, facts
):
    (tmp_path / "runs" / "facts").mkdir(parents=True)  # the user meant runs/facts and typed runs/factz
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    args = model_commands(
        "runs/factz", good=tiny_model_dir, tuned=tuned_dir, vector=vector_dir, facts=facts, out=out
    )[command]
    code, output, seconds = run_cli(args, capsys)
    assert_refused(code, output, "no such model directory: runs/factz")
    assert seconds < FAST_FAILURE_SECONDS, seconds
    assert not out.exists()


@pytest.mark.parametrize(
    "spec",
    [
        "runs/factz",
        "./factz",
        "../factz",
        "~/no-such-flearn-model",
        "factz",
        "runs/facts/x",
        "org/na me",
        "ABS",
    ],
)
def test_a_path_that_does_not_exist_is_no_such_model_directory(spec, tmp_path, monkeypatch):
    from flearning.models import resolve_model

    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    spec = str(tmp_path / "gone" / "model") if spec == "ABS" else spec
    with pytest.raises(FlearnError, match="no such model directory") as refused:
        resolve_model(spec)
    assert spec in str(refused.value)


def test_a_hub_id_is_used_only_when_meant(tmp_path, monkeypatch):
    from flearning.models import resolve_model

    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("someorg/some-model") == "someorg/some-model"  # nothing local named someorg
    assert resolve_model("hf:runs/factz") == "runs/factz"  # explicit: the hub, though runs/ is local
    assert resolve_model(resolve_model("hf:runs/factz")) == "runs/factz"  # resolving twice is the same
    assert resolve_model("hf:gpt2") == "gpt2"
    with pytest.raises(FlearnError, match="not a hub id"):
        resolve_model("hf:not a/repo")


def test_an_explicit_hub_id_reaches_the_hub_lookup(tmp_path, monkeypatch, capsys):
    """``hf:runs/factz`` asks the hub (here: the offline cache) for runs/factz, though runs/ is local."""
    import huggingface_hub.constants
    from transformers import AutoConfig

    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    asked: list[str] = []
    real = AutoConfig.from_pretrained.__func__

    def spy(cls, name, *args, **kwargs):
        asked.append(str(name))
        return real(cls, name, *args, **kwargs)

    monkeypatch.setattr(AutoConfig, "from_pretrained", classmethod(spy))
    code, output, seconds = run_cli(["model", "info", "--model", "hf:runs/factz"], capsys)
    assert asked == ["runs/factz"]
    assert_refused(code, output, "cannot load model 'hf:runs/factz'")
    assert "no such model directory" not in output
    assert seconds < FAST_FAILURE_SECONDS


_OFFLINE_DRIVER = """
import socket, sys, time
def refuse(*args, **kwargs):
    raise socket.gaierror(-2, "Name or service not known")
socket.getaddrinfo = refuse  # no network: every hub request fails at once, as on an offline machine
time.sleep = lambda seconds: None  # huggingface_hub's backoff between retries
from flearning.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("ci", [False, True], ids=["plain", "CI=1"])
def test_a_library_warning_prints_once(ci, tmp_path):
    """A hub id with the network down: huggingface_hub warns on each retry; each warning is one line.
    (It has its own stderr handler and also propagates to the root logger the CLI configures; with
    CI set, transformers does the same.)"""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "CI")}
    env["HF_HOME"] = str(tmp_path / "hf-home")  # an empty hub cache
    if ci:
        env["CI"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", _OFFLINE_DRIVER, "model", "info", "--model", "someorg/some-model"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    retries = [line for line in result.stderr.splitlines() if "Retrying in" in line]
    assert retries, result.stderr  # the warnings this test is about were printed
    assert sum("[Retry 1/" in line for line in retries) == 1, result.stderr
    assert len(retries) == len(set(retries)), result.stderr


# ---- finding 6: corrupt weights and pickles behind an index ------------------------------------------------


def _run_on_corrupt_model(kind, command, tmp_path, capsys, tiny_model_dir, tuned_dir, vector_dir, facts):
    model, named, reason = corrupt_model(kind, tiny_model_dir, tmp_path)
    out = tmp_path / "out"
    args = model_commands(
        model, good=tiny_model_dir, tuned=tuned_dir, vector=vector_dir, facts=facts, out=out
    )
    code, output, _ = run_cli(args[command], capsys)
    assert_refused(code, output, str(named), reason)
    assert not out.exists()


@pytest.mark.parametrize("command", WEIGHT_COMMANDS)
@pytest.mark.parametrize("kind", ["truncated", "index-names-a-pickle"])
def test_corrupt_weights_are_exit_2_naming_the_file_in_every_command(
    kind, command, tmp_path, capsys, no_unpickling, tiny_model_dir, tuned_dir, vector_dir, facts
):
    _run_on_corrupt_model(kind, command, tmp_path, capsys, tiny_model_dir, tuned_dir, vector_dir, facts)
    assert no_unpickling == []


@pytest.mark.parametrize("command", ["model info", "vector compute --base --stream"])
@pytest.mark.parametrize("kind", MODEL_CORRUPTIONS)
def test_every_kind_of_corrupt_model_is_refused_by_both_readers(
    kind, command, tmp_path, capsys, no_unpickling, tiny_model_dir, tuned_dir, vector_dir, facts
):
    """The loader (``load_model``) and the streamed reader (``open_checkpoint``) refuse alike."""
    _run_on_corrupt_model(kind, command, tmp_path, capsys, tiny_model_dir, tuned_dir, vector_dir, facts)
    assert no_unpickling == []


def test_a_damaged_embedded_model_in_the_cache_is_named_with_the_fix(tmp_path, monkeypatch, capsys):
    from flearning.models import loading

    cached = tmp_path / "cached"
    tiny_llama().save_pretrained(cached)
    monkeypatch.setattr(loading, "ensure_embedded", lambda name: cached)
    _truncate(cached / "model.safetensors")
    code, output, _ = run_cli(["model", "info"], capsys)
    assert_refused(code, output, str(cached / "model.safetensors"), "truncated", f"delete {cached}")


# ---- the safetensors reader itself -------------------------------------------------------------------------


def test_the_reader_checks_name_and_content(tmp_path, tiny_model_dir):
    from flearning.io.safetensors import SafetensorsError, read_shard_header

    good = tiny_model_dir / "model.safetensors"
    data = good.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    cases = {
        "weights.bin": (data, "pickle"),
        "weights.npz": (data, "not a .safetensors file"),
        "short.safetensors": (data[:5], "shorter than 8 bytes"),
        "in-header.safetensors": (data[: header_end - 10], "truncated"),
        "in-data.safetensors": (data[: header_end + 16], "truncated"),
        "longer.safetensors": (data + b"\0" * 8, "describes"),
        "zip.safetensors": (_torch_save_bytes(good), "pickle"),
        "pickle.safetensors": (pickle.dumps({"a": 1}, protocol=4), "pickle"),
    }
    for name, (content, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(SafetensorsError, match=reason) as refused:
            read_shard_header(path)
        assert str(path) in str(refused.value), name
    assert len(read_shard_header(good).entries) > 0
    # a valid file whose header length (640 = 0x280) starts with the bytes of a protocol-2 pickle
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    collision = tmp_path / "collision.safetensors"
    collision.write_bytes((640).to_bytes(8, "little") + header.ljust(640) + b"\0" * 8)
    assert collision.read_bytes()[:2] == b"\x80\x02"
    assert [e.name for e in read_shard_header(collision).entries] == ["a"]


# ---- knowledge vectors ---------------------------------------------------------------------------------------


def _refresh_checksum(vector: Path, name: str) -> None:
    """What someone "fixing" vector.json after editing a file does: the checksum matches again."""
    from flearning.vectors import files as vio

    record = json.loads((vector / "vector.json").read_text())
    sha = vio.sha256_file(vector / name)
    if "shards" in record:
        record["shards"][name] = sha
    else:
        record["safetensors_sha256"] = sha
    (vector / "vector.json").write_text(json.dumps(record))


def corrupt_vector(kind: str, good: Path, tmp_path: Path) -> tuple[Path, Path, str]:
    path = _copy(good, tmp_path / "vector-x")
    tensors = path / "vector.safetensors"
    if kind == "truncated":
        _truncate(tensors)
        _refresh_checksum(path, tensors.name)
        return path, tensors, "truncated"
    if kind == "zip-named-safetensors":
        tensors.write_bytes(_torch_save_bytes(tensors))
        _refresh_checksum(path, tensors.name)
        return path, tensors, "pickle"
    if kind == "shard-named-bin":  # a sharded description whose shard is a .bin file
        record = json.loads((path / "vector.json").read_text())
        shard = "vector-00001-of-00001.bin"
        tensors.rename(path / shard)
        record.pop("safetensors_sha256")
        record["format_version"] = 2
        record["shards"] = {shard: ""}
        record["weight_map"] = dict.fromkeys(record["tensors"], shard)
        (path / "vector.json").write_text(json.dumps(record))
        _refresh_checksum(path, shard)
        return path, path / shard, "is a pickle (.bin), refused"
    raise AssertionError(kind)


@pytest.mark.parametrize("command", ["vector info", "vector scale", "vector apply", "vector apply --stream"])
@pytest.mark.parametrize("kind", ["truncated", "zip-named-safetensors", "shard-named-bin"])
def test_corrupt_vectors_are_exit_2_naming_the_file(
    kind, command, tmp_path, capsys, no_unpickling, tiny_model_dir, vector_dir
):
    vector, named, reason = corrupt_vector(kind, vector_dir, tmp_path)
    out = tmp_path / "out"
    args = {
        "vector info": ["vector", "info", vector],
        "vector scale": ["vector", "scale", vector, "--by", "2", "--out", out],
        "vector apply": [
            *("vector", "apply", "--model", tiny_model_dir, "--vector", vector, "--lambda=-0.5"),
            *("--out", out, "--no-stream"),
        ],
        "vector apply --stream": [
            *("vector", "apply", "--model", tiny_model_dir, "--vector", vector, "--lambda=-0.5"),
            *("--out", out, "--stream"),
        ],
    }[command]
    code, output, _ = run_cli(args, capsys)
    assert_refused(code, output, str(named), reason)
    assert not out.exists()
    assert no_unpickling == []


# ---- LoRA adapters -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    ["vector compute --lora-adapter", "vector compute --lora-adapter --stream", "vector apply --stream"],
)
@pytest.mark.parametrize("kind", ["truncated", "zip-named-safetensors"])
def test_corrupt_adapters_are_exit_2_naming_the_file(
    kind, command, tmp_path, capsys, no_unpickling, tiny_model_dir, adapter_dir
):
    weights = adapter_dir / "adapter_model.safetensors"
    if kind == "truncated":
        _truncate(weights)
        reason = "truncated"
    else:
        weights.write_bytes(_torch_save_bytes(weights))
        reason = "pickle"
    out = tmp_path / "out"
    compute = ["vector", "compute", "--base", tiny_model_dir, "--lora-adapter", adapter_dir, "--out", out]
    args = {
        "vector compute --lora-adapter": [*compute, "--no-stream"],
        "vector compute --lora-adapter --stream": [*compute, "--stream"],
        "vector apply --stream": [
            *("vector", "apply", "--model", tiny_model_dir, "--vector", adapter_dir, "--lambda=-0.5"),
            *("--out", out, "--stream"),
        ],
    }[command]
    code, output, _ = run_cli(args, capsys)
    assert_refused(code, output, str(weights), reason)
    assert not out.exists()
    assert no_unpickling == []
