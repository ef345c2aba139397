"""Every command that writes exits 2 with a message naming its output, never a traceback, and writes
nothing, when the output cannot be written: a path under a file, a directory it may not write, the
system refusing the path (/proc), a disk that fills up half-way through a file."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest
from reliability_helpers import bench_args, update_args, write_facts

from failure_injection import (
    half_write_png,
    half_write_safetensors,
    half_write_streamed_shards,
    in_temp_dir_of,
    leftovers,
    named,
)
from flearning.cli import main
from flearning.errors import FlearnError
from flearning.outputs import final_path, write_error_message, write_errors_as_flearn
from flearning.recipes.update import work_dir_for
from tiny import tiny_llama

DISK_FULL = "no space left on device (disk full); free some space or write to another disk."


@pytest.fixture
def facts(tmp_path):
    return write_facts(tmp_path / "facts.jsonl")


@pytest.fixture
def inputs(tmp_path, tiny_model_dir, tokenizer, facts):
    """A tiny model, a fine-tuned copy (another seed), a vector between them, the facts."""
    tuned = tmp_path / "tuned"
    tiny_llama(1).save_pretrained(tuned)
    tokenizer.save_pretrained(tuned)
    vector = tmp_path / "vector"
    assert (
        main(
            [
                "vector",
                "compute",
                "--base",
                str(tiny_model_dir),
                "--finetuned",
                str(tuned),
                "--out",
                str(vector),
            ]
        )
        == 0
    )
    return {"model": tiny_model_dir, "tuned": tuned, "vector": vector, "facts": facts}


def command(name: str, inputs: dict[str, Path], out: Path) -> list[str]:
    m, facts = str(inputs["model"]), str(inputs["facts"])
    return {
        "update": update_args(inputs["model"], inputs["facts"], out, "ft"),
        "prime": [
            "prime",
            "--model",
            m,
            "--data",
            facts,
            "--out",
            str(out),
            "--max-epochs",
            "1",
            "--no-progress",
        ],
        "eval": [
            "eval",
            "--model",
            m,
            "--data",
            facts,
            "--out",
            str(out),
            "--no-progress",
            "--no-generation",
        ],
        "bench": bench_args(inputs["model"], inputs["facts"], out, "ft"),
        "vector compute": [
            "vector",
            "compute",
            "--base",
            m,
            "--finetuned",
            str(inputs["tuned"]),
            "--out",
            str(out),
        ],
        "vector apply": [
            "vector",
            "apply",
            "--model",
            m,
            "--vector",
            str(inputs["vector"]),
            "--lambda",
            "-0.5",
            "--out",
            str(out),
        ],
        "vector apply --stream": [
            "vector",
            "apply",
            "--model",
            m,
            "--vector",
            str(inputs["vector"]),
            "--lambda",
            "-0.5",
            "--out",
            str(out),
            "--stream",
        ],
        "vector scale": ["vector", "scale", str(inputs["vector"]), "--by", "2", "--out", str(out)],
    }[name]


COMMANDS = [
    "update",
    "prime",
    "eval",
    "bench",
    "vector compute",
    "vector apply",
    "vector apply --stream",
    "vector scale",
]

# What a disk that fills up half-way through the first file each command writes looks like: the file cut
# (None: the streaming writer's write(2) names no file, the output directory is named) and the message.
DISK_FULL_CASES = {
    "update": ("model.safetensors", "the output"),
    "prime": ("model.safetensors", "the primed model"),
    "eval": ("metrics.png", "the report"),
    "bench": ("toy/metrics.png", "the bench output"),
    "vector compute": ("vector.safetensors", "the vector"),
    "vector apply": ("model.safetensors", "the model"),
    "vector apply --stream": (None, "the model"),
    "vector scale": ("vector.safetensors", "the vector"),
}


def run_cli(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_clean_refusal(code: int, err: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err


@pytest.mark.parametrize("name", COMMANDS)
def test_output_under_a_file(name, inputs, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("precious")
    out = blocker / "out"
    code, err = run_cli(command(name, inputs, out), capsys)
    assert_clean_refusal(code, err)
    assert err == f"error: {out}: cannot write here ({blocker} is not a writable directory)\n"
    assert blocker.read_text() == "precious"
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root may write in a 0500 directory")
@pytest.mark.parametrize("name", COMMANDS)
def test_output_in_a_directory_without_write_permission(name, inputs, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        out = locked / "out"
        code, err = run_cli(command(name, inputs, out), capsys)
        assert_clean_refusal(code, err)
        assert err == f"error: {out}: cannot write here ({locked} is not a writable directory)\n"
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("name", COMMANDS)
def test_output_where_the_system_refuses_it(name, inputs, capsys):
    """/proc accepts no new directory, even from root, for whom os.access says yes: the output is tried."""
    out = Path("/proc") / "flearn-no-such-dir" / "out"
    code, err = run_cli(command(name, inputs, out), capsys)
    assert_clean_refusal(code, err)
    reason = "no such file or directory)" if os.geteuid() == 0 else "is not a writable directory)"
    assert err.startswith(f"error: {out}: cannot write here (/proc") and err.rstrip().endswith(reason)
    assert not out.parent.exists()


@pytest.mark.parametrize("name", COMMANDS)
def test_disk_full_half_way_through_the_first_file(name, inputs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    cut_file, what = DISK_FULL_CASES[name]
    if name == "vector apply --stream":
        cut = half_write_streamed_shards(monkeypatch)
    elif cut_file.endswith(".png"):
        cut = half_write_png(monkeypatch, named("metrics.png"))
    else:
        cut = half_write_safetensors(monkeypatch, in_temp_dir_of(out))
    code, err = run_cli(command(name, inputs, out), capsys)
    assert_clean_refusal(code, err)
    assert len(cut.cut) == 1 and cut.written[0] > 0
    shown = out / cut_file if cut_file else out
    assert err.startswith(f"error: cannot write {what} at {shown}: {DISK_FULL}")
    assert ".tmp-" not in err
    if name == "bench":  # its cache keeps the finished (complete) entries; no results were written
        assert sorted(p.name for p in out.iterdir()) == ["cache"] and leftovers(out) == []
    else:
        assert not out.exists()
    assert [n for n in leftovers(tmp_path) if n.startswith(".out")] == []
    if name == "update":
        assert work_dir_for(out).is_dir()  # the trained stage, for the rerun


# ---- the mapping itself ------------------------------------------------------------------------------


def test_temporary_names_are_mapped_to_the_final_path():
    assert final_path("/runs/.out.tmp-4f2dbdsi/model.safetensors") == Path("/runs/out/model.safetensors")
    assert final_path("/runs/.report.tmp-ab_12cde/metrics.png") == Path("/runs/report/metrics.png")
    assert final_path("/b/.tmp-k2j4h5g6/.toy.tmp-q1w2e3r4/metrics.png") == Path("/b/toy/metrics.png")
    assert final_path("/w/learn/.tmp-step-00000004-a1b2c3d4/model.safetensors") == Path(
        "/w/learn/step-00000004/model.safetensors"
    )
    assert final_path("/runs/.table.md.tmp-zzzzzzzz") == Path("/runs/table.md")
    assert final_path("/runs/.hidden/x.tmp-4f2dbdsi") == Path("/runs/.hidden/x.tmp-4f2dbdsi")  # not ours


def test_any_os_error_on_the_output_path_is_explained(tmp_path):
    out = tmp_path / "out"
    temp_file = tmp_path / ".out.tmp-4f2dbdsi" / "model.safetensors"
    not_found = FileNotFoundError(errno.ENOENT, "No such file or directory", str(temp_file))
    assert write_error_message(not_found, out) == (
        f"cannot write the output at {out / 'model.safetensors'}: no such file or directory; "
        "choose a location you can write to."
    )
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    exists = FileExistsError(errno.EEXIST, "File exists", str(blocker))
    assert write_error_message(exists, blocker / "out", what="the report") == (
        f"cannot write the report at {blocker / 'out'}: {blocker} is a file, not a directory; "
        "choose a location you can write to."
    )
    io_error = OSError(errno.EIO, "Input/output error", str(tmp_path))  # a parent of the output
    assert write_error_message(io_error, out) == (
        f"cannot write the output at {out}: input/output error ({tmp_path}); choose a location you can write to."
    )
    with pytest.raises(FlearnError, match="read-only file system"), write_errors_as_flearn(out):
        raise OSError(errno.EROFS, "Read-only file system", str(temp_file))


def test_os_errors_elsewhere_keep_their_traceback(tmp_path):
    """Reading an input (another path) is not a write failure of the output: it is not reworded."""
    out = tmp_path / "out"
    elsewhere = FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "model" / "x"))
    assert write_error_message(elsewhere, out) is None
    with pytest.raises(FileNotFoundError), write_errors_as_flearn(out):
        raise elsewhere
    assert write_error_message(OSError(errno.EIO, "Input/output error"), out) is None
