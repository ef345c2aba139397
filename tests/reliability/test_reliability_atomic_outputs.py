"""Every output appears complete or not at all, checked by making the write fail half-way: half of the
file's bytes reach the disk, then ENOSPC (``tests/failure_injection.py``). Afterwards a new target does not
exist, a previous output is byte-identical, no temporary directory is left, and the CLI exits 2 naming the
file that could not be written by its final path (never the temporary one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reliability_helpers import bench_args, update_args, write_facts
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
from flearning.arithmetic import KnowledgeVector
from flearning.cli import main
from flearning.errors import FlearnError
from flearning.evaluation import METRICS, EvalResult, write_report
from flearning.recipes.update import work_dir_for

DISK_FULL = "no space left on device (disk full)"


@pytest.fixture
def facts(tmp_path):
    return write_facts(tmp_path / "facts.jsonl")


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
    return KnowledgeVector.from_deltas(deltas, method="test")


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


def test_a_report_is_never_written_over_the_current_directory(tmp_path, monkeypatch):
    out = tmp_path / "report"
    write_report(_results(1.0), out)
    monkeypatch.chdir(out)
    with pytest.raises(FlearnError, match="is the current directory"):
        write_report(_results(0.0), ".")
    assert (
        json.loads((out / "summary.json").read_text())["methods"]["ft"]["metrics"]["reliability"]["mean"]
        == 100.0
    )


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
    code, err = run_cli([*args, "--name", "again"], capsys)
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
    (out / "toy" / "notes.txt").write_text("mine")
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
    assert (out / "toy" / "notes.txt").read_text() == "mine"


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

    from flearning.recipes.bench import BenchConfig

    with pytest.raises(ValidationError, match="cannot name a report directory"):
        BenchConfig.model_validate({"data": {name: str(facts)}})
    assert BenchConfig.model_validate({"data": {"toy": str(facts)}}).data == {"toy": facts}
