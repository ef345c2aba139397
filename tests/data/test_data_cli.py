"""``flearn data check``: exit code 2 and the message on bad input, a correct summary on good files."""

from __future__ import annotations

import json

import pytest
from data_helpers import SAMPLES, counterfact_record, write_json
from typer.testing import CliRunner

from flearning.cli import main
from flearning.cli.data import data_app
from flearning.data import load_records
from flearning.data.summary import histogram, length_stats, word_count
from flearning.errors import InputError


def test_bad_file_exits_2_with_every_problem(tmp_path, capsys):
    recs = [counterfact_record(0), counterfact_record(1)]
    del recs[1]["ground_truth"]
    path = write_json(tmp_path / "cf.json", recs)
    assert main(["-q", "data", "check", str(path), "--model", "none"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: invalid dataset: 1 problem\n  {path}:record 1:ground_truth: missing\n"


def _malformed(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"src": "a",}\n]')
    return path


def _missing_field(tmp_path):
    recs = [counterfact_record(0), counterfact_record(1)]
    del recs[1]["ground_truth"]
    return write_json(tmp_path / "cf.json", recs)


def _wrong_type(tmp_path):
    return write_json(tmp_path / "cf.json", [counterfact_record(0), counterfact_record(1, target_new=5)])


def _empty(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("")
    return path


# (make the file, extra arguments, the problem line after the path); texts as in test_data_errors.py
BAD_INPUTS = {
    "malformed-json": (
        _malformed,
        [],
        ": malformed JSON at line 2, column 15: Expecting property name enclosed in double quotes",
    ),
    "missing-field": (_missing_field, [], ":record 1:ground_truth: missing"),
    "wrong-typed-field": (_wrong_type, [], ":record 1:target_new: expected a string, got a number"),
    "empty-file": (_empty, [], ": file is empty"),
    "unknown-format": (
        lambda tmp_path: write_json(tmp_path / "d.json", [counterfact_record(0)]),
        ["--format", "wikidata"],
        ": unknown format 'wikidata' (known: zsre, counterfact, counterfact-rome, jsonl)",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_the_exact_message(tmp_path, capsys, case):
    make, extra, problem = BAD_INPUTS[case]
    path = make(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert main(["-q", "data", "check", str(path), *extra, "--model", "none"]) == 2
    out, err = capsys.readouterr()
    assert err == f"error: invalid dataset: 1 problem\n  {path}{problem}\n"
    assert out == ""
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_unknown_format_exits_2(capsys):
    assert (
        main(["-q", "data", "check", str(SAMPLES / "facts.jsonl"), "--format", "nope", "--model", "none"])
        == 2
    )
    assert (
        "unknown format 'nope' (known: zsre, counterfact, counterfact-rome, jsonl)" in capsys.readouterr().err
    )


def test_strict_exits_2_on_droppable_records(capsys):
    zsre = str(SAMPLES / "zsre-200.json")
    assert main(["-q", "data", "check", zsre, "--strict", "--zsre-old", "answers", "--model", "none"]) == 2
    assert "invalid dataset: 8 problems" in capsys.readouterr().err


def test_json_summary_of_zsre_sample(capsys):
    zsre = str(SAMPLES / "zsre-200.json")
    assert main(["-q", "data", "check", zsre, "--zsre-old", "answers", "--model", "none", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["zsre_old"] == "answers"
    records = load_records(SAMPLES / "zsre-200.json", zsre_old="answers")
    new_lengths = [word_count(r.prompt, r.target_new) for r in records]
    assert summary["format"] == "zsre"
    assert (summary["n_raw"], summary["n_kept"]) == (200, 192)
    assert summary["dropped"] == {"target_new_equals_old": 8}
    assert summary["coverage"] == {"subject": 192, "rephrase": 192, "locality": 192, "portability": 0}
    assert summary["totals"] == {"rephrase_prompts": 192, "locality": 192, "portability": 0}
    lengths = summary["lengths"]
    assert (lengths["unit"], lengths["model"]) == ("words", None)
    assert lengths["prompt+target_new"] == length_stats(new_lengths)
    assert sum(b["count"] for b in lengths["histogram"]) == 192


def test_rich_summary_of_facts(tmp_path):
    result = CliRunner().invoke(data_app, ["check", str(SAMPLES / "facts.jsonl"), "--model", "none"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "jsonl" in out
    assert "34 in the file, 34 kept" in out
    assert "5/34 (15%), 5 probes" in out  # portability coverage
    assert "34/34 (100%), 43 prompts" in out  # rephrase coverage
    assert "whitespace word count" in out
    assert "█" in out


def test_rich_summary_lists_drop_reasons():
    zsre = str(SAMPLES / "zsre-200.json")
    result = CliRunner().invoke(data_app, ["check", zsre, "--zsre-old", "answers", "-m", "none"])
    assert result.exit_code == 0, result.output
    assert "8 (target_new_equals_old" in result.output
    assert "answers[0]" in result.output  # where the old answers came from


def test_data_app_raises_input_error(tmp_path):
    """Without ``main`` the error propagates as an exception (main turns it into exit code 2)."""
    path = tmp_path / "empty.json"
    path.write_text("")
    result = CliRunner().invoke(data_app, ["check", str(path), "--model", "none"])
    assert isinstance(result.exception, InputError)
    assert str(result.exception) == f"invalid dataset: 1 problem\n  {path}: file is empty"


def test_token_lengths_with_a_local_tokenizer(tiny_model_dir, capsys):
    """The tiny tokenizer has one token per byte and no BOS, so lengths are byte counts."""
    assert (
        main(["-q", "data", "check", str(SAMPLES / "facts.jsonl"), "--model", str(tiny_model_dir), "--json"])
        == 0
    )
    lengths = json.loads(capsys.readouterr().out)["lengths"]
    records = load_records(SAMPLES / "facts.jsonl")
    expected = [len(f"{r.prompt} {r.target_new}".encode()) for r in records]
    assert (lengths["unit"], lengths["model"]) == ("tokens", str(tiny_model_dir))
    assert lengths["prompt+target_new"] == length_stats(expected)
    assert [(b["low"], b["high"], b["count"]) for b in lengths["histogram"]] == histogram(expected)


def test_missing_model_exits_2(tmp_path, capsys):
    assert (
        main(["-q", "data", "check", str(SAMPLES / "facts.jsonl"), "--model", str(tmp_path / "no model")])
        == 2
    )
    assert "model" in capsys.readouterr().err


# --- summary helpers ------------------------------------------------------------------------------


def test_histogram_bins():
    assert histogram([3, 3, 4]) == [(3, 3, 2), (4, 4, 1)]
    assert histogram([1, 25], max_bins=12) == [(1, 3, 1)] + [
        (1 + 3 * i, 3 + 3 * i, 0) for i in range(1, 8)
    ] + [(25, 27, 1)]
    assert sum(c for *_, c in histogram(list(range(100)))) == 100
    assert len(histogram(list(range(100)))) <= 12


def test_length_stats():
    assert length_stats([5]) == {"min": 5, "median": 5, "mean": 5.0, "p95": 5, "max": 5}
    stats = length_stats(list(range(1, 21)))
    assert (stats["min"], stats["median"], stats["p95"], stats["max"]) == (1, 10.5, 19, 20)


@pytest.mark.parametrize(
    ("prompt", "target", "n"), [("The capital of France is", "Paris", 6), ("a  b", " c ", 3)]
)
def test_word_count(prompt, target, n):
    assert word_count(prompt, target) == n
