"""FSDP2 on this machine: 2 CPU processes (gloo) launched with the shipped ``fsdp2-cpu.yaml``, against 1
process with the same global batch.

The launched processes run ``fsdp2_worker.py`` (the project's ``forget_stage`` / ``forget`` / ``train`` /
``run_method``, and ``flearn update`` itself); the one-process references run here, from the same saved
weights. Tolerances are those of the DDP test (``test_ddp.py`` explains them): FSDP2 reduce-scatters the
same per-rank mean gradients DDP all-reduces, so the two differ from one process only by the order of
fp32 sums, amplified by AdamW on near-zero gradient entries.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ddp_worker
import fsdp2_worker as worker
import pytest
import torch
from test_ddp import (
    LAUNCH_TIMEOUT,
    assert_same_weights,
    free_port,
    needs_gloo,
    worker_env,
    write_update_facts,
)

from flearning.resources import configs_dir

pytestmark = [needs_gloo, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
CONFIG = configs_dir() / "accelerate" / "fsdp2-cpu.yaml"
ATOL = 2e-3 * worker.LR


def launch(args: list[str], tmp: Path, *, check: bool = True) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file fsdp2-cpu.yaml ARGS`` (again on another port if it was taken)."""
    env = worker_env(tmp)
    env.pop("ACCELERATE_USE_CPU", None)  # the trainer runs on CPU by itself when torch sees no GPU
    env["PYTHONPATH"] = str(HERE) + ":" + env.get("PYTHONPATH", "")
    for _ in range(2):
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
            "--main_process_port", str(free_port()), *args,
        ]  # fmt: skip
        proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
        if "address already in use" not in (proc.stdout + proc.stderr).lower():
            break
    if check:
        assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from tiny import tiny_llama, tiny_tokenizer

    path = tmp_path_factory.mktemp("fsdp2") / "model"
    tiny_llama(seed=11).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def start(model_dir) -> dict[str, torch.Tensor]:
    return ddp_worker.weights(ddp_worker.load(model_dir)[0])


@pytest.fixture(scope="module")
def stages(model_dir):
    """(per-rank infos, the launched run's tensors, the one-process infos and tensors)."""
    from safetensors.torch import load_file

    out = model_dir.parent / "stages"
    launch([str(HERE / "fsdp2_worker.py"), "--mode", "stages", "--model", str(model_dir), "--out", str(out)],
           model_dir.parent)  # fmt: skip
    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ddp_worker.WORLD)]
    tensors = {p.stem: load_file(str(p)) for p in out.glob("*.safetensors")}
    one_info, one_tensors = worker.run_stages(model_dir, ddp_worker.WORLD * ddp_worker.PER_RANK_BATCH)
    return infos, tensors, one_info, one_tensors


def test_the_stages_run_sharded_and_match_one_process(stages, start):
    infos, tensors, one_info, one = stages
    for info in infos:
        assert info["sharded"] and info["vector_sharded"], info
        assert info["forget_losses"] == pytest.approx(one_info["forget_losses"], rel=1e-5)
        assert info["learn_losses"] == pytest.approx(one_info["learn_losses"], rel=1e-5)
    assert not one_info["sharded"]
    # Δ_old and θ' (the forget stage's arithmetic, on local shards), then θ*
    delta_start = {k: torch.zeros_like(v) for k, v in one["delta"].items()}
    assert_same_weights(tensors["delta"], one["delta"], delta_start, atol=ATOL)
    assert_same_weights(tensors["theta_prime"], one["theta_prime"], start, atol=ATOL)
    assert_same_weights(tensors["theta_star"], one["theta_star"], start, atol=ATOL)


def test_lora_stages_on_a_sharded_model_match_one_process(stages, start):
    infos, tensors, one_info, one = stages
    for info in infos:
        # the merged plain model (no peft wrapper), sharded in place: FSDP2 prefixes the class name
        assert one_info["lora_result_class"] == "LlamaForCausalLM"
        assert info["lora_result_class"] == "FSDPLlamaForCausalLM"
        for stage in ("forget", "learn"):
            assert info["lora_losses"][stage] == pytest.approx(one_info["lora_losses"][stage], rel=1e-5)
    # λ·lr of the LoRA forget stage (5e-2) bounds an entry's error, as in the DDP test
    assert_same_weights(tensors["lora_star"], one["lora_star"], start, atol=2e-3 * 5e-2)


def test_each_process_holds_half_of_the_weights_and_optimizer_state(stages):
    infos, _, one_info, _ = stages
    whole = one_info["learn_state_bytes"]
    assert whole["optimizer"] == 2 * whole["trainable"]  # AdamW: two moments per trainable weight
    for info in infos:
        held = info["learn_state_bytes"]
        ratio = (held["parameters"] + held["optimizer"]) / (whole["parameters"] + whole["optimizer"])
        # rows are split as torch.chunk does: 257 embedding rows give 129 and 128
        assert 0.49 <= ratio <= 0.51, (held, whole)
        # the forget arithmetic holds this process's rows of Δ_old, not a whole copy of the model
        assert 0.49 <= info["vector_bytes"] / whole["parameters"] <= 0.51


# -- flearn update under FSDP2: one output, the numbers of one process, resumable after a kill ----------

UPDATE = [
    "--method", "flearning-ft", "--lambda", "0.5", "--seed", "3", "--no-progress",
    "forget.lr=0.01", "forget.max_steps=2", "learn.lr=0.01", "learn.max_steps=4",
    "forget.batch_size=4", "learn.batch_size=4", "checkpoint_every=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def update_out(model_dir) -> Path:
    tmp = model_dir.parent / "update"
    tmp.mkdir()
    facts = write_update_facts(tmp / "facts.jsonl")
    out = tmp / "out"
    proc = launch(["-m", "flearning.cli", "update", "--model", str(model_dir), "--data", str(facts),
                   "--out", str(out), *UPDATE], tmp)  # fmt: skip
    assert proc.stderr.count(f"wrote {out}") == 1, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp.iterdir() if p.name != "cache") == ["facts.jsonl", "out"]
    return out


def test_flearn_update_under_fsdp2_writes_one_output_with_the_numbers_of_one_process(
    update_out, model_dir, start
):
    from safetensors.torch import load_file

    from flearning import update

    for name in ("model.safetensors", "run.json", "README.md", "knowledge_vector", "update_vector", "report"):
        assert (update_out / name).exists(), name
    one = update(
        model=str(model_dir), data=update_out.parent / "facts.jsonl", method="flearning-ft", lam=0.5,
        seed=3, out=model_dir.parent / "update-one", progress=False,
        **{"forget": {"lr": 0.01, "max_steps": 2, "batch_size": 8},
           "learn": {"lr": 0.01, "max_steps": 4, "batch_size": 8}},
    )  # fmt: skip
    run = json.loads((update_out / "run.json").read_text())
    assert run["losses"]["forget"] == pytest.approx(one.summary["losses"]["forget"], rel=1e-5)
    assert run["losses"]["learn"] == pytest.approx(one.summary["losses"]["learn"], rel=1e-5)
    got, want = (
        load_file(str(update_out / "model.safetensors")),
        load_file(str(one.out / "model.safetensors")),
    )
    assert_same_weights(got, want, start, atol=ATOL)
    vector = load_file(str(update_out / "knowledge_vector" / "vector.safetensors"))
    one_vector = load_file(str(one.out / "knowledge_vector" / "vector.safetensors"))
    assert_same_weights(
        vector, one_vector, {k: torch.zeros_like(v) for k, v in one_vector.items()}, atol=ATOL
    )


def test_flearn_update_under_fsdp2_writes_sharded_vector_files_equal_to_the_consolidated_ones(
    update_out, model_dir
):
    """``--vector-files sharded``: Δ_old gathered and written a decoder block at a time (the main process
    never holds it whole), θ* − θ written a block at a time; the same vectors, bit for bit, as the
    consolidated run (two FSDP2 runs of the same settings train identically: the resume test)."""
    from flearning.vectors import KnowledgeVector

    tmp = model_dir.parent / "sharded-files"
    tmp.mkdir()
    facts = write_update_facts(tmp / "facts.jsonl")
    out = tmp / "out"
    proc = launch(["-m", "flearning.cli", "update", "--model", str(model_dir), "--data", str(facts),
                   "--out", str(out), "--vector-files", "sharded", *UPDATE], tmp)  # fmt: skip
    assert proc.stderr.count(f"wrote {out}") == 1, proc.stderr[-3000:]  # exactly one output
    assert sorted(p.name for p in tmp.iterdir() if p.name != "cache") == ["facts.jsonl", "out"]
    for name in ("knowledge_vector", "update_vector"):
        record = json.loads((out / name / "vector.json").read_text())
        # the tiny Llama: embedding (tied head) + final norm, then its 2 decoder blocks
        assert record["format_version"] == 2 and len(record["shards"]) == 3, name
        got, want = KnowledgeVector.load(out / name), KnowledgeVector.load(update_out / name)
        assert got.keys() == want.keys(), name
        for key in want:
            assert torch.equal(got[key], want[key]), (name, key)
    got, want = _tensors(out), _tensors(update_out)
    assert all(torch.equal(got[k], want[k]) for k in want)  # the same model


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def test_flearn_update_under_fsdp2_resumes_after_the_main_process_is_killed(update_out, model_dir):
    from safetensors.torch import load_file

    tmp = model_dir.parent / "killed"
    tmp.mkdir()
    facts = write_update_facts(tmp / "facts.jsonl")
    out = tmp / "out"
    args = ["update", "--model", str(model_dir), "--data", str(facts), "--out", str(out), *UPDATE]
    killed = launch([str(HERE / "fsdp2_worker.py"), "--mode", "kill", "--after", "2", "--", *args], tmp,
                    check=False)  # fmt: skip
    assert killed.returncode != 0
    partial = tmp / "out.partial"
    assert not out.exists() and (partial / "knowledge_vector" / "vector.json").is_file()
    assert [p.name for p in sorted((partial / "learn").glob("step-*"))] == ["step-00000002"]
    resumed = launch(["-m", "flearning.cli", *args], tmp)
    assert "resuming from" in resumed.stderr and "optimizer step 2 of 4" in resumed.stderr, resumed.stderr[
        -3000:
    ]
    assert not partial.exists()
    # the same model as the uninterrupted run, bit for bit
    got, want = load_file(str(out / "model.safetensors")), load_file(str(update_out / "model.safetensors"))
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_the_dry_run_plan_of_each_process_matches_what_the_launched_processes_held(stages, model_dir):
    from flearning.config import StagePlan
    from flearning.recipes.memory import plan_memory

    infos, _, _, _ = stages
    forget, learn = worker.stage_configs(ddp_worker.PER_RANK_BATCH)
    plan = plan_memory(
        str(model_dir), "flearning-ft", StagePlan(learn=learn, forget=forget, lam=worker.LAM),
        processes=ddp_worker.WORLD, sharding="fsdp2", available=0,
    )  # fmt: skip
    learn_plan = plan.stages[-1]
    planned = learn_plan.weights + learn_plan.optimizer
    for info in infos:
        held = info["learn_state_bytes"]
        measured = held["parameters"] + held["optimizer"]
        # the plan splits bytes evenly (ceil); torch.chunk gives rank 0 the odd embedding row
        assert abs(planned - measured) / measured < 0.01, (planned, measured)
        # and the forget arithmetic's Δ_old shards are what the plan counts for them
        assert (
            abs(dict(learn_plan.other)["Δ_old (shards)"] - info["vector_bytes"]) / info["vector_bytes"] < 0.01
        )


def test_flearn_prime_under_fsdp2_writes_the_primed_model_of_one_process(model_dir, start):
    from safetensors.torch import load_file

    tmp = model_dir.parent / "prime"
    tmp.mkdir()
    facts = write_update_facts(tmp / "facts.jsonl")
    args = ["--model", str(model_dir), "--data", str(facts), "--max-epochs", "2", "--lr", "0.01",
            "--no-progress"]  # fmt: skip
    launch(["-m", "flearning.cli", "prime", *args, "--out", str(tmp / "two"), "--batch-size", "4"], tmp)
    from typer.testing import CliRunner

    from flearning.cli import app

    one = CliRunner().invoke(app, ["prime", *args, "--out", str(tmp / "one"), "--batch-size", "8"])
    assert one.exit_code == 0, one.output
    got, want = (
        load_file(str(tmp / "two" / "model.safetensors")),
        load_file(str(tmp / "one" / "model.safetensors")),
    )
    assert_same_weights(got, want, start, atol=ATOL)
