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
from pathlib import Path
from types import SimpleNamespace

import pytest

import flearning.models.embedded as embedded
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


# A process that calls ensure_embedded() with a conversion that logs itself. Its flock first tries
# without blocking and, when the lock is taken, touches ``blocked-PID`` before it waits; the conversion
# waits (up to 60 s) until such a marker shows the other process blocked on the lock. So the second process
# always arrives during the conversion, however slowly either starts: no timing assumption.
CONVERTER = textwrap.dedent(
    """
    import fcntl, json, os, shutil, sys, time
    from pathlib import Path

    import flearning.models.embedded as embedded

    source, log, markers = map(Path, sys.argv[1:4])
    real_flock = fcntl.flock

    def flock(fd, operation):
        if operation == fcntl.LOCK_EX:
            try:
                return real_flock(fd, operation | fcntl.LOCK_NB)
            except BlockingIOError:
                (markers / f"blocked-{os.getpid()}").touch()
        return real_flock(fd, operation)

    def convert(name, out):
        start = time.time()
        deadline = time.monotonic() + 60
        while not list(markers.glob("blocked-*")):
            if time.monotonic() > deadline:
                sys.exit("the other process never waited for the lock")
            time.sleep(0.01)
        shutil.copytree(source, out, dirs_exist_ok=True)
        with open(log, "a") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "start": start, "end": time.time()}) + "\\n")

    fcntl.flock = flock
    embedded.convert_embedded = convert
    path = embedded.ensure_embedded()
    print(json.dumps({"pid": os.getpid(), "path": str(path)}))
    """
)


def test_two_processes_convert_once(tmp_path, cache, tiny_model_dir):
    script = tmp_path / "convert.py"
    script.write_text(CONVERTER)
    log, markers = tmp_path / "conversions.jsonl", tmp_path / "markers"
    markers.mkdir()
    env = {**os.environ, "FLEARN_CACHE": str(cache)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tiny_model_dir), str(log), str(markers)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    results = [json.loads(out) for out, _ in outputs]
    conversions = [json.loads(line) for line in log.read_text().splitlines()]

    assert len(conversions) == 1
    # The other one waited for the lock while the conversion ran, and then used its result.
    [converter] = [p.pid for p in procs if p.pid == conversions[0]["pid"]]
    [waiter] = [p.pid for p in procs if p.pid != converter]
    assert sorted(p.name for p in markers.iterdir()) == [f"blocked-{waiter}"]
    target = cache / "models" / DEFAULT_MODEL
    assert sorted((r["pid"], r["path"]) for r in results) == sorted((p.pid, str(target)) for p in procs)
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
    monkeypatch.setattr(embedded, "load_from_gguf", lambda name: (tiny_llama(), tiny_tokenizer()))
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
    monkeypatch.setattr(embedded, "convert_embedded", half_written_conversion(code, written))

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
    monkeypatch.setattr(embedded, "convert_embedded", lambda name, out: pytest.fail("converted"))

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
    monkeypatch.setattr(embedded, "convert_embedded", copy_conversion(tiny_model_dir))
    with caplog.at_level("INFO", logger="flearning.models.embedded"):
        ensure_embedded()
    assert "from GGUF once (about 15 s) into" in caplog.text


NOW = 1_800_000_000.0  # the clock of remove_stale_temp_dirs in these tests (``frozen_clock``)


@pytest.fixture
def frozen_clock(monkeypatch) -> None:
    monkeypatch.setattr(embedded, "time", SimpleNamespace(time=lambda: NOW))


def set_mtime(path: Path, seconds_ago: float) -> None:
    """Date ``path`` and everything in it ``seconds_ago`` before ``NOW``."""
    when = NOW - seconds_ago
    for item in [*path.rglob("*"), path]:
        os.utime(item, (when, when), follow_symlinks=False)


HOUR = 3600


def test_stale_temp_dirs_of_killed_conversions_are_removed(
    cache, monkeypatch, tiny_model_dir, caplog, frozen_clock
):
    models_dir = cache / "models"
    stale = models_dir / f".{DEFAULT_MODEL}.tmp-k1ll_ed9"  # what a killed conversion leaves
    older = models_dir / f".{DEFAULT_MODEL}.k1ll_ed9"  # ... and what one of an older version left
    for path in (stale, older):
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"\0" * 1000)
        set_mtime(path, HOUR + 60)
    unrelated = [models_dir / f".{DEFAULT_MODEL}.v2.abcdefgh", models_dir / ".other.abcdefgh"]
    for path in unrelated:
        path.mkdir()
        set_mtime(path, 2 * HOUR)
    (models_dir / f".{DEFAULT_MODEL}.lock").touch()
    monkeypatch.setattr(embedded, "convert_embedded", copy_conversion(tiny_model_dir))

    with caplog.at_level("INFO", logger="flearning.models.embedded"):
        target = ensure_embedded()

    assert not stale.exists() and not older.exists()
    assert all(path.is_dir() for path in unrelated)
    assert leftovers(models_dir) == sorted([DEFAULT_MODEL, *(p.name for p in unrelated)])
    assert (target / DONE).is_file()
    removals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("removing ")]
    assert removals == [
        f"removing {path}, left behind by an interrupted conversion (untouched for {HOUR + 60} s)"
        for path in sorted([stale, older])
    ]


@pytest.mark.parametrize("fresh", ["directory", "one-file"])
def test_a_recently_changed_temp_dir_is_kept(fresh, cache, monkeypatch, tiny_model_dir, caplog, frozen_clock):
    """The lock may not hold (NFS without lock support): a temporary directory changed within the hour
    may be a conversion running on another host, so it is kept, whatever the lock says. Its newest change
    counts: the directory's own or any file's in it."""
    models_dir = cache / "models"
    running = models_dir / f".{DEFAULT_MODEL}.tmp-runn1ng0"
    (running / "sub").mkdir(parents=True)
    for name in ("config.json", "sub/model.safetensors"):
        (running / name).write_bytes(b"\0" * 100)
    set_mtime(running, 2 * HOUR)
    if fresh == "directory":
        set_mtime(running, HOUR - 60)  # everything changed 59 minutes ago
    else:
        set_mtime(running / "sub" / "model.safetensors", 30)  # still being written
    monkeypatch.setattr(embedded, "convert_embedded", copy_conversion(tiny_model_dir))

    with caplog.at_level("INFO", logger="flearning.models.embedded"):
        target = ensure_embedded()

    assert sorted(str(p.relative_to(running)) for p in running.rglob("*")) == [
        "config.json",
        "sub",
        "sub/model.safetensors",
    ]
    assert leftovers(models_dir) == sorted([DEFAULT_MODEL, running.name])
    assert (target / DONE).is_file()
    age = HOUR - 60 if fresh == "directory" else 30
    assert [
        r.getMessage() for r in caplog.records if r.getMessage().startswith(("keeping ", "removing "))
    ] == [
        f"keeping {running}: changed {age} s ago, it may be a conversion running on another host; it is "
        "removed once untouched for 3600 s"
    ]


def test_a_running_conversions_temp_dir_is_left_alone(cache, monkeypatch, tiny_model_dir):
    """While another converter holds the lock, its temporary directory is not stale: we wait, and then
    use what it made."""
    models_dir = cache / "models"
    models_dir.mkdir(parents=True)
    running = models_dir / f".{DEFAULT_MODEL}.tmp-runn1ng0"
    shutil.copytree(tiny_model_dir, running)
    monkeypatch.setattr(embedded, "convert_embedded", lambda name, out: pytest.fail("converted twice"))
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
    monkeypatch.setattr(embedded, "load_from_gguf", lambda name: (tiny_llama(), tiny_tokenizer()))
    old = os.umask(mask)
    try:
        target = ensure_embedded()
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~mask
    files = [p for p in target.rglob("*") if p.is_file()]
    assert "model.safetensors" in {p.name for p in files}  # written 0600 by safetensors
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o666 & ~mask for p in files}
