"""``flearn eval`` end to end on a tiny saved model."""

from __future__ import annotations

import json

from eval_helpers import crafted_records

from flearning.cli import main


def _write_jsonl(path, records):
    path.write_text("".join(r.model_dump_json() + "\n" for r in records))
    return path


def test_eval_command_writes_a_report(tmp_path, tiny_model_dir, capsys):
    data = _write_jsonl(tmp_path / "facts.jsonl", crafted_records(6))
    out = tmp_path / "report"
    code = main(
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--reference",
            str(tiny_model_dir),
            "--data",
            str(data),
            "--limit",
            "5",
            "--batch-size",
            "2",
            "--fluency",
            "--fluency-tokens",
            "5",
            "--name",
            "tiny",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "Reliability" in printed and "Generation exact match" in printed
    summary = json.loads((out / "summary.json").read_text())
    metrics = summary["methods"]["tiny"]["metrics"]
    assert metrics["reliability"]["n"] == 5
    assert metrics["locality"]["mean"] == 100.0  # the reference is the model itself
    assert metrics["fluency"]["n"] == 5
    assert len((out / "records.jsonl").read_text().splitlines()) == 5


def test_eval_command_without_reference_or_generation(tmp_path, tiny_model_dir, capsys):
    data = _write_jsonl(tmp_path / "facts.jsonl", crafted_records(3))
    out = tmp_path / "report"
    assert (
        main(
            [
                "eval",
                "-m",
                str(tiny_model_dir),
                "-d",
                str(data),
                "--no-generation",
                "--no-progress",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert "no --reference" in capsys.readouterr().out
    metrics = json.loads((out / "summary.json").read_text())["methods"]["tiny-model"]["metrics"]
    assert metrics["locality"]["n"] == 0 and metrics["gen_exact_match"]["n"] == 0


def test_eval_command_user_errors(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert main(["eval", "-m", str(tiny_model_dir), "-d", str(bad), "-o", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err
    data = _write_jsonl(tmp_path / "facts.jsonl", crafted_records(2))
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    assert main(["eval", "-m", str(tiny_model_dir), "-d", str(data), "-o", str(a_file)]) == 2
