"""``flearn update``'s learning stage until the new facts are held: the configuration (defaults, a fixed
schedule, conflicts), the run record and the terminal output, on a tiny model."""

from __future__ import annotations

import json

import pytest

from flearning.cli import main
from flearning.config import MAX_EPOCHS, UNTIL_ACCURACY, UpdateConfig, load_config, stage_plan
from flearning.errors import ConfigError
from flearning.methods import get_method
from flearning.recipes.update import update
from flearning.recipes.work_dir import run_identity
from flearning.resources import sample_path
from tiny import toy_facts


def plan(**fields):
    return stage_plan(UpdateConfig(data="sample:facts.jsonl", **fields))


def test_update_learns_until_held_by_default_and_fixed_epochs_switch_it_off():
    default = plan()
    assert default.stop.until_accuracy == UNTIL_ACCURACY == 0.95
    assert default.learn.epochs == MAX_EPOCHS == 20 and default.stop.max_locality_drop is None
    assert plan(learn={"epochs": 3}).stop is None and plan(learn={"epochs": 3}).learn.epochs == 3
    assert plan(learn={"max_steps": 7}).stop is None
    capped = plan(learn={"until_accuracy": 0.8, "max_epochs": 6})
    assert (capped.stop.until_accuracy, capped.learn.epochs) == (0.8, 6)
    budget = plan(learn={"epochs": 3, "max_locality_drop": 10})
    assert budget.stop.until_accuracy is None and budget.stop.max_locality_drop == 10
    assert budget.stop.locality_probes == sample_path("locality-probes.jsonl") and budget.learn.epochs == 3


def test_until_and_a_fixed_schedule_exclude_each_other(tmp_path):
    with pytest.raises(ConfigError, match=r"learn.until_accuracy: cannot be combined with learn.epochs"):
        plan(learn={"epochs": 3, "until_accuracy": 0.9})
    with pytest.raises(ConfigError, match=r"learn.max_epochs: cannot be combined with learn.max_steps"):
        plan(learn={"max_steps": 3, "max_epochs": 9})
    with pytest.raises(ConfigError, match=r"forget.until_accuracy: Extra inputs are not permitted"):
        load_config(UpdateConfig, None, ["forget.until_accuracy=0.9"])
    with pytest.raises(ConfigError, match=r"learn.until_accuracy: Input should be less than or equal to 1"):
        load_config(UpdateConfig, None, ["learn.until_accuracy=95"])


def test_the_stop_rule_is_part_of_the_run_identity():
    method = get_method("ft")
    a = run_identity(method, plan(method="ft"), "fp", [("p", "a")], [("p", "b")])
    b = run_identity(
        method, plan(method="ft", learn={"until_accuracy": 0.5}), "fp", [("p", "a")], [("p", "b")]
    )
    assert a["stages"]["learn_stop"]["until_accuracy"] == 0.95 and a != b


@pytest.fixture
def facts_file(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in toy_facts(8)))
    return path


def test_update_records_the_epochs_and_the_accuracy_per_epoch(tiny_model_dir, facts_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "update",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(facts_file),
            "--method",
            "ft",
            "--out",
            str(out),
            "--no-progress",
            "learn.lr=1e-2",
            "learn.until_accuracy=0.5",
            "learn.max_epochs=12",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    schedule = run["learn_schedule"]
    history = schedule["history"]
    assert schedule["stopped_by"] == "accuracy" and schedule["rule"]["until_accuracy"] == 0.5
    assert history[-1]["accuracy"] >= 0.5 > max(r["accuracy"] for r in history[:-1])
    assert schedule["epochs_trained"] == schedule["kept_epoch"] == history[-1]["epoch"] < 12
    assert len(run["losses"]["learn"]) == history[-1]["epoch"]  # 8 facts, batch 8: one step an epoch
    # Reliability after is the last check's accuracy (the same teacher-forced accuracy, same prompts)
    assert run["metrics_after"]["reliability"]["mean"] == pytest.approx(100 * history[-1]["accuracy"])
    assert run["stages"]["learn_stop"] == schedule["rule"]
    assert f"Learning stage: {history[-1]['epoch']} epochs" in (out / "README.md").read_text()
    flat = " ".join(printed.split())
    assert "learning stage: accuracy on the new facts by epoch (target 50)" in flat
    assert f"reached the target accuracy after {history[-1]['epoch']} epochs" in flat
    assert "What the model says (greedy)" in flat and "Locality" in flat


def test_a_fixed_schedule_is_recorded_as_such(tiny_model_dir, facts_file, tmp_path):
    result = update(
        UpdateConfig(model=str(tiny_model_dir), data=facts_file, method="ft", learn={"epochs": 1}),
        progress=False,
    )
    assert result.summary["learn_schedule"]["stopped_by"] == "epochs"
    assert (
        result.summary["learn_schedule"]["history"] == [] and result.summary["stages"]["learn_stop"] is None
    )


def test_a_bad_probe_file_is_refused_before_any_training(tiny_model_dir, facts_file, tmp_path, capsys):
    probes = tmp_path / "probes.jsonl"
    probes.write_text('{"prompt": "Colour is", "answer": "blue"}\n{"prompt": "x"}\n')
    out = tmp_path / "out"
    code = main(
        [
            "update",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(facts_file),
            "--out",
            str(out),
            "--no-progress",
            "learn.max_locality_drop=5",
            f"learn.locality_probes={probes}",
        ]
    )
    assert code == 2
    assert f"{probes}:line 2:answer: missing" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out.partial").exists()
