"""No file that f-learning writes is a pickle: every file of an ``flearn update`` output, of its work
directory (training checkpoints, Δ_old), of a bench (cache included), of ``flearn prime``,
``flearn vector compute/apply/scale`` and ``flearn eval`` is safetensors, JSON, text or PNG, checked by
content, not by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from reliability_helpers import FACTS, update_args, write_facts

import flearning.recipes.stopping as stopping
from flearning.cli import main
from flearning.recipes.work_dir import work_dir_for

TEXT_SUFFIXES = {".md", ".txt", ".csv", ".svg"}


def parses_as_pickle(data: bytes) -> bool:
    """Whether ``data`` is a well-formed pickle opcode stream of any protocol (read, never executed)."""
    import pickletools

    try:
        for opcode, _, _ in pickletools.genops(data):
            if opcode.name == "STOP":
                return True
    except Exception:
        return False
    return False


def file_kind(path: Path) -> str:
    """'safetensors', 'json', 'jsonl', 'text' or 'png'; fails on a pickle or anything unknown."""
    data = path.read_bytes()
    # pickle protocol 2+ starts with the PROTO opcode 0x80; torch.save (zip) with "PK"
    assert not data.startswith(b"\x80"), f"{path} is a pickle"
    assert not data.startswith(b"PK"), f"{path} is a zip archive (torch.save)"
    if path.suffix == ".safetensors":
        # 8-byte little-endian header length, then a JSON header starting with '{', then the tensor bytes
        n = int.from_bytes(data[:8], "little")
        assert data[8:9] == b"{" and 8 + n <= len(data), f"{path} is not safetensors"
        json.loads(data[8 : 8 + n])
        return "safetensors"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    assert not parses_as_pickle(data), f"{path} is a pickle"  # protocol 0/1 pickles look like text
    text = data.decode("utf-8")
    if path.suffix == ".json":
        json.loads(text)
        return "json"
    if path.suffix == ".jsonl":
        for line in text.splitlines():
            if line.strip():
                json.loads(line)
        return "jsonl"
    assert path.suffix in TEXT_SUFFIXES, f"{path}: unexpected kind of file"
    return "text"


def kinds(root: Path) -> dict[str, str]:
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files, root
    return {str(p.relative_to(root)): file_kind(p) for p in files}


@pytest.mark.parametrize("method", ["flearning-ft", "flearning-lora", "ft-c"])
def test_update_output_and_work_dir_hold_no_pickle(method, tiny_model_dir, tmp_path, monkeypatch):
    facts = write_facts(tmp_path / "facts.jsonl")
    out = tmp_path / "out"
    args = update_args(tiny_model_dir, facts, out, method, "checkpoint_every=1", evaluate=True)

    # Stop in the learning stage to look at the work directory: checkpoints (and Δ_old) on disk.
    real = stopping.train  # the learning stage's (train_until)

    def stop_in_learning(*a, description, on_step=None, **kw):
        def on_step(step, loss):
            if description.startswith("learn") and step == 3:
                raise KeyboardInterrupt

        return real(*a, description=description, on_step=on_step, **kw)

    monkeypatch.setattr(stopping, "train", stop_in_learning)
    assert main(args) == 130
    work = kinds(work_dir_for(out))
    assert work["identity.json"] == "json"
    assert {k for k, v in work.items() if k.startswith("learn/")} == {
        "learn/step-00000003/model.safetensors",
        "learn/step-00000003/state.safetensors",
        "learn/step-00000003/state.json",
    }
    if method.startswith("flearning"):
        assert work["knowledge_vector/vector.safetensors"] == "safetensors"

    monkeypatch.setattr(stopping, "train", real)
    assert main(args) == 0
    written = kinds(out)
    assert written["model.safetensors"] == "safetensors" and written["run.json"] == "json"
    assert written["report/summary.json"] == "json"
    assert ("adapter/adapter_model.safetensors" in written) == (method == "flearning-lora")


def test_bench_writes_no_pickle(tiny_model_dir, tmp_path):
    from flearning.config import BenchConfig
    from flearning.recipes.bench import run_bench

    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(f) + "\n" for f in FACTS[:8]))
    cfg = BenchConfig.model_validate(
        dict(
            model=str(tiny_model_dir),
            data={"toy": str(data)},
            n=4,
            seeds=[0],
            methods=["ft", "flearning-lora"],
            lambdas=[0.5],
            prime={"lr": 1e-2, "max_epochs": 1, "threshold": 0.99},
            full={"lr": 1e-2, "epochs": 1},
            lora_stage={"lr": 1e-2, "epochs": 1},
            forget_lora={"lr": 1e-2, "epochs": 1},
            lora={"r": 2, "target_modules": ["q_proj"]},
            generation=False,
            eval_batch_size=4,
            out=tmp_path / "bench",
        )
    )
    run_bench(cfg, progress=False)
    written = kinds(tmp_path / "bench")
    assert written["summary.json"] == "json"
    assert any(k.startswith("cache/prime/") and v == "safetensors" for k, v in written.items())
    assert any(k.startswith("cache/forget/") and v == "safetensors" for k, v in written.items())


def test_vector_prime_and_eval_outputs_hold_no_pickle(tiny_model_dir, tmp_path):
    """``flearn prime``, ``flearn vector compute`` (in memory and streamed), ``apply`` (both), ``scale``
    and ``flearn eval``: every file each writes is safetensors, JSON, text or PNG."""
    facts = write_facts(tmp_path / "facts.jsonl")
    primed = tmp_path / "primed"
    base = ["--no-progress"]
    commands = {
        primed: ["prime", "--model", tiny_model_dir, "--data", facts, "--out", primed, "--lr", "1e-2"]
        + ["--max-epochs", "1", "--threshold", "0.99", *base],
        tmp_path / "vec": ["vector", "compute", "--base", tiny_model_dir, "--finetuned", primed]
        + ["--out", tmp_path / "vec", "--no-stream"],
        tmp_path / "vec-streamed": ["vector", "compute", "--base", tiny_model_dir, "--finetuned", primed]
        + ["--out", tmp_path / "vec-streamed", "--stream"],
        tmp_path / "applied": ["vector", "apply", "--model", tiny_model_dir, "--vector", tmp_path / "vec"]
        + ["--lambda=-0.7", "--out", tmp_path / "applied", "--no-stream"],
        tmp_path / "applied-streamed": ["vector", "apply", "--model", tiny_model_dir]
        + ["--vector", tmp_path / "vec-streamed", "--lambda=-0.7", "--out", tmp_path / "applied-streamed"]
        + ["--stream"],
        tmp_path / "scaled": ["vector", "scale", tmp_path / "vec", "--by", "0.5"]
        + ["--out", tmp_path / "scaled"],
        tmp_path / "report": ["eval", "--model", tmp_path / "applied", "--reference", tiny_model_dir]
        + ["--data", facts, "--batch-size", "4", "--fluency", "--fluency-tokens", "3", "--out"]
        + [tmp_path / "report", *base],
    }
    for out, args in commands.items():
        assert main([str(a) for a in args]) == 0, args
        written = kinds(out)
        assert set(written.values()) <= {"safetensors", "json", "jsonl", "text", "png"}, written
    # nothing else was written beside them (no temporary directory, no stray file)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["facts.jsonl", "tiny-model", *(out.name for out in commands)]
    )
    assert kinds(primed)["model.safetensors"] == "safetensors" and kinds(primed)["prime.json"] == "json"
    assert kinds(tmp_path / "vec")["vector.safetensors"] == "safetensors"
    assert kinds(tmp_path / "applied")["model.safetensors"] == "safetensors"
    assert kinds(tmp_path / "report")["summary.json"] == "json"
    assert "png" in kinds(tmp_path / "report").values()


def test_the_check_catches_pickles(tmp_path):
    import pickle

    import torch

    for name, writer in {
        "a.json": lambda p: p.write_bytes(pickle.dumps({"a": 1})),
        "b.safetensors": lambda p: torch.save({"a": torch.zeros(1)}, p),
        "c.md": lambda p: p.write_bytes(pickle.dumps([1], protocol=0)),
    }.items():
        path = tmp_path / name
        writer(path)
        with pytest.raises((AssertionError, ValueError)):
            file_kind(path)
