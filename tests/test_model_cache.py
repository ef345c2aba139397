"""The embedded model's cache entry: one conversion under a lock, written atomically, readable by all.

The GGUF conversion (~15 s) is replaced by a tiny random Llama: these tests are about the cache, not the
model, and stay fast.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import flearning.models as models
from flearning.cli import main
from flearning.errors import FlearnError
from flearning.models import DEFAULT_MODEL, check_model_dir, ensure_embedded
from tiny import tiny_llama, tiny_tokenizer

DONE = ".flearn-complete"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A cache of its own (not the session's, which holds the real converted model)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("FLEARN_CACHE", str(root))
    return root


def copy_conversion(source: Path):
    """A stand-in for ``convert_embedded`` that writes a prebuilt tiny model."""

    def convert(name: str, out: Path) -> None:
        shutil.copytree(source, out, dirs_exist_ok=True)

    return convert


def leftovers(models_dir: Path) -> list[str]:
    return sorted(p.name for p in models_dir.iterdir() if p.name != f".{DEFAULT_MODEL}.lock")


def write_failure_message(cache: Path, path: Path, reason: str) -> str:
    """What ``ensure_embedded`` says when writing ``path`` of the conversion failed for ``reason``."""
    return (
        f"cannot write the converted embedded model '{DEFAULT_MODEL}' at {path}: {reason}. The embedded "
        f"model is converted once into the cache ({cache}; about 0.6 GB) and nothing of this attempt was "
        "kept; to use another place, set FLEARN_CACHE to a writable directory with that much room."
    )


# A process that calls ensure_embedded() once everyone is ready, with a conversion that takes a second
# and logs itself, and prints when it entered ensure_embedded and what it returned.
CONVERTER = textwrap.dedent(
    """
    import json, os, shutil, sys, time
    from pathlib import Path

    import flearning.models as models

    source, log, ready, go = map(Path, sys.argv[1:5])

    def convert(name, out):
        start = time.time()
        time.sleep(1.0)  # long enough for the other process to arrive while this one converts
        shutil.copytree(source, out, dirs_exist_ok=True)
        with open(log, "a") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "start": start, "end": time.time()}) + "\\n")

    models.convert_embedded = convert
    ready.touch()
    while not go.exists():
        time.sleep(0.005)
    entered = time.time()
    path = models.ensure_embedded()
    print(json.dumps({"entered": entered, "path": str(path)}))
    """
)


def test_two_processes_convert_once(tmp_path, cache, tiny_model_dir):
    script = tmp_path / "convert.py"
    script.write_text(CONVERTER)
    log, go = tmp_path / "conversions.jsonl", tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(2)]
    env = {**os.environ, "FLEARN_CACHE": str(cache)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tiny_model_dir), str(log), str(r), str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in ready
    ]
    try:
        deadline = time.monotonic() + 60
        while not all(r.exists() for r in ready):
            assert time.monotonic() < deadline, "the converter processes did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.01)
        go.touch()
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    results = [json.loads(out) for out, _ in outputs]
    conversions = [json.loads(line) for line in log.read_text().splitlines()]

    assert len(conversions) == 1
    # Both entered while the conversion ran: the lock, not the finished marker, kept the second one out.
    assert max(r["entered"] for r in results) < conversions[0]["end"]
    target = cache / "models" / DEFAULT_MODEL
    assert [r["path"] for r in results] == [str(target)] * 2
    assert leftovers(cache / "models") == [DEFAULT_MODEL]
    assert (target / DONE).is_file()
    check_model_dir(target)


def fail_half_way(written: list[Path]):
    """A safetensors writer that writes half a file and then finds the disk full."""

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        written.append(Path(filename))
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    return save_file


@pytest.mark.parametrize("previous", [False, True], ids=["no-previous-entry", "incomplete-previous-entry"])
def test_failed_conversion_leaves_no_trace(cache, monkeypatch, previous):
    import transformers.modeling_utils

    models_dir = cache / "models"
    other = models_dir / "other-model"  # a good entry of another model
    other.mkdir(parents=True)
    (other / DONE).write_text("done\n")
    (other / "model.safetensors").write_bytes(b"weights")
    target = models_dir / DEFAULT_MODEL
    if previous:  # an older version's incomplete entry: replaced only by a complete one
        target.mkdir()
        (target / "config.json").write_text("{}")
    written: list[Path] = []
    monkeypatch.setattr(models, "load_from_gguf", lambda name: (tiny_llama(), tiny_tokenizer()))
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fail_half_way(written))

    with pytest.raises(FlearnError) as raised:
        ensure_embedded()

    assert str(raised.value) == write_failure_message(
        cache,
        target / "model.safetensors",  # the final path, not the temporary directory's
        "no space left on device (disk full); free some space or write to another disk",
    )
    assert isinstance(raised.value.__cause__, OSError)
    assert written and written[0].name == "model.safetensors"
    assert written[0].parent.name.startswith(f".{DEFAULT_MODEL}.")  # it was writing into a temp dir ...
    assert not written[0].parent.exists()  # ... which is gone
    assert leftovers(models_dir) == sorted(([DEFAULT_MODEL] if previous else []) + ["other-model"])
    if previous:
        assert sorted(p.name for p in target.iterdir()) == ["config.json"]
        assert (target / "config.json").read_text() == "{}"
    assert (other / "model.safetensors").read_bytes() == b"weights" and (other / DONE).is_file()


def half_written_conversion(code: int, written: list[Path]):
    """A stand-in for ``convert_embedded`` that writes a config and half the weights, then fails with
    ``code``."""

    def convert(name: str, out: Path) -> None:
        (out / "config.json").write_text("{}")
        weights = out / "model.safetensors"
        weights.write_bytes(b"\0" * 1000)
        written.append(weights)
        raise OSError(code, os.strerror(code), str(weights))

    return convert


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (errno.ENOSPC, "no space left on device (disk full); free some space or write to another disk"),
        (errno.EACCES, "permission denied; choose a location you can write to"),
        (errno.EROFS, "read-only file system; choose a writable location"),
    ],
    ids=["ENOSPC", "EACCES", "EROFS"],
)
def test_write_failure_during_conversion_exits_2_and_leaves_nothing(cache, monkeypatch, capsys, code, reason):
    """``flearn model info`` on the embedded model when the cache cannot be written: exit code 2, the
    cache path and the reason, a hint to set FLEARN_CACHE, no traceback, no temporary directory."""
    written: list[Path] = []
    monkeypatch.setattr(models, "convert_embedded", half_written_conversion(code, written))

    assert main(["-q", "model", "info"]) == 2

    target = cache / "models" / DEFAULT_MODEL
    err = capsys.readouterr().err
    assert err == f"error: {write_failure_message(cache, target / 'model.safetensors', reason)}\n"
    assert written and written[0].parent.name.startswith(f".{DEFAULT_MODEL}.tmp-")
    assert not written[0].parent.exists()
    assert leftovers(cache / "models") == []


def test_a_cache_that_is_a_file_is_a_clear_error(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.write_text("not a directory")
    monkeypatch.setenv("FLEARN_CACHE", str(cache))
    monkeypatch.setattr(models, "convert_embedded", lambda name, out: pytest.fail("converted"))

    with pytest.raises(FlearnError) as raised:
        ensure_embedded()

    assert str(raised.value) == write_failure_message(
        cache,
        cache / "models" / DEFAULT_MODEL,
        f"{cache} is a file, not a directory; choose a location you can write to",
    )
    assert cache.read_text() == "not a directory"


def test_conversion_log_states_the_measured_time(cache, monkeypatch, tiny_model_dir, caplog):
    """benchmarks/results/model_load.json: a first load (conversion included) takes about 15 s."""
    monkeypatch.setattr(models, "convert_embedded", copy_conversion(tiny_model_dir))
    with caplog.at_level("INFO", logger="flearning.models"):
        ensure_embedded()
    assert "from GGUF once (about 15 s) into" in caplog.text


def test_stale_temp_dirs_of_killed_conversions_are_removed(cache, monkeypatch, tiny_model_dir):
    models_dir = cache / "models"
    stale = models_dir / f".{DEFAULT_MODEL}.tmp-k1ll_ed9"  # what a killed conversion leaves
    older = models_dir / f".{DEFAULT_MODEL}.k1ll_ed9"  # ... and what one of an older version left
    for path in (stale, older):
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"\0" * 1000)
    unrelated = [models_dir / f".{DEFAULT_MODEL}.v2.abcdefgh", models_dir / ".other.abcdefgh"]
    for path in unrelated:
        path.mkdir()
    (models_dir / f".{DEFAULT_MODEL}.lock").touch()
    monkeypatch.setattr(models, "convert_embedded", copy_conversion(tiny_model_dir))

    target = ensure_embedded()

    assert not stale.exists() and not older.exists()
    assert all(path.is_dir() for path in unrelated)
    assert leftovers(models_dir) == sorted([DEFAULT_MODEL, *(p.name for p in unrelated)])
    assert (target / DONE).is_file()


def test_a_running_conversions_temp_dir_is_left_alone(cache, monkeypatch, tiny_model_dir):
    """While another converter holds the lock, its temporary directory is not stale: we wait, and then
    use what it made."""
    models_dir = cache / "models"
    models_dir.mkdir(parents=True)
    running = models_dir / f".{DEFAULT_MODEL}.tmp-runn1ng0"
    shutil.copytree(tiny_model_dir, running)
    monkeypatch.setattr(models, "convert_embedded", lambda name, out: pytest.fail("converted twice"))
    result: list[Path] = []
    with open(models_dir / f".{DEFAULT_MODEL}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other converter
        waiter = threading.Thread(target=lambda: result.append(ensure_embedded()))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive()  # waiting for the lock
        assert running.is_dir() and (running / "model.safetensors").is_file()
        (running / DONE).write_text("done\n")
        os.replace(running, models_dir / DEFAULT_MODEL)
        fcntl.flock(lock, fcntl.LOCK_UN)
    waiter.join(10)
    assert result == [models_dir / DEFAULT_MODEL]


@pytest.mark.parametrize("mask", [0o022, 0o002], ids=["umask-022", "umask-002"])
def test_converted_files_get_normal_permissions(cache, monkeypatch, mask):
    monkeypatch.setattr(models, "load_from_gguf", lambda name: (tiny_llama(), tiny_tokenizer()))
    old = os.umask(mask)
    try:
        target = ensure_embedded()
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~mask
    files = [p for p in target.rglob("*") if p.is_file()]
    assert "model.safetensors" in {p.name for p in files}  # written 0600 by safetensors
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o666 & ~mask for p in files}
