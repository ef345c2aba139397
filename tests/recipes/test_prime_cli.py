"""``flearn prime``'s numeric options are checked like a config's settings before any work: a value typer
parses but the stage cannot take (inf, NaN, 0, out of range) is exit 2 naming the option, never a pydantic
traceback; a value typer cannot parse is typer's usage error, exit 2 too. Nothing is written."""

from __future__ import annotations

import json

import pytest

from flearning.cli import main
from tiny import toy_facts


@pytest.fixture
def facts(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in toy_facts(4)))
    return path


def prime_args(tmp_path, facts, *options: str) -> list[str]:
    # validated before the model is resolved: a model that does not exist shows nothing else was tried
    model = tmp_path / "no-model-needed"
    return ["prime", "--data", str(facts), "--out", str(tmp_path / "primed"), "--model", str(model), *options]


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        (["--lr", "inf"], "--lr: Input should be a finite number"),
        (["--lr", "nan"], "--lr: Input should be a finite number"),
        (["--lr", "0"], "--lr: Input should be greater than 0"),
        (["--batch-size", "0"], "--batch-size: Input should be greater than or equal to 1"),
        (["--max-epochs", "-inf"], "--max-epochs: Input should be a finite number"),
        (["--max-epochs", "0"], "--max-epochs: Input should be greater than 0"),
        (["--threshold", "1.5"], "--threshold: Input should be less than or equal to 1"),
        (["--threshold", "nan"], "--threshold: Input should be a finite number"),
        (["--seed", "-1"], "--seed: Input should be greater than or equal to 0"),
        (["--seed", "4294967296"], "--seed: Input should be less than 4294967296"),
    ],
)
def test_invalid_option_values_exit_2_naming_the_option(options, problem, facts, tmp_path, capsys):
    code = main(prime_args(tmp_path, facts, *options))
    assert code == 2
    assert capsys.readouterr().err == f"error: invalid configuration: 1 problem\n  command line:{problem}\n"
    assert not (tmp_path / "primed").exists()


def test_every_invalid_option_is_reported_at_once(facts, tmp_path, capsys):
    options = ["--lr", "inf", "--max-epochs", "0", "--threshold", "-0.1", "--batch-size", "0", "--seed", "-1"]
    code = main(prime_args(tmp_path, facts, *options))
    assert code == 2
    assert capsys.readouterr().err == "\n".join(
        [
            "error: invalid configuration: 5 problems",
            "  command line:--lr: Input should be a finite number",
            "  command line:--max-epochs: Input should be greater than 0",
            "  command line:--threshold: Input should be greater than or equal to 0",
            "  command line:--batch-size: Input should be greater than or equal to 1",
            "  command line:--seed: Input should be greater than or equal to 0",
            "",
        ]
    )
    assert not (tmp_path / "primed").exists()


@pytest.mark.parametrize(
    ("options", "option"), [(["--lr", "fast"], "--lr"), (["--batch-size", "1.5"], "--batch-size")]
)
def test_values_typer_cannot_parse_are_its_usage_error(options, option, facts, tmp_path, capsys):
    code = main(prime_args(tmp_path, facts, *options))
    err = capsys.readouterr().err
    assert code == 2 and f"Invalid value for '{option}'" in err and "Traceback" not in err
    assert not (tmp_path / "primed").exists()


def test_valid_options_get_past_the_check(facts, tmp_path, capsys):
    """The same options, valid, fail later on (here: the model path), not on the check."""
    code = main(prime_args(tmp_path, facts, "--lr", "1e-3", "--threshold", "1", "--seed", "4294967295"))
    err = capsys.readouterr().err
    assert code == 2 and "invalid configuration" not in err and "no-model-needed" in err
