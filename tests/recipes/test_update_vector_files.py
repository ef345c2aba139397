"""``flearn update --vector-files sharded`` on one process: knowledge_vector/ and update_vector/ in the
streaming vector format, the same vectors bit for bit as the default one-file (consolidated) output.
Under FSDP2 (2 processes): tests/distributed/test_fsdp2.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from flearning.cli import main
from flearning.recipes.update import update
from flearning.vectors import KnowledgeVector
from tiny import toy_facts

RUN = {
    "method": "flearning-ft",
    "lam": 0.5,
    "learn": {"lr": 1e-2, "epochs": 1},
    "forget": {"lr": 1e-2, "epochs": 1},
    "evaluate": False,
    "perplexity": None,
}


@pytest.fixture
def facts_file(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in toy_facts(6)))
    return path


def test_sharded_vector_files_hold_the_consolidated_vectors_bit_for_bit(tiny_model_dir, facts_file, tmp_path):
    outs = {}
    for files in ("consolidated", "sharded"):
        outs[files] = tmp_path / files
        update(model=str(tiny_model_dir), data=facts_file, out=outs[files], vector_files=files, progress=False,
               **RUN)  # fmt: skip
    one, sharded = outs["consolidated"], outs["sharded"]
    a, b = load_file(str(one / "model.safetensors")), load_file(str(sharded / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same update
    for name in ("knowledge_vector", "update_vector"):
        assert sorted(p.name for p in (one / name).iterdir()) == ["vector.json", "vector.safetensors"]
        record = json.loads((sharded / name / "vector.json").read_text())
        assert record["format_version"] == 2
        # the tiny Llama: the embedding (tied head) and final norm, then its 2 decoder blocks
        assert list(record["shards"]) == [f"vector-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
        got, want = KnowledgeVector.load(sharded / name), KnowledgeVector.load(one / name)
        assert got.keys() == want.keys() and "lm_head.weight" not in got
        assert all(torch.equal(got[k], want[k]) for k in want), name
        exclude = {"created"}
        assert got.metadata.model_dump(exclude=exclude) == want.metadata.model_dump(exclude=exclude)
    run = json.loads((sharded / "run.json").read_text())
    assert run["config"]["vector_files"] == "sharded"
    assert not (tmp_path / "sharded.partial").exists()


def test_cli_vector_files_option(tiny_model_dir, facts_file, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["update", "--model", str(tiny_model_dir), "--data", str(facts_file), "--method", "ft",
            "--no-eval", "--no-perplexity", "--no-progress", "learn.epochs=1", "--out", str(out)]  # fmt: skip
    assert main([*args, "--vector-files", "sharded"]) == 0
    record = json.loads((out / "update_vector" / "vector.json").read_text())
    assert record["format_version"] == 2 and len(record["shards"]) == 3
    assert not (out / "knowledge_vector").exists()  # ft has no forget stage
    capsys.readouterr()
    assert main([*args[:-1], str(tmp_path / "bad"), "--vector-files", "split"]) == 2
    err = capsys.readouterr().err
    assert "vector_files" in err and "consolidated" in err and "sharded" in err


def test_the_dry_run_states_what_the_main_process_holds_for_each_option(tiny_model_dir, tmp_path):
    from flearning.cli.tables import plan_table, render
    from flearning.config import UpdateConfig
    from flearning.recipes.dry_run import dry_run

    plans = {
        files: dry_run(
            UpdateConfig(model=str(tiny_model_dir), out=tmp_path / "out", vector_files=files),
            processes=2,
            sharding="fsdp2",
            available=2**40,
        )  # fmt: skip
        for files in ("consolidated", "sharded")
    }
    assert plans["sharded"].vector_files == "sharded"
    assert plans["sharded"].main_save < plans["consolidated"].main_save
    text = {files: " ".join(render(plan_table(plan), width=400).split()) for files, plan in plans.items()}
    assert "a decoder block of a vector at a time (--vector-files sharded)" in text["sharded"]
    assert "θ*, Δ_old and θ* − θ gathered whole" in text["consolidated"]
