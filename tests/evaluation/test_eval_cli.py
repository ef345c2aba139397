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
            "--perplexity-passages",
            "20",
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
    assert "Fluency (greedy)" in printed and "Fluency (top-5 sampled, ROME/EasyEdit)" in printed
    assert "Perplexity" in printed  # (held-out text): rich may wrap the label
    summary = json.loads((out / "summary.json").read_text())
    metrics = summary["methods"]["tiny"]["metrics"]
    assert metrics["reliability"]["n"] == 5
    assert metrics["locality"]["mean"] == 100.0  # the reference is the model itself
    assert metrics["fluency"]["n"] == 5 and metrics["fluency_sampled"]["n"] == 5  # --fluency: both
    ppl = summary["methods"]["tiny"]["perplexity"]
    assert ppl["corpus"] == "sample:wikitext-2-valid-200.txt" and ppl["passages"] == 20
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
                "--no-perplexity",
                "--no-progress",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "no --reference" in printed and "Perplexity" not in printed
    method = json.loads((out / "summary.json").read_text())["methods"]["tiny-model"]
    metrics = method["metrics"]
    assert metrics["locality"]["n"] == 0 and metrics["gen_exact_match"]["n"] == 0
    assert metrics["fluency_sampled"]["n"] == 0 and "perplexity" not in method


def test_eval_command_user_errors(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert main(["eval", "-m", str(tiny_model_dir), "-d", str(bad), "-o", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err
    data = _write_jsonl(tmp_path / "facts.jsonl", crafted_records(2))
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    assert main(["eval", "-m", str(tiny_model_dir), "-d", str(data), "-o", str(a_file)]) == 2
    # a perplexity corpus that is missing or empty: exit 2 before the output is touched
    (tmp_path / "empty.txt").write_text("\n\n")
    for corpus in (tmp_path / "missing.txt", tmp_path / "empty.txt"):
        capsys.readouterr()
        args = ["eval", "-m", str(tiny_model_dir), "-d", str(data), "--perplexity-corpus", str(corpus)]
        assert main([*args, "-o", str(tmp_path / "o2")]) == 2
        assert "perplexity corpus" in capsys.readouterr().err
        assert not (tmp_path / "o2").exists()


def test_eval_into_a_symlinked_directory_writes_through_the_symlink(tmp_path, tiny_model_dir, capsys):
    """``--out`` a symlink to a directory holding an earlier report: the new report goes into the directory
    it points to (with --overwrite), the symlink stays a symlink, a file of the user's there keeps its
    inode and mode, nothing is left beside it."""
    data = _write_jsonl(tmp_path / "facts.jsonl", crafted_records(3))
    real = tmp_path / "reports" / "real"
    args = ["eval", "-m", str(tiny_model_dir), "-d", str(data), "--no-generation", "--no-progress"]
    args += ["--perplexity-passages", "3"]
    assert main([*args, "-o", str(real), "--limit", "1"]) == 0  # the earlier report
    notes = real / "notes.txt"
    notes.write_text("mine")
    notes.chmod(0o600)
    inode = notes.stat().st_ino
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    capsys.readouterr()
    assert main([*args, "-o", str(link), "--overwrite"]) == 0
    assert f"report written to {link}" in " ".join(capsys.readouterr().out.split())  # rich wraps lines
    assert link.is_symlink() and link.readlink() == real
    assert sorted(p.name for p in real.iterdir()) == [
        ".flearn-output.json",
        "metrics.png",
        "notes.txt",
        "records.jsonl",
        "summary.csv",
        "summary.json",
        "summary.md",
    ]
    assert (
        json.loads((real / "summary.json").read_text())["methods"]["tiny-model"]["metrics"]["reliability"][
            "n"
        ]
        == 3
    )
    assert (notes.stat().st_ino, oct(notes.stat().st_mode)) == (inode, "0o100600")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["facts.jsonl", "link", "reports", "tiny-model"]
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["real"]
