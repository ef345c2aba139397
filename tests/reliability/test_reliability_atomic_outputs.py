"""Every output appears complete or not at all, checked by making the write fail half-way: half of the
file's bytes reach the disk, then ENOSPC (``tests/failure_injection.py``). Afterwards a new target does not
exist, a previous output is byte-identical, no temporary directory is left, and the CLI exits 2 naming the
file that could not be written by its final path (never the temporary one)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from reliability_helpers import bench_args, update_args
from safetensors.torch import load_file

from failure_injection import (
    half_write_png,
    half_write_safetensors,
    half_write_text,
    in_temp_dir_of,
    leftovers,
    named,
    snapshot,
)
from flearning.cli import main
from flearning.errors import FlearnError
from flearning.evaluation import METRICS, EvalResult, write_report
from flearning.io.atomic import umask
from flearning.recipes.work_dir import work_dir_for
from flearning.vectors import KnowledgeVector, Provenance

DISK_FULL = "no space left on device (disk full)"


def run_cli(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


# ---- flearn update ----------------------------------------------------------------------------------


@pytest.mark.parametrize("safetensors_error", [False, True], ids=["OSError", "SafetensorError"])
def test_update_cut_half_way_leaves_the_previous_output_untouched(
    safetensors_error, tiny_model_dir, facts, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    args = update_args(tiny_model_dir, facts, out, "flearning-ft", "--overwrite")
    assert main(args) == 0
    previous = snapshot(out)
    capsys.readouterr()

    cut = half_write_safetensors(monkeypatch, in_temp_dir_of(out), safetensors_error=safetensors_error)
    code, err = run_cli([*args, "seed=1"], capsys)

    assert code == 2
    assert [(p.parent.name[: len(".out.tmp-")], p.name) for p in cut.cut] == [
        (".out.tmp-", "model.safetensors")
    ]
    assert cut.cut[0].parent.parent == tmp_path
    # OSError names the file (mapped to its final path); safetensors' own error names no file
    shown = out if safetensors_error else out / "model.safetensors"
    assert f"error: cannot write the output at {shown}: {DISK_FULL}; free some space" in err
    assert ".tmp-" not in err
    assert snapshot(out) == previous
    assert [n for n in leftovers(tmp_path) if n.startswith(".out")] == []
    assert (work_dir_for(out) / "learn").is_dir()  # the trained stages are kept for the rerun


def test_update_cut_half_way_into_a_new_target_leaves_nothing(
    tiny_model_dir, facts, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    half_write_safetensors(monkeypatch, in_temp_dir_of(out))
    code, err = run_cli(update_args(tiny_model_dir, facts, out, "ft"), capsys)
    assert code == 2
    assert f"error: cannot write the output at {out / 'model.safetensors'}: {DISK_FULL}" in err
    assert not out.exists()
    assert leftovers(tmp_path) == []


# ---- knowledge vectors ------------------------------------------------------------------------------


def _vector(scale: float = 1.0) -> KnowledgeVector:
    gen = torch.Generator().manual_seed(0)
    deltas = {
        "a.weight": torch.randn(64, 32, generator=gen) * scale,
        "b.bias": torch.randn(32, generator=gen),
    }
    return KnowledgeVector.from_deltas(deltas, Provenance(method="test"))


def test_vector_save_cut_half_way_over_an_existing_vector(tmp_path, monkeypatch):
    target = tmp_path / "vec"
    _vector().save(target)
    previous = snapshot(target)
    cut = half_write_safetensors(monkeypatch)
    with pytest.raises(OSError) as info:
        _vector(2.0).save(target, overwrite=True)
    assert info.value.errno == 28
    assert [p.name for p in cut.cut] == ["vector.safetensors"] and cut.written[0] > 1000
    assert snapshot(target) == previous
    assert leftovers(tmp_path) == []
    assert torch.equal(KnowledgeVector.load(target)["a.weight"], _vector()["a.weight"])


def test_vector_save_cut_half_way_into_a_new_target(tmp_path, monkeypatch):
    half_write_safetensors(monkeypatch)
    with pytest.raises(OSError):
        _vector().save(tmp_path / "vec")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---- reports -----------------------------------------------------------------------------------------


def _results(value: float) -> dict[str, list[EvalResult]]:
    rows = [
        {"id": f"r{i}", **dict.fromkeys(METRICS), "reliability": value, "efficacy": 1.0 - value}
        for i in range(3)
    ]
    return {"ft": [EvalResult(rows, seed=0)]}


def test_report_cut_half_way_over_an_existing_report(tmp_path, monkeypatch):
    """metrics.png is written after records.jsonl and summary.*: replaced file by file, the directory
    would hold a new summary beside the old plot. It holds the old report, entirely."""
    out = tmp_path / "report"
    write_report(_results(1.0), out)
    (out / "notes.txt").write_text("mine")
    previous = snapshot(out)
    cut = half_write_png(monkeypatch)
    with pytest.raises(OSError):
        write_report(_results(0.0), out)
    assert snapshot(out) == previous
    assert [p.name for p in cut.cut] == ["metrics.png"]
    assert leftovers(tmp_path) == [] and leftovers(out) == []


def test_report_cut_half_way_into_a_new_directory(tmp_path, monkeypatch):
    half_write_png(monkeypatch)
    with pytest.raises(OSError):
        write_report(_results(1.0), tmp_path / "report")
    assert list(tmp_path.iterdir()) == []


def test_a_rewritten_report_is_entirely_new_and_keeps_other_files(tmp_path):
    out = tmp_path / "report"
    sweep = {"flearning-ft": {0.5: _results(0.5)["ft"], 1.0: _results(1.0)["ft"]}}
    write_report({**_results(1.0), "flearning-ft": _results(0.5)["ft"]}, out, sweep=sweep)
    assert (out / "sweep.png").is_file() and (out / "sweep.json").is_file()
    (out / "notes.txt").write_text("mine")
    (out / "extra").mkdir()
    (out / "extra" / "data.txt").write_text("also mine")
    write_report(_results(0.0), out)
    assert sorted(p.name for p in out.iterdir()) == [
        "extra",
        "metrics.png",
        "notes.txt",
        "records.jsonl",
        "summary.csv",
        "summary.json",
        "summary.md",
    ]  # the previous report's sweep files are gone: they described another report
    assert (out / "notes.txt").read_text() == "mine" and (
        out / "extra" / "data.txt"
    ).read_text() == "also mine"
    assert (
        json.loads((out / "summary.json").read_text())["methods"]["ft"]["metrics"]["reliability"]["mean"]
        == 0.0
    )
    assert leftovers(tmp_path) == []


def _mean(out: Path) -> float:
    return json.loads((out / "summary.json").read_text())["methods"]["ft"]["metrics"]["reliability"]["mean"]


def test_a_report_can_be_written_into_the_current_directory(tmp_path, monkeypatch):
    """Only the report's files are swapped: the directory the shell is in stays where it is."""
    out = tmp_path / "report"
    write_report(_results(1.0), out)
    inode = out.stat().st_ino
    monkeypatch.chdir(out)
    write_report(_results(0.0), ".")
    assert _mean(out) == 0.0
    assert Path.cwd() == out and out.stat().st_ino == inode
    assert leftovers(out) == [] and leftovers(tmp_path) == []


def test_a_rewritten_report_leaves_the_directory_and_other_files_alone(tmp_path):
    """The directory keeps its inode and mode (setgid included); a file of the user's keeps its inode and
    its 0600 (it is not hard-linked into a new directory and chmodded); a temporary directory of another
    command writing in it at the same time survives."""
    out = tmp_path / "report"
    write_report(_results(1.0), out)
    out.chmod(0o2750)
    notes = out / "notes.txt"
    notes.write_text("mine")
    notes.chmod(0o600)
    other = out / ".other.tmp-abcd1234"  # another command's staging directory, mid-write
    other.mkdir()
    (other / "part").write_text("half")
    before = {"dir": out.stat(), "notes": notes.stat()}

    write_report(_results(0.0), out)

    assert _mean(out) == 0.0
    assert (out.stat().st_ino, oct(out.stat().st_mode)) == (before["dir"].st_ino, "0o42750")
    assert (notes.stat().st_ino, oct(notes.stat().st_mode), notes.read_text()) == (
        before["notes"].st_ino,
        "0o100600",
        "mine",
    )
    assert (other / "part").read_text() == "half"
    assert leftovers(out) == [".other.tmp-abcd1234"] and leftovers(tmp_path) == []


def test_a_report_into_a_symlinked_directory_keeps_the_symlink(tmp_path):
    real = tmp_path / "real"
    write_report(_results(1.0), real)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)

    assert write_report(_results(0.0), link) == link

    assert link.is_symlink() and link.readlink() == real
    assert _mean(real) == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    assert leftovers(real) == []


def failing_renames(monkeypatch, failures: dict[int, OSError]) -> list[tuple[str, str]]:
    """Make ``outputs``' n-th ``os.replace`` raise ``failures[n]`` (1-based); returns the (source name,
    target name) of every call, failed ones included."""
    import flearning.io.atomic as outputs

    real_replace = os.replace
    calls: list[tuple[str, str]] = []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) in failures:
            raise failures[len(calls)]
        return real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)
    return calls


def old_entries(parent: Path) -> Path:
    """``parent`` holding the previous entries a, b, c."""
    parent.mkdir()
    for name in "abc":
        (parent / name).write_text(f"old {name}")
    return parent


def test_a_report_swap_failing_half_way_puts_the_whole_previous_report_back(tmp_path, monkeypatch):
    """The renames of the swap itself fail half-way (after the stale sweep files were moved aside and
    metrics.png was swapped): every previous file is back, the sweep files included."""

    out = tmp_path / "report"
    sweep = {"ft": {0.5: _results(0.5)["ft"], 1.0: _results(1.0)["ft"]}}
    write_report(_results(1.0), out, sweep=sweep)
    (out / "notes.txt").write_text("mine")
    previous = snapshot(out)
    assert sorted(previous) == [
        "metrics.png",
        "notes.txt",
        "records.jsonl",
        "summary.csv",
        "summary.json",
        "summary.md",
        "sweep.json",
        "sweep.png",
    ]
    # sweep.json, sweep.png aside; metrics.png aside and in; records.jsonl aside: the 5th fails
    calls = failing_renames(monkeypatch, {5: OSError(errno.EIO, "Input/output error")})
    with pytest.raises(OSError, match="Input/output error"):
        write_report(_results(0.0), out)
    assert calls[:5] == [
        ("sweep.json", "sweep.json"),
        ("sweep.png", "sweep.png"),
        ("metrics.png", "metrics.png"),
        ("metrics.png", "metrics.png"),
        ("records.jsonl", "records.jsonl"),
    ]
    assert snapshot(out) == previous
    assert leftovers(out) == [] and leftovers(tmp_path) == []


# ---- atomic_entries: a failed rollback, merged directories ----------------------------------------------


def test_a_rollback_that_fails_too_keeps_the_previous_entries_and_says_where(tmp_path, monkeypatch):
    """a, b, c replaced: the 4th rename (new b into place) fails, then the 5th (the first step back: the
    previous b out of the aside directory). The previous b is not deleted with the aside directory: it is
    kept there, the error names it, and the rest of the rollback still ran (a is the previous one)."""
    import flearning.io.atomic as outputs

    parent = old_entries(tmp_path / "out")
    # the 5th: the same failing disk (a KeyboardInterrupt there is handled alike)
    failures = {
        4: OSError(errno.ENOSPC, "No space left on device"),
        5: OSError(errno.EIO, "Input/output error"),
    }
    calls = failing_renames(monkeypatch, failures)
    with pytest.raises(FlearnError) as info, outputs.atomic_entries(parent) as staging:
        for name in "abc":
            (staging / name).write_text(f"new {name}")
    monkeypatch.undo()

    assert len(calls) == 7
    [aside] = leftovers(parent)
    assert str(info.value) == (
        f"{parent}: the new entries could not all be put in place, and putting the previous ones back "
        f"failed too (input/output error). The previous b could not be put back: it is kept in "
        f"{parent / aside}; move it back into {parent} by hand."
    )
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.EIO
    assert isinstance(info.value.__context__, OSError) and info.value.__context__.errno == errno.ENOSPC
    assert snapshot(parent) == {"a": b"old a", f"{aside}/b": b"old b", "c": b"old c"}


def test_a_failed_rename_without_a_failed_rollback_restores_everything(tmp_path, monkeypatch):
    import flearning.io.atomic as outputs

    parent = old_entries(tmp_path / "out")
    failing_renames(monkeypatch, {4: OSError(errno.ENOSPC, "No space left on device")})
    with pytest.raises(OSError) as info, outputs.atomic_entries(parent) as staging:
        for name in "abcd":
            (staging / name).write_text(f"new {name}")
    assert info.value.errno == errno.ENOSPC
    assert snapshot(parent) == {"a": b"old a", "b": b"old b", "c": b"old c"}
    assert leftovers(parent) == []


def test_entries_merge_into_existing_directories(tmp_path):
    """A directory written that exists already (a bench's dataset directory) is merged into: the files
    written replace theirs, ``stale`` ones go, the directory and the user's files in it stay untouched
    (inode, 0600); a directory that did not exist appears whole."""
    from flearning.io.atomic import atomic_entries

    parent = tmp_path / "bench"
    (parent / "toy").mkdir(parents=True)
    (parent / "toy" / "summary.json").write_text("old")
    (parent / "toy" / "sweep.png").write_text("old plot")
    notes = parent / "toy" / "notes.txt"
    notes.write_text("mine")
    notes.chmod(0o600)
    (parent / "cache").mkdir()
    (parent / "cache" / "run.json").write_text("cached")
    inodes = {"toy": (parent / "toy").stat().st_ino, "notes": notes.stat().st_ino}

    with atomic_entries(parent, stale=["toy/sweep.png", "toy/sweep.json", "new/sweep.png"]) as staging:
        (staging / "toy").mkdir()
        (staging / "toy" / "summary.json").write_text("new")
        (staging / "new").mkdir()
        (staging / "new" / "summary.json").write_text("new too")
        (staging / "table.md").write_text("table")

    assert snapshot(parent) == {
        "cache/run.json": b"cached",
        "new/summary.json": b"new too",
        "table.md": b"table",
        "toy/notes.txt": b"mine",
        "toy/summary.json": b"new",
    }
    assert (parent / "toy").stat().st_ino == inodes["toy"]
    assert (notes.stat().st_ino, oct(notes.stat().st_mode)) == (inodes["notes"], "0o100600")
    assert oct((parent / "table.md").stat().st_mode & 0o777) == oct(0o666 & ~umask())
    assert leftovers(parent) == []


def test_eval_cut_half_way_over_an_existing_report(tiny_model_dir, facts, tmp_path, capsys, monkeypatch):
    out = tmp_path / "report"
    args = [
        "eval",
        "--model",
        tiny_model_dir,
        "--data",
        facts,
        "--out",
        out,
        "--no-progress",
        "--no-generation",
    ]
    assert main([str(a) for a in args]) == 0
    previous = snapshot(out)
    capsys.readouterr()
    half_write_png(monkeypatch)
    code, err = run_cli([*args, "--name", "again", "--overwrite"], capsys)
    assert code == 2
    assert (
        f"error: cannot write the report at {out / 'metrics.png'}: {DISK_FULL}; free some space or write to "
        "another disk. Nothing was written; a previous report is untouched." in err
    )
    assert snapshot(out) == previous
    assert leftovers(tmp_path) == []


# ---- the bench: cache entries and results --------------------------------------------------------------


def test_bench_cache_entry_cut_half_way_is_absent_and_the_rerun_reuses_the_rest(
    tiny_model_dir, facts, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "bench"
    args = bench_args(tiny_model_dir, facts, out, "flearning-ft")
    cut = half_write_safetensors(monkeypatch, named("vector.safetensors"))  # the forgetting vector
    code, err = run_cli(args, capsys)
    assert code == 2
    [written] = cut.cut
    key = written.parent.name.removeprefix(".").split(".tmp-")[0]
    entry = out / "cache" / "forget" / key
    assert f"error: cannot write the bench output at {entry / 'vector.safetensors'}: {DISK_FULL}" in err
    assert not entry.exists() and list((out / "cache" / "forget").iterdir()) == []
    [primed] = (out / "cache" / "prime").iterdir()  # the entry written before it is complete
    assert json.loads((primed / "prime.json").read_text())["epochs"] == 1
    assert "model.embed_tokens.weight" in load_file(str(primed / "model.safetensors"))
    assert not (out / "summary.json").exists() and leftovers(out) == []

    cut.stop()
    capsys.readouterr()
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counters"] == {
        "trained_prime": 0,
        "trained_forget": 1,
        "trained_learn": 1,
        "edits": 0,
        "cached_runs": 0,
    }


@pytest.mark.parametrize("cut_file", ["toy/metrics.png", "table.md"])
def test_bench_results_cut_half_way_keep_the_previous_results(
    cut_file, tiny_model_dir, facts, tmp_path, capsys, monkeypatch
):
    """The per-dataset report, summary.json and table.md are swapped in together: a failure while writing
    any of them (the first report's plot, the last file) leaves all of the previous ones."""
    out = tmp_path / "bench"
    args = bench_args(tiny_model_dir, facts, out, "ft")
    assert main(args) == 0
    notes = out / "toy" / "notes.txt"
    notes.write_text("mine")
    notes.chmod(0o600)
    inodes = (out / "toy").stat().st_ino, notes.stat().st_ino
    previous = {
        name: snapshot(out / name) if (out / name).is_dir() else (out / name).read_bytes()
        for name in ("toy", "summary.json", "table.md")
    }
    capsys.readouterr()
    name = Path(cut_file).name
    if name == "metrics.png":
        cut = half_write_png(monkeypatch, named(name))
    else:  # written by write_text, under a temporary name by an atomic writer
        cut = half_write_text(monkeypatch, lambda path: name in path.name)
    code, err = run_cli(args, capsys)
    assert code == 2
    assert f"error: cannot write the bench output at {out / cut_file}: {DISK_FULL}" in err
    assert previous == {
        name: snapshot(out / name) if (out / name).is_dir() else (out / name).read_bytes()
        for name in ("toy", "summary.json", "table.md")
    }
    assert leftovers(out) == [] and leftovers(tmp_path) == []

    cut.stop()
    assert main(args) == 0  # all from the cache; the results are replaced together, the notes kept
    assert json.loads((out / "summary.json").read_text())["counters"]["cached_runs"] == 1
    # the dataset's directory and the user's file in it are left alone: same inodes, still 0600
    assert (notes.read_text(), oct(notes.stat().st_mode)) == ("mine", "0o100600")
    assert ((out / "toy").stat().st_ino, notes.stat().st_ino) == inodes


def test_an_output_holding_the_current_directory_is_refused(
    tiny_model_dir, facts, tmp_path, capsys, monkeypatch
):
    """An output directory is swapped for a new one: the shell inside it would be left in a deleted one."""
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    monkeypatch.chdir(out / "sub")
    code, err = run_cli(update_args(tiny_model_dir, facts, out, "ft", "--overwrite"), capsys)
    assert code == 2
    assert err == (
        f"error: {out}: is the current directory (or holds it); an output directory is replaced as a whole, "
        "so write it into a new subdirectory instead\n"
    )
    assert sorted(p.name for p in out.iterdir()) == ["sub"] and leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["cache", "summary.json", "table.md", ".hidden", "a/b", ""])
def test_bench_dataset_names_cannot_replace_the_cache_or_the_summary(name, facts):
    """Each dataset's report directory is swapped into the bench directory: a dataset called "cache"
    would replace the cache."""
    from pydantic import ValidationError

    from flearning.config import BenchConfig

    with pytest.raises(ValidationError, match="cannot name a report directory"):
        BenchConfig.model_validate({"data": {name: str(facts)}})
    assert BenchConfig.model_validate({"data": {"toy": str(facts)}}).data == {"toy": facts}
