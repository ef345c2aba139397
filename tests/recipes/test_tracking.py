"""Experiment tracking (report_to, recipes/tracking.py): real TensorBoard and (offline) wandb runs of a tiny
update read back with the trackers' own readers, the refusal of a tracker whose library is missing, the
options and config keys, and a resumed update that adds tracking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import flearning.recipes.algorithm as algorithm
import flearning.recipes.stopping as stopping
from flearning.cli import main
from flearning.config import BenchConfig, UpdateConfig, load_config
from flearning.errors import ConfigError, FlearnError
from flearning.recipes.tracking import RunTracker, flat_config, scalars
from flearning.recipes.update import update
from flearning.recipes.work_dir import work_dir_for
from tiny import toy_facts

# 12 facts, batch 8: 2 optimizer steps per epoch: forget 4 steps, learn 6 steps
STAGES = {
    "forget": {"lr": 1e-2, "epochs": 2, "scheduler": "linear"},
    "learn": {"lr": 1e-2, "epochs": 3},
    "eval_batch_size": 8,
    "generation": False,
}
FORGET_STEPS, LEARN_STEPS = 4, 6


@pytest.fixture
def facts_file(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in toy_facts(12)))
    return path


def read_tensorboard(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a TensorBoard run directory, as TensorBoard itself reads it: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def read_wandb(path: Path) -> list:
    """The records of a wandb run file (``run-*.wandb``): LevelDB's log format (32 KiB blocks of chunks
    with a 7-byte header: crc, length, type) after wandb's 7-byte header, each record a protobuf."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # a whole record
            records.append(chunk)
        elif kind in (2, 3):  # its first or a middle part
            pending = (pending if kind == 3 else b"") + chunk
        elif kind == 4:  # its last part
            records.append(pending + chunk)
    return [pb.Record.FromString(r) for r in records]


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_update_logs_each_stage_lambda_and_metrics_to_tensorboard(tiny_model_dir, facts_file, tmp_path):
    out = tmp_path / "run-a"
    cfg = UpdateConfig(
        model=str(tiny_model_dir),
        data=facts_file,
        method="flearning-ft",
        out=out,
        report_to="tensorboard",
        **STAGES,
    )
    update(cfg, progress=False)
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["report_to"] == ["tensorboard"]
    assert not work_dir_for(out).exists()
    # the default: run name = the output's name, files in the output's logs/ (written in OUT.partial/logs)
    scalars_ = read_tensorboard(out / "logs" / "run-a")
    per_step = {
        f"{stage}/{name}" for stage in ("forget", "learn") for name in ("loss", "lr", "tokens_per_s", "epoch")
    }
    metrics = {m for m, v in run["metrics_after"].items() if v["mean"] is not None}
    evals = {f"eval/{when}/{m}" for when in ("before", "after") for m in metrics}
    assert set(scalars_) == per_step | {"lambda"} | evals

    # one global step: forget's steps 1..4, then learn's 5..10
    forget_steps = list(range(1, FORGET_STEPS + 1))
    learn_steps = list(range(FORGET_STEPS + 1, FORGET_STEPS + LEARN_STEPS + 1))
    assert [s for s, _ in scalars_["forget/loss"]] == forget_steps
    assert [s for s, _ in scalars_["learn/loss"]] == learn_steps
    # the logged losses are run.json's (TensorBoard keeps float32)
    assert [v for _, v in scalars_["forget/loss"]] == pytest.approx(run["losses"]["forget"], rel=1e-6)
    assert [v for _, v in scalars_["learn/loss"]] == pytest.approx(run["losses"]["learn"], rel=1e-6)
    # the rate each step used: a linear schedule over 4 steps for forget, constant for learn
    assert [v for _, v in scalars_["forget/lr"]] == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3])
    assert [v for _, v in scalars_["learn/lr"]] == pytest.approx([1e-2] * LEARN_STEPS)
    assert [v for _, v in scalars_["learn/epoch"]] == pytest.approx([0.5, 1, 1.5, 2, 2.5, 3])
    assert all(v > 0 for _, v in scalars_["forget/tokens_per_s"] + scalars_["learn/tokens_per_s"])
    assert scalars_["lambda"] == [(FORGET_STEPS, pytest.approx(0.7))]
    for metric in metrics:
        assert scalars_[f"eval/before/{metric}"] == [
            (0, pytest.approx(run["metrics_before"][metric]["mean"]))
        ]
        last = FORGET_STEPS + LEARN_STEPS
        assert scalars_[f"eval/after/{metric}"] == [
            (last, pytest.approx(run["metrics_after"][metric]["mean"]))
        ]


def test_update_logs_to_wandb_offline(tiny_model_dir, facts_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-files"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-files").mkdir()
    out = tmp_path / "run-w"
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
            "--no-eval",
            "--report-to",
            "wandb",
            "--run-name",
            "tiny-ft",
            "learn.lr=1e-2",
            "learn.epochs=3",
        ]
    )
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    runs = list((tmp_path / "wandb-files" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # WANDB_DIR is honoured; nothing went to the network
    (log_file,) = runs[0].glob("run-*.wandb")
    records = read_wandb(log_file)
    (started,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (started.display_name, started.project) == ("tiny-ft", "f-learning")
    config = {
        _key(i): json.loads(i.value_json) for r in records if r.HasField("config") for i in r.config.update
    }
    assert config["learn.lr"] == 1e-2 and config["method"] == "ft"
    history = [
        {_key(i): json.loads(i.value_json) for i in r.history.item} for r in records if r.HasField("history")
    ]
    assert [h["_step"] for h in history] == list(range(1, LEARN_STEPS + 1))
    assert [h["learn/loss"] for h in history] == pytest.approx(run["losses"]["learn"])
    assert not (out / "logs").exists()  # wandb wrote under WANDB_DIR, TensorBoard was not asked for


def test_bench_logs_every_stage_and_run_under_its_scope(tiny_model_dir, facts_file, tmp_path):
    out = tmp_path / "bench-t"
    args = [
        "bench",
        "--model",
        str(tiny_model_dir),
        "--data",
        f"toy={facts_file}",
        "--methods",
        "ft,flearning-ft",
        "--n",
        "6",
        "--seeds",
        "1",
        "--lambda",
        "0.5",
        "--out",
        str(out),
        "--no-progress",
        "--report-to",
        "tensorboard",
        "prime.lr=1e-2",
        "prime.max_epochs=1",
        "full.lr=1e-2",
        "full.epochs=1",
        "forget_full.lr=1e-2",
        "forget_full.epochs=1",
        "generation=false",
        "eval_batch_size=4",
    ]
    assert main(args) == 0
    logged = read_tensorboard(out / "logs" / "bench-t")  # the default: the bench directory's logs/<its name>
    summary = json.loads((out / "summary.json").read_text())
    # one global step through prime (1 step), ft's learning (1), flearning-ft's forget (1) and learning (1)
    assert logged["toy/seed0/prime/loss"][0][0] == 1
    assert [s for s, _ in logged["toy/seed0/ft/learn/loss"]] == [2]
    assert [s for s, _ in logged["toy/seed0/flearning-ft/lambda0.5/forget/loss"]] == [3]
    assert logged["toy/seed0/flearning-ft/lambda0.5/lambda"] == [(3, pytest.approx(0.5))]
    assert [s for s, _ in logged["toy/seed0/flearning-ft/lambda0.5/learn/loss"]] == [4]
    methods = summary["datasets"]["toy"]["methods"]
    for name, scope in (("ft", "ft"), ("flearning-ft (λ=0.5)", "flearning-ft/lambda0.5")):
        reliability = logged[f"toy/seed0/{scope}/eval/reliability"]
        assert [v for _, v in reliability] == [pytest.approx(methods[name]["reliability"]["mean"])]
    assert "toy/seed0/primed/eval/reliability" in logged

    # a rerun computes nothing new (its cache): each run's metrics are logged again, no training step
    assert main([*args, "--run-name", "again"]) == 0
    again = read_tensorboard(out / "logs" / "again")
    assert not [tag for tag in again if tag.endswith("/loss")]
    assert {tag for tag in again if "/eval/" in tag} == {tag for tag in logged if "/eval/" in tag}


def test_a_tracker_whose_library_is_missing_is_refused_before_any_work(
    tiny_model_dir, facts_file, tmp_path, monkeypatch, capsys
):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_mlflow_available", lambda: False)
    monkeypatch.setattr(accelerate.utils, "is_trackio_available", lambda: False)
    trained = []
    monkeypatch.setattr(algorithm, "train", lambda *a, **k: trained.append(1))
    out = tmp_path / "out"
    args = ["update", "--model", str(tiny_model_dir), "--data", str(facts_file), "--out", str(out)]
    assert main([*args, "--report-to", "tensorboard,mlflow"]) == 2
    err = capsys.readouterr().err
    assert "report_to: mlflow cannot log: the package mlflow is not installed" in err
    assert "pip install mlflow" in err
    assert not out.exists() and not work_dir_for(out).exists() and not trained

    assert main([*args, "--report-to", "mlflow", "--report-to", "trackio"]) == 2
    assert "the packages mlflow trackio are not installed" in capsys.readouterr().err

    bench = [
        "bench",
        "--model",
        str(tiny_model_dir),
        "--data",
        f"toy={facts_file}",
        "--out",
        str(tmp_path / "b"),
    ]
    assert main([*bench, "--report-to", "trackio"]) == 2
    assert "pip install trackio" in capsys.readouterr().err
    assert not (tmp_path / "b" / "summary.json").exists()


def test_report_to_options_and_config_keys(tmp_path, monkeypatch):
    import flearning.recipes.bench as bench
    import flearning.recipes.update as recipe

    seen = {}

    def fake_update(cfg, **kwargs):
        seen["update"] = cfg
        raise FlearnError("stop here")

    def fake_bench(cfg, **kwargs):
        seen["bench"] = cfg
        return {"table_markdown": "", "wall_seconds": 0.0}

    monkeypatch.setattr(recipe, "update", fake_update)
    monkeypatch.setattr(bench, "run_bench", fake_bench)
    args = ["update", "--data", "x.jsonl", "--out", str(tmp_path / "o"), "--report-to", "tensorboard"]
    assert main([*args, "--report-to", "wandb,tensorboard", "--run-name", "r1", "--logging-dir", "lg"]) == 2
    cfg = seen["update"]
    assert (cfg.report_to, cfg.run_name, cfg.logging_dir) == (["tensorboard", "wandb"], "r1", Path("lg"))
    assert main(["bench", "--out", str(tmp_path / "b"), "--report-to", "mlflow", "--run-name", "b1"]) == 0
    assert (seen["bench"].report_to, seen["bench"].run_name) == (["mlflow"], "b1")

    # off by default; a YAML list or one comma-separated text; the override beats the file
    assert UpdateConfig().report_to == [] and BenchConfig(data="samples").report_to == []
    config = tmp_path / "run.yaml"
    config.write_text("report_to: [wandb, trackio]\nrun_name: yaml-run\nlogging_dir: logs-here\n")
    cfg = load_config(UpdateConfig, config, ["report_to=tensorboard"])
    assert cfg.report_to == ["tensorboard"] and cfg.run_name == "yaml-run"
    assert cfg.logging_dir == tmp_path / "logs-here"  # relative to the config file, like every path
    assert load_config(BenchConfig, config, ["data=samples"]).report_to == ["wandb", "trackio"]
    with pytest.raises(ConfigError) as bad:
        load_config(UpdateConfig, None, ["report_to=[tensorbord]", "run_name=a/b"])
    text = str(bad.value)
    assert "report_to.0: Input should be 'tensorboard', 'wandb', 'mlflow' or 'trackio'" in text
    assert "run_name:" in text and "cannot name a run" in text
    config.write_text("report_to:\n- []\n- wandb\n")  # a name that is not a text: named, not a TypeError
    with pytest.raises(ConfigError, match=r"report_to\.0: Input should be"):
        load_config(UpdateConfig, config, [])


def test_logging_dir_inside_the_output_is_refused(tiny_model_dir, facts_file, tmp_path):
    out = tmp_path / "out"
    cfg = UpdateConfig(model=str(tiny_model_dir), data=facts_file, out=out, report_to=["tensorboard"])
    with pytest.raises(FlearnError, match="inside the output"):
        update(cfg.model_copy(update={"logging_dir": out / "tb"}), progress=False)
    with pytest.raises(FlearnError, match="needs an output directory"):
        update(cfg.model_copy(update={"out": None}), progress=False)


def test_an_interrupted_update_resumes_with_tracking_added(tiny_model_dir, facts_file, tmp_path, monkeypatch):
    """report_to is not part of what a resumed update must match: the rerun with --report-to resumes the
    learning stage, and logs its remaining steps at the global steps they have in a whole run."""
    real = algorithm.train
    stop_at = {"learn": 3}

    def interrupted(model, tokenizer, pairs, cfg, *, description, on_step=None, **kwargs):
        stage = description.split()[0].rstrip(":")

        def on_step_(step, loss):
            if stop_at.get(stage) == step:
                stop_at.clear()
                raise KeyboardInterrupt

        return real(model, tokenizer, pairs, cfg, description=description, on_step=on_step_, **kwargs)

    monkeypatch.setattr(algorithm, "train", interrupted)
    monkeypatch.setattr(stopping, "train", interrupted)
    out = tmp_path / "out"
    args = [
        "update",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(facts_file),
        "--out",
        str(out),
        "--no-progress",
        "--no-eval",
        "forget.lr=1e-2",
        "forget.epochs=2",
        "learn.lr=1e-2",
        "learn.epochs=3",
        "checkpoint_every=1",
    ]
    assert main(args) == 130
    assert (work_dir_for(out) / "knowledge_vector").is_dir()
    assert main([*args, "--report-to", "tensorboard", "--resume"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["resumed"]  # the forget stage and part of learning came from the first process
    logged = read_tensorboard(out / "logs" / "out")
    assert "forget/loss" not in logged  # read back from the work directory, not trained again
    assert [s for s, _ in logged["learn/loss"]] == [FORGET_STEPS + s for s in (4, 5, 6)]
    assert [v for _, v in logged["learn/loss"]] == pytest.approx(run["losses"]["learn"][3:], rel=1e-6)
    assert logged["lambda"] == [(FORGET_STEPS, pytest.approx(0.7))]


def test_without_trackers_nothing_is_logged_and_names_are_flat():
    tracker = RunTracker([])
    assert not tracker and tracker.stage("learn") is None
    tracker.log({"x": 1.0})
    tracker.scoped("zsre/seed0").log({"x": 1.0})
    tracker.finish()
    assert flat_config({"learn": {"lr": 1e-2, "lora": None}, "report_to": ["tensorboard"]}) == {
        "learn.lr": 1e-2,
        "report_to": "['tensorboard']",
    }
    summary = {"reliability": {"mean": 50.0, "n": 2}, "fluency": {"mean": None, "n": 0}}
    assert scalars("eval/after", summary) == {"eval/after/reliability": 50.0}
