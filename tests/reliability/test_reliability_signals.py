"""A real ``flearn update`` process stopped by a signal while it trains: Ctrl-C (SIGINT) and what batch
schedulers send (SIGTERM: SLURM, Kubernetes, ``kill``) both save the training state after the last
optimizer step and exit (130 and 143: 128 + the signal's number); rerunning the same command resumes
there and writes the same model bytes as an uninterrupted run."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from reliability_helpers import update_args, write_facts

import flearning.recipes.algorithm as recipe
import flearning.recipes.stopping as stopping
from flearning.cli import main
from flearning.recipes.work_dir import work_dir_for
from tiny import tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

# 12 facts, batch 8: 2 optimizer steps per epoch → 240 learning steps, a checkpoint every 10.
LONG = ["learn.epochs=120", "checkpoint_every=10"]
STEPS = 240
SIGNALS = pytest.mark.parametrize(
    ("sig", "exit_code", "last_line"),
    [(signal.SIGINT, 130, "aborted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")],
    ids=["SIGINT", "SIGTERM"],
)
SAVED = re.compile(r"learn \(ft\): interrupted; state after optimizer step (\d+) saved in (\S+)")

# ``flearn`` with one hook: at a given learning step it touches a marker file and stands still (as a long
# step would), so the signal lands at a known step; the signal and everything after it are real.
STOP_AT_STEP = textwrap.dedent("""
    import sys, time
    import flearning.recipes.algorithm as recipe
    import flearning.recipes.stopping as stopping
    from flearning.cli import main
    marker, at = sys.argv[1], int(sys.argv[2])
    real = recipe.train
    def train(*a, description, on_step=None, **kw):
        def on_step(step, loss):
            if description.startswith("learn") and step == at:
                open(marker, "w").close()
                time.sleep(120)
        return real(*a, description=description, on_step=on_step, **kw)
    recipe.train = stopping.train = train
    sys.exit(main(sys.argv[3:]))
""")


def flearn() -> list[str]:
    script = Path(sys.executable).with_name("flearn")  # the console script a user runs
    return [str(script)] if script.is_file() else [sys.executable, "-m", "flearning.cli"]


def _default_sigint() -> None:
    # a shell starts background jobs with SIGINT ignored, and Python then leaves it ignored: undo that
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def model_and_facts(root: Path) -> tuple[Path, Path]:
    model = root / "tiny-model"
    tiny_llama().save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    return model, write_facts(root / "facts.jsonl")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> bytes:
    """model.safetensors of the uninterrupted run (the same tiny model and facts as every test's)."""
    root = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("FLEARN_CACHE", str(root / "cache"))
        model, facts = model_and_facts(root)
        assert main(update_args(model, facts, root / "out", "ft", *LONG)) == 0
    return (root / "out" / "model.safetensors").read_bytes()


def signal_when(process: subprocess.Popen, ready, sig: int, log: Path) -> int:
    """Wait until ``ready()`` (the process must still run), send ``sig``, return the exit code."""
    try:
        deadline = time.monotonic() + 120
        while not ready():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "not ready after 120 s"
            time.sleep(0.01)
        process.send_signal(sig)
        return process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()


def rerun_and_compare(args: list[str], out: Path, saved_step: int, reference: bytes, monkeypatch) -> None:
    """The same command again, in this process: it trains only the steps after ``saved_step`` and writes
    the uninterrupted run's model bytes."""
    steps: list[int] = []
    real = recipe.train

    def traced(*a, on_step=None, **kw):
        return real(*a, on_step=lambda step, loss: steps.append(step), **kw)

    monkeypatch.setattr(recipe, "train", traced)
    monkeypatch.setattr(stopping, "train", traced)  # the learning stage (train_until)
    assert main(args) == 0
    assert steps == list(range(saved_step + 1, STEPS + 1))
    assert not work_dir_for(out).exists()
    assert (out / "model.safetensors").read_bytes() == reference


def assert_interrupted_cleanly(code: int, exit_code: int, last_line: str, err: str, out: Path) -> None:
    assert code == exit_code, err
    assert err.rstrip().splitlines()[-1] == last_line
    assert "Traceback" not in err
    assert f"the finished training stages are kept in {work_dir_for(out)}" in err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


@SIGNALS
def test_a_signal_at_a_known_step_saves_that_step_and_the_rerun_writes_the_same_model(
    sig, exit_code, last_line, tmp_path, reference, monkeypatch
):
    model, facts = model_and_facts(tmp_path)
    out = tmp_path / "out"
    args = update_args(model, facts, out, "ft", *LONG)
    marker, log = tmp_path / "at-step-15", tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", STOP_AT_STEP, str(marker), "15", *args],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=_default_sigint,
        )
        code = signal_when(process, marker.exists, sig, log)
    err = log.read_text()
    assert_interrupted_cleanly(code, exit_code, last_line, err, out)
    learn = work_dir_for(out) / "learn"
    assert f"learn (ft): interrupted; state after optimizer step 15 saved in {learn}" in err
    assert sorted(p.name for p in learn.iterdir()) == ["step-00000015"]  # the step-10 one was replaced
    rerun_and_compare(args, out, 15, reference, monkeypatch)


@SIGNALS
def test_a_signal_to_the_flearn_command_while_it_trains(
    sig, exit_code, last_line, tmp_path, reference, monkeypatch
):
    """The console script, unmodified, signalled once its first checkpoint is on disk: wherever the
    signal lands, the state of the last completed step is on disk (saved then, or by the periodic
    checkpoint when nothing was completed since, or when a step was half applied)."""
    model, facts = model_and_facts(tmp_path)
    out = tmp_path / "out"
    args = update_args(model, facts, out, "ft", *LONG)
    learn, log = work_dir_for(out) / "learn", tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [*flearn(), *args], stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=_default_sigint
        )
        code = signal_when(process, lambda: bool(list(learn.glob("step-*"))), sig, log)
    err = log.read_text()
    assert_interrupted_cleanly(code, exit_code, last_line, err, out)
    [checkpoint] = sorted(p.name for p in learn.iterdir())
    step = int(checkpoint.removeprefix("step-"))
    saved = SAVED.search(err)
    if saved is not None:
        assert int(saved.group(1)) == step and Path(saved.group(2)) == learn
    assert 10 <= step < STEPS
    rerun_and_compare(args, out, step, reference, monkeypatch)


def test_the_sigterm_handler_is_restored_after_a_command(tmp_path, capsys):
    before = signal.getsignal(signal.SIGTERM)
    assert main(["update", "--config", str(tmp_path / "missing.yaml"), f"out={tmp_path / 'out'}"]) == 2
    assert "cannot read config" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before


# ``flearn`` with one more command, ``hang``: it writes how SIGTERM is handled to ``MARKER.running`` and
# waits for ``MARKER.go``; a KeyboardInterrupt it swallows and then hangs, as a clean-up stuck in a DDP
# broadcast whose peers are gone would, after touching ``MARKER.interrupted``.
HANG = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    import flearning.cli as cli
    marker = sys.argv[1]
    @cli.app.command("hang")
    def hang() -> None:
        Path(marker + ".running").write_text(str(signal.getsignal(signal.SIGTERM)))
        try:
            while not Path(marker + ".go").exists():
                time.sleep(0.01)
        except KeyboardInterrupt:
            Path(marker + ".interrupted").touch()
            time.sleep(120)
    sys.exit(cli.main(["hang"]))
""")


def start_hang(tmp_path: Path, preexec_fn) -> tuple[subprocess.Popen, str, Path]:
    marker, log = str(tmp_path / "hang"), tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", HANG, marker],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=preexec_fn,
        )
    return process, marker, log


def wait_for(process: subprocess.Popen, path: Path, log: Path) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"no {path.name} after 60 s"
        time.sleep(0.01)


def test_a_second_sigterm_kills_a_command_whose_clean_up_hangs(tmp_path):
    process, marker, log = start_hang(tmp_path, _default_sigint)
    try:
        wait_for(process, Path(marker + ".running"), log)
        process.send_signal(signal.SIGTERM)
        wait_for(process, Path(marker + ".interrupted"), log)  # the first one interrupted, and was swallowed
        time.sleep(0.2)
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert process.wait(timeout=10) == -signal.SIGTERM  # killed by SIGTERM, as without a handler
        assert time.monotonic() - started < 5
    finally:
        if process.poll() is None:
            process.kill()
    assert "Traceback" not in log.read_text()


def _ignore_sigterm() -> None:
    _default_sigint()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def test_an_inherited_ignored_sigterm_stays_ignored(tmp_path):
    process, marker, log = start_hang(tmp_path, _ignore_sigterm)
    try:
        wait_for(process, Path(marker + ".running"), log)
        assert Path(marker + ".running").read_text() == str(signal.SIG_IGN)  # no handler of flearn's
        process.send_signal(signal.SIGTERM)  # discarded by the kernel at once
        Path(marker + ".go").touch()
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert not Path(marker + ".interrupted").exists()
    assert log.read_text() == ""


def sigterm_to_self() -> None:
    """Send SIGTERM to this (the pytest) process, only while flearn's handler turns it into a
    KeyboardInterrupt (raised here, by os.kill)."""
    import os

    handler = signal.getsignal(signal.SIGTERM)
    assert getattr(handler, "__qualname__", "") == "_TerminateAsInterrupt._handle", handler
    os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture
def in_main_thread() -> None:
    import threading

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are set only in the main thread")
    if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        pytest.skip("SIGTERM is ignored in this process")


def test_a_sigterm_while_an_error_is_reported_exits_143(tmp_path, capsys, monkeypatch, in_main_thread):
    import typer

    before = signal.getsignal(signal.SIGTERM)
    real = typer.echo

    def echo(message=None, **kwargs):
        if str(message).startswith("error: "):  # inside _run's `except FlearnError`
            sigterm_to_self()
        real(message, **kwargs)

    monkeypatch.setattr(typer, "echo", echo)
    try:
        code = main(["update", "--config", str(tmp_path / "missing.yaml"), f"out={tmp_path / 'out'}"])
    except KeyboardInterrupt:
        pytest.fail("the interrupt escaped main")
    assert code == 143
    assert capsys.readouterr().err == "terminated (SIGTERM)\n"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_sigterm_after_the_command_returned_exits_143(tmp_path, capsys, monkeypatch, in_main_thread):
    import flearning.cli as cli

    before = signal.getsignal(signal.SIGTERM)
    real = cli._run
    codes: list[int] = []

    def run_then_sigterm(argv):
        codes.append(real(argv))
        sigterm_to_self()
        return codes[-1]

    monkeypatch.setattr(cli, "_run", run_then_sigterm)
    try:
        code = main(["update", "--config", str(tmp_path / "missing.yaml"), f"out={tmp_path / 'out'}"])
    except KeyboardInterrupt:
        pytest.fail("the interrupt escaped main")
    assert codes == [2] and code == 143
    missing = tmp_path / "missing.yaml"
    assert capsys.readouterr().err == (
        f"error: {missing}: cannot read config: No such file or directory\nterminated (SIGTERM)\n"
    )
    assert signal.getsignal(signal.SIGTERM) is before
