"""``flearn update`` interrupted in any stage and rerun with the same command resumes from OUT.partial/ and
writes the same model bytes as an uninterrupted run; two runs with the same config and seed write the
same report and run.json (apart from timings)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from reliability_helpers import assert_same_model, strip_timings, update_args

import flearning.recipes.algorithm as recipe
import flearning.recipes.stopping as stopping
from flearning.cli import main
from flearning.recipes.work_dir import work_dir_for

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def trace(monkeypatch):
    """Record every training stage (description, optimizer steps run here) and optionally interrupt one
    (Ctrl-C after a given step of the stage whose description starts with a given word)."""
    real = recipe.train
    calls: list[tuple[str, list[int]]] = []
    plan: dict = {}

    def traced(model, tokenizer, pairs, cfg, *, description, on_step=None, **kwargs):
        steps: list[int] = []
        calls.append((description, steps))
        given = on_step

        def on_step(step, loss):
            if given is not None:
                given(step, loss)
            steps.append(step)
            if plan.get("stage") and description.startswith(plan["stage"]) and step == plan["at"]:
                plan.clear()
                raise KeyboardInterrupt

        return real(model, tokenizer, pairs, cfg, description=description, on_step=on_step, **kwargs)

    monkeypatch.setattr(recipe, "train", traced)  # the forget stage
    monkeypatch.setattr(stopping, "train", traced)  # the learning stage (train_until)

    def interrupt(stage: str, at: int) -> None:
        plan.update(stage=stage, at=at)

    traced.calls = calls
    traced.interrupt = interrupt
    return traced


@pytest.mark.parametrize(
    ("method", "stage", "at"),
    [
        ("flearning-ft", "learn", 3),  # forget finished, learning mid-way
        ("flearning-ft", "forget", 2),  # forget mid-way
        ("flearning-lora", "learn", 4),  # LoRA stages, dropout on
        ("flearning-lora-ft", "learn", 2),
        ("ft", "learn", 5),
    ],
)
def test_rerun_after_an_interruption_resumes_and_writes_the_same_model(
    method, stage, at, tiny_model_dir, facts, tmp_path, trace
):
    reference = tmp_path / "reference"
    assert main(update_args(tiny_model_dir, facts, reference, method)) == 0
    trace.calls.clear()

    out = tmp_path / "out"
    args = update_args(tiny_model_dir, facts, out, method)
    trace.interrupt(stage, at)
    assert main(args) == 130  # Ctrl-C
    assert not out.exists()
    work = work_dir_for(out)
    assert (work / "identity.json").is_file()
    if stage == "learn" and method.startswith("flearning"):
        assert (work / "knowledge_vector" / "vector.safetensors").is_file()
        assert not (work / "forget").exists()  # its checkpoints are dropped once Δ_old is saved

    trace.calls.clear()
    assert main(args) == 0  # the same command
    ran = {description.split()[0].rstrip(":"): steps for description, steps in trace.calls}
    if stage == "learn":
        assert "forget" not in ran  # the finished forget stage was not trained again
        assert ran["learn"] == list(range(at + 1, 7))
    else:
        assert ran["forget"] == [at + 1, 4] and ran["learn"] == list(range(1, 7))
    assert_same_model(out, reference)
    if method.startswith("flearning"):
        from safetensors.torch import load_file

        a = load_file(str(out / "knowledge_vector" / "vector.safetensors"))
        b = load_file(str(reference / "knowledge_vector" / "vector.safetensors"))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert not work.exists()  # removed once the output is in place
    run, ref_run = (json.loads((d / "run.json").read_text()) for d in (out, reference))
    assert run["final_loss"] == ref_run["final_loss"] and run["tokens"] == ref_run["tokens"]
    # the whole loss trace of each stage, the steps run before the interruption included
    stages = ["forget", "learn"] if method.startswith("flearning") else ["learn"]
    assert list(run["losses"]) == stages
    assert [len(run["losses"][s]) for s in stages] == ([4, 6] if len(stages) == 2 else [6])
    assert run["losses"] == ref_run["losses"]


def test_an_update_learning_until_held_resumes_to_the_same_model_and_schedule(
    tiny_model_dir, facts, tmp_path, trace
):
    """Interrupted inside the learning stage of an update that stops at a target accuracy: the rerun
    stops at the same epoch, writes the same model and records the same accuracy per epoch."""

    def args(out: Path, target: float) -> list[str]:
        fixed = update_args(tiny_model_dir, facts, out, "ft")
        return [a for a in fixed if a != "learn.epochs=3"] + [
            f"learn.until_accuracy={target}",
            "learn.max_epochs=8",
        ]

    assert main(args(tmp_path / "trajectory", 1.0)) == 0
    history = json.loads((tmp_path / "trajectory" / "run.json").read_text())["learn_schedule"]["history"]
    accuracies = [r["accuracy"] for r in history]
    k = next(e for e in range(2, len(accuracies) + 1) if accuracies[e - 1] > max(accuracies[: e - 1]))
    target = accuracies[k - 1]
    reference = tmp_path / "reference"
    assert main(args(reference, target)) == 0
    ref_run = json.loads((reference / "run.json").read_text())
    assert ref_run["learn_schedule"]["stopped_by"] == "accuracy"
    assert ref_run["learn_schedule"]["epochs_trained"] == k

    out = tmp_path / "out"
    trace.interrupt("learn", 3)  # inside epoch 2 (12 facts, batch 8: two steps an epoch)
    assert main(args(out, target)) == 130
    trace.calls.clear()
    assert main(args(out, target)) == 0
    assert trace.calls[-1][1] == list(range(4, 2 * k + 1))  # only the steps after the interruption
    assert_same_model(out, reference)
    run = json.loads((out / "run.json").read_text())
    assert run["learn_schedule"] == ref_run["learn_schedule"] and run["losses"] == ref_run["losses"]


def test_a_killed_process_resumes_from_the_last_periodic_checkpoint(tiny_model_dir, facts, tmp_path):
    """A real kill (os._exit, no chance to save) after learning step 5 with checkpoint_every=2: the rerun
    redoes step 5 from the step-4 checkpoint and ends bit-identical."""
    reference = tmp_path / "reference"
    assert main(update_args(tiny_model_dir, facts, reference, "flearning-ft", "checkpoint_every=2")) == 0
    out = tmp_path / "out"
    args = update_args(tiny_model_dir, facts, out, "flearning-ft", "checkpoint_every=2")
    script = textwrap.dedent(f"""
        import os, sys
        import flearning.recipes.algorithm as recipe
        import flearning.recipes.stopping as stopping
        from flearning.cli import main
        real = recipe.train
        def train(*a, description, on_step=None, **kw):
            def on_step(step, loss):
                if description.startswith("learn") and step == 5:
                    os._exit(9)
            return real(*a, description=description, on_step=on_step, **kw)
        recipe.train = stopping.train = train
        sys.exit(main({args!r}))
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    killed = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert killed.returncode == 9, killed.stderr
    checkpoints = sorted(p.name for p in (work_dir_for(out) / "learn").iterdir())
    assert checkpoints == ["step-00000004"]
    assert main(args) == 0
    assert_same_model(out, reference)


def test_a_partial_run_of_other_settings_is_refused_naming_the_difference(
    tiny_model_dir, facts, tmp_path, trace, capsys
):
    out = tmp_path / "out"
    trace.interrupt("learn", 2)
    assert main(update_args(tiny_model_dir, facts, out, "flearning-ft", "lambda=0.7")) == 130
    capsys.readouterr()
    assert main(update_args(tiny_model_dir, facts, out, "flearning-ft", "lambda=0.3", "learn.lr=1e-3")) == 2
    err = capsys.readouterr().err
    assert "holds an interrupted update of a different run" in err
    assert "lambda: 0.7 → 0.3" in err and "stages.learn.lr: 0.01 → 0.001" in err and "--restart" in err
    assert work_dir_for(out).is_dir()  # refused, not destroyed
    # --resume refuses it the same way, naming exactly what differs
    resume = [*update_args(tiny_model_dir, facts, out, "flearning-ft", "lambda=0.3"), "--resume"]
    assert main(resume) == 2
    assert capsys.readouterr().err == (
        f"error: {work_dir_for(out)} holds an interrupted update of a different run (lambda: 0.7 → 0.3). "
        "Rerun it with the settings it was made with to resume it, or pass --restart to discard it and "
        "start afresh.\n"
    )
    assert work_dir_for(out).is_dir() and not out.exists()
    trace.calls.clear()
    assert main([*update_args(tiny_model_dir, facts, out, "flearning-ft", "lambda=0.3"), "--restart"]) == 0
    assert [d.split()[0] for d, _ in trace.calls] == ["forget:", "learn"]
    assert not work_dir_for(out).exists()


def test_resume_flag_requires_something_to_resume(tiny_model_dir, facts, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*update_args(tiny_model_dir, facts, out, "ft"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert not out.exists() and not work_dir_for(out).exists()
    assert main([*update_args(tiny_model_dir, facts, out, "ft"), "--resume", "--restart"]) == 2


def test_same_config_and_seed_give_identical_reports(tiny_model_dir, facts, tmp_path):
    """Two runs, same command, the first in a fresh process (so no in-process cache or state can hide
    nondeterminism): report/summary.json and run.json equal byte for byte once timing keys are dropped
    (the JSON is re-serialised the way it was written, so key order counts too), and the same model."""
    out = tmp_path / "out"
    args = update_args(tiny_model_dir, facts, out, "flearning-lora-ft", "--overwrite", evaluate=True)
    texts = []
    for attempt in range(2):
        if attempt == 0:
            env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
            script = f"import sys\nfrom flearning.cli import main\nsys.exit(main({args!r}))\n"
            first = subprocess.run(
                [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900
            )
            assert first.returncode == 0, first.stderr
        else:
            assert main(args) == 0
        texts.append({name: (out / name).read_text() for name in ("run.json", "report/summary.json")})
        if attempt == 0:
            shutil.copytree(out, tmp_path / "first")
    for name in texts[0]:
        first, second = (strip_timings(json.loads(t[name])) for t in texts)
        assert json.dumps(first, indent=2) == json.dumps(second, indent=2), name
    assert json.loads(texts[0]["run.json"])["metrics_after"]["reliability"]["n"] == 12
    assert_same_model(out, tmp_path / "first")


@pytest.mark.parametrize("flag", [[], ["--restart"]])
def test_a_foreign_partial_directory_is_never_deleted(flag, tiny_model_dir, facts, tmp_path, capsys):
    out = tmp_path / "out"
    foreign = work_dir_for(out)
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main([*update_args(tiny_model_dir, facts, out, "ft"), *flag]) == 2
    assert "is not the work directory of an interrupted flearn update" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"
