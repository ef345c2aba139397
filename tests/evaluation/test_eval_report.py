"""write_report: file contents, atomic writing, plots."""

from __future__ import annotations

import csv
import json

import pytest

from flearning.evaluation import METRIC_DEFINITIONS, METRICS, EvalResult, write_report
from flearning.evaluation.report import format_cell, plot_sweep

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(rel: list[float], seed: int | None, *, fluency: float | None = None) -> EvalResult:
    rows = []
    for i, v in enumerate(rel):
        row = {"id": f"r{i}", **dict.fromkeys(METRICS), "reliability": v, "efficacy": 1.0 - v}
        row["generality"] = 0.5 if i == 0 else None
        row["fluency"] = fluency
        rows.append(row)
    return EvalResult(rows, seed=seed)


@pytest.fixture
def results():
    return {
        "ft": [_run([1.0, 0.0], 0), _run([1.0, 1.0], 1)],
        "flearning-ft": [_run([0.5, 0.5], None, fluency=5.0)],
    }


def test_report_files_and_values(tmp_path, results):
    out = write_report(results, tmp_path / "report", title="Test report")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["metrics.png", "records.jsonl", "summary.csv", "summary.json", "summary.md"]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["title"] == "Test report"
    assert summary["definitions"] == METRIC_DEFINITIONS
    ft = summary["methods"]["ft"]
    assert ft["seeds"] == [0, 1]
    rel = ft["metrics"]["reliability"]
    assert rel["mean"] == pytest.approx(75.0)  # seeds: 50, 100
    assert rel["std_seeds"] == pytest.approx(35.35533906, rel=1e-6)
    assert rel["std"] == pytest.approx((70.71067812 + 0.0) / 2, rel=1e-6)  # per-seed record stds, averaged
    assert rel["n"] == 4 and rel["n_seeds"] == 2
    assert ft["metrics"]["generality"]["n"] == 2
    assert ft["metrics"]["locality"]["mean"] is None
    fl = summary["methods"]["flearning-ft"]
    assert fl["seeds"] == [0]
    assert fl["metrics"]["reliability"] == {
        "mean": 50.0,
        "std": 0.0,
        "std_seeds": None,
        "n": 2,
        "n_seeds": 1,
        "seed_means": [50.0],
    }
    assert fl["metrics"]["fluency"]["mean"] == pytest.approx(500.0)

    lines = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    assert {(x["method"], x["seed"]) for x in lines} == {("ft", 0), ("ft", 1), ("flearning-ft", 0)}
    assert set(METRICS) <= set(lines[0])

    with open(out / "summary.csv", newline="") as fh:
        table = list(csv.reader(fh))
    assert table[0] == ["method", "Reliability", "Generality", "Efficacy", "Fluency (greedy)"]
    # Generality: ft has one value per seed -> std over its two seeds (0.0); flearning-ft has a single
    # value -> no std at all.
    assert table[1] == ["ft", "75.0 ± 35.4", "50.0 ± 0.0", "25.0 ± 35.4", "–"]
    assert table[2] == ["flearning-ft", "50.0 ± 0.0", "50.0", "50.0 ± 0.0", "500.0 ± 0.0"]

    md = (out / "summary.md").read_text()
    assert md.startswith("# Test report")
    assert "| ft | 75.0 ± 35.4 | 50.0 ± 0.0 | 25.0 ± 35.4 | – |" in md
    assert "**Reliability**: " + METRIC_DEFINITIONS["reliability"] in md
    assert "Locality" not in md.split("## Metric definitions")[0]  # no values: no column

    assert (out / "metrics.png").read_bytes().startswith(PNG_SIGNATURE)


def test_format_cell():
    assert format_cell({"mean": 66.666, "std": 4.0, "n": 3}) == "66.7 ± 4.0"
    assert format_cell({"mean": 66.666, "std": 4.0, "std_seeds": 1.25, "n_seeds": 3}) == "66.7 ± 1.2"
    assert format_cell({"mean": 10.0, "std": None}) == "10.0"
    assert format_cell({"mean": None, "std": None}) == "–"


def test_sweep_outputs(tmp_path, results):
    sweep = {"flearning-ft": {0.3: _run([1.0, 0.0], 0), 0.1: [_run([0.0, 0.0], 0), _run([1.0, 0.0], 1)]}}
    out = write_report(results, tmp_path / "r", sweep=sweep)
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["parameter"] == "λ"
    points = doc["methods"]["flearning-ft"]
    assert [p["value"] for p in points] == [0.1, 0.3]
    assert points[0]["metrics"]["reliability"]["mean"] == pytest.approx(25.0)
    assert points[1]["metrics"]["reliability"]["mean"] == pytest.approx(50.0)
    assert (out / "sweep.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "sweep.png" in (out / "summary.md").read_text()


def test_sweep_plot_draws_each_baseline_as_a_dashed_line_at_its_mean(results):
    from flearning.evaluation.results import aggregate

    sweep_summary = {
        "flearning-ft": [(0.1, aggregate([_run([0.0, 1.0], 0)])), (0.3, aggregate([_run([1.0, 1.0], 0)]))]
    }
    fig = plot_sweep(sweep_summary, "λ", "t", {"ft": aggregate(results["ft"])})
    reliability = next(ax for ax in fig.axes if ax.get_title() == "Reliability")
    (line,) = [ln for ln in reliability.get_lines() if ln.get_label() == "ft (no λ)"]
    assert line.get_linestyle() == "--"
    assert list(line.get_ydata()) == pytest.approx([75.0, 75.0])  # ft's mean over its two seeds
    assert "ft (no λ)" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_new_directory_appears_whole(tmp_path, results):
    write_report(results, tmp_path / "a" / "report")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["report"]  # no temporary leftovers


def test_existing_directory_files_replaced(tmp_path, results):
    out = tmp_path / "report"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "summary.json").write_text("old")
    write_report(results, out)
    assert (out / "keep.txt").read_text() == "mine"
    assert json.loads((out / "summary.json").read_text())["methods"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_failure_leaves_no_directory(tmp_path, results, monkeypatch):
    from flearning.evaluation import report

    def boom(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report, "plot_metrics", boom)
    with pytest.raises(RuntimeError):
        write_report(results, tmp_path / "report")
    assert list(tmp_path.iterdir()) == []


def test_bad_input(tmp_path):
    with pytest.raises(ValueError):
        write_report({}, tmp_path / "r")
    with pytest.raises(ValueError):
        write_report({"m": []}, tmp_path / "r")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        write_report({"m": [_run([1.0], 0)]}, tmp_path / "file")
