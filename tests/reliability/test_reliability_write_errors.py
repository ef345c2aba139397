"""Every command that writes exits 2 with a message naming its output, never a traceback, and writes
nothing, when the output cannot be written: a path under a file, a directory it may not write, the
system refusing the path (/proc), a disk that fills up half-way through a file."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest
from reliability_helpers import bench_args, update_args

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
from flearning.io.atomic import final_path, write_error_message, write_errors_as_flearn
from flearning.recipes.work_dir import work_dir_for
from tiny import tiny_llama

DISK_FULL = "no space left on device (disk full); free some space or write to another disk."


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
    if name == "vector apply --stream":
        return [*command("vector apply", inputs, out), "--stream"]
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
        # (and its marker: the same command continues this directory)
        assert (
            sorted(p.name for p in out.iterdir()) == [".flearn-output.json", "cache"] and leftovers(out) == []
        )
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


def test_a_permission_error_on_an_input_is_not_a_write_error(tmp_path):
    """Reading an input the user may not read, inside a block that writes ``out``: the PermissionError
    itself comes out (its type, its traceback), never "cannot write the output at <the input>"."""
    out = tmp_path / "out"
    facts = tmp_path / "data" / "facts.jsonl"
    denied = PermissionError(errno.EACCES, "Permission denied", str(facts))
    assert write_error_message(denied, out) is None
    with pytest.raises(PermissionError) as info, write_errors_as_flearn(out):
        raise denied
    assert (
        info.value is denied
        and info.traceback[-1].name == "test_a_permission_error_on_an_input_is_not_a_write_error"
    )
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EPERM):  # any write errno, elsewhere
        assert write_error_message(OSError(code, os.strerror(code), str(facts)), out) is None


def test_without_a_file_name_only_a_full_disk_is_explained(tmp_path):
    """An error that names no file may come from anywhere: only a full disk or quota (a plain write,
    safetensors) is put on the output; EROFS, EACCES, EPERM keep their own error."""
    out = tmp_path / "out"
    assert write_error_message(OSError(errno.ENOSPC, "No space left on device"), out, what="the report") == (
        f"cannot write the report at {out}: no space left on device (disk full); free some space or write "
        "to another disk."
    )
    assert write_error_message(OSError(errno.EDQUOT, "Disk quota exceeded"), [out, tmp_path / "work"]) == (
        f"cannot write the output at {out}: disk quota exceeded (disk full for this user); free some space "
        "or write to another disk."
    )
    for code in (errno.EROFS, errno.EACCES, errno.EPERM):
        error = OSError(code, os.strerror(code))
        assert write_error_message(error, out) is None
        with pytest.raises(OSError) as info, write_errors_as_flearn(out):
            raise error
        assert info.value is error


def test_every_path_a_block_writes_is_covered(tmp_path):
    """A list of paths: a failure in any of them is explained (the work directory of an update beside
    its output); a hidden sibling named after one (a lock file) belongs to it; another path does not."""
    out, work = tmp_path / "out", tmp_path / "out.partial"
    in_work = OSError(
        errno.ENOSPC, "No space left on device", str(work / ".tmp-a1b2c3d4" / "vector.safetensors")
    )
    assert write_error_message(in_work, [out, work]) == (
        f"cannot write the output at {work / 'vector.safetensors'}: no space left on device (disk full); "
        "free some space or write to another disk."
    )
    assert write_error_message(in_work, out) is None
    lock = OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".out.lock"))
    assert write_error_message(lock, out) == (
        f"cannot write the output at {tmp_path / '.out.lock'}: read-only file system; choose a writable location."
    )
    other = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "outside" / "x"))
    assert write_error_message(other, [out, work]) is None
    assert write_error_message(other, []) is None


def test_bench_reading_an_input_it_may_not_read_keeps_the_permission_error(inputs, tmp_path, monkeypatch):
    """run_bench is wrapped whole: a PermissionError loading the model is the model's, not the output's."""
    import flearning.models

    weights = inputs["model"] / "model.safetensors"

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(weights))

    monkeypatch.setattr(flearning.models, "load_model", denied)
    with pytest.raises(PermissionError) as info:
        main(command("bench", inputs, tmp_path / "out"))
    assert info.value.filename == str(weights)


def test_eval_disk_full_without_a_file_name_exits_2(inputs, tmp_path, capsys, monkeypatch):
    from flearning.evaluation import report

    out = tmp_path / "out"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "write_report", full)
    code, err = run_cli(command("eval", inputs, out), capsys)
    assert code == 2
    assert err == (
        f"error: cannot write the report at {out}: {DISK_FULL} Nothing was written; a previous report is "
        "untouched.\n"
    )

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")  # no file named: not surely the report's

    monkeypatch.setattr(report, "write_report", read_only)
    with pytest.raises(OSError, match="Read-only file system"):
        main(command("eval", inputs, out))


# ---- where the output directory is checked --------------------------------------------------------------


def test_an_existing_directory_written_inside_is_probed_not_its_parent(tmp_path, monkeypatch):
    """``whole=False`` (the bench, eval): an existing directory is written inside only, so it is the one
    that must be writable; its parent may be read-only. (``os.access`` answers for root too.)"""
    from flearning.io.output import check_output

    def check_output_dir(out, overwrite, replaced_whole=True):
        return check_output(out, kind="bench", inputs={}, overwrite=overwrite, whole=replaced_whole)

    parent = tmp_path / "shared"
    out = parent / "bench"
    out.mkdir(parents=True)
    (out / "cache").mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != parent and real(path, mode))

    assert check_output_dir(out, overwrite=True, replaced_whole=False) == out
    assert sorted(p.name for p in out.iterdir()) == ["cache"]  # the probe left nothing
    with pytest.raises(FlearnError) as info:  # replaced whole: written beside it, in the parent
        check_output_dir(out, overwrite=True)
    assert str(info.value) == f"{out}: cannot write here ({parent} is not a writable directory)"
    with pytest.raises(FlearnError) as info:  # a new one is created in the parent
        check_output_dir(parent / "new", overwrite=True, replaced_whole=False)
    assert str(info.value) == f"{parent / 'new'}: cannot write here ({parent} is not a writable directory)"

    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != out and real(path, mode))
    with pytest.raises(FlearnError) as info:
        check_output_dir(out, overwrite=True, replaced_whole=False)
    assert str(info.value) == f"{out}: cannot write here ({out} is not a writable directory)"


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root may write in a 0555 directory")
def test_bench_output_in_a_read_only_parent_is_accepted(tmp_path):
    from flearning.io.output import check_output

    def check_output_dir(out, overwrite, replaced_whole=True):
        return check_output(out, kind="bench", inputs={}, overwrite=overwrite, whole=replaced_whole)

    parent = tmp_path / "shared"
    out = parent / "bench"
    out.mkdir(parents=True)
    parent.chmod(0o555)
    try:
        assert check_output_dir(out, overwrite=True, replaced_whole=False) == out
        with pytest.raises(FlearnError, match="is not a writable directory"):
            check_output_dir(out, overwrite=True)
    finally:
        parent.chmod(0o755)


def test_eval_refuses_to_write_into_the_model_directory(inputs, capsys):
    model = inputs["model"]
    before = sorted(p.name for p in model.iterdir())
    code, err = run_cli(command("eval", inputs, model), capsys)
    resolved = model.resolve()
    assert code == 2
    assert err == f"error: {resolved}: refusing to write into the input model's directory ({resolved})\n"
    assert sorted(p.name for p in model.iterdir()) == before
