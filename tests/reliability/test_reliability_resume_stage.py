"""A training stage stopped at any optimizer step and resumed from its checkpoint ends bit-identical to an
uninterrupted run (weights and loss trace), for full fine-tuning, LoRA (with dropout, so the RNG states
matter) and gradient accumulation; an incompatible checkpoint is refused, naming what differs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flearning.errors import FlearnError
from flearning.training import LoraSettings, TrainConfig, train
from flearning.training import checkpoint as ckpt
from flearning.training.checkpoint import Checkpointing
from tiny import tiny_llama

PAIRS = [(f"Fact number {i} is", f"answer{i % 5}") for i in range(22)]

CONFIGS = {
    # 3 batches per epoch, 2 epochs, a linear schedule with warm-up (the scheduler state matters)
    "full": TrainConfig(
        lr=1e-2, epochs=2, batch_size=8, scheduler="linear", warmup_ratio=0.2, weight_decay=0.01
    ),
    # dropout draws from the torch generator: a resume that did not restore it would differ
    "lora": TrainConfig(
        lr=1e-2,
        epochs=2,
        batch_size=8,
        scheduler="linear",
        lora=LoraSettings(r=4, dropout=0.2, target_modules=["q_proj", "v_proj"]),
    ),
    # 6 micro-batches of 4 per epoch, 2 per optimizer step; 22 pairs → the last micro-batch is short
    "grad_accum": TrainConfig(lr=1e-2, epochs=2, batch_size=4, grad_accum=2),
    "ft-c": TrainConfig(lr=5e-2, epochs=2, batch_size=8, linf_bound=2e-3),
    # the same steps with each step's micro-batches run as one batch on the Alpaca preamble
    "fused": TrainConfig(
        lr=1e-2, epochs=2, batch_size=4, grad_accum=2, template="alpaca", fused_accumulation=True
    ),
}


class Stop(Exception):
    """The injected failure."""


def stopper(at_step: int):
    def on_step(step: int, loss: float) -> None:
        if step == at_step:
            raise Stop(f"injected failure after step {step}")

    return on_step


def trainable(result) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in result.model.named_parameters()}


def assert_same(a, b) -> None:
    assert a.steps == b.steps and a.tokens == b.tokens
    assert a.losses == b.losses  # exact floats
    pa, pb = trainable(a), trainable(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def run(tokenizer, cfg, **kw):
    return train(tiny_llama(), tokenizer, PAIRS, cfg, progress=False, **kw)


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("stop_at", [1, 3, 4])  # 3: the end of the first epoch
def test_resume_after_an_interruption_is_bit_identical(kind, stop_at, tokenizer, tmp_path):
    cfg = CONFIGS[kind]
    reference = run(tokenizer, cfg)
    assert reference.steps == 6
    directory = tmp_path / "ckpt"
    with pytest.raises(Stop):
        run(tokenizer, cfg, checkpoint=Checkpointing(directory, every=0), on_step=stopper(stop_at))
    # the interruption saved the state after step `stop_at`
    assert [s for s, _, _ in ckpt.checkpoint_dirs(directory)] == [stop_at]
    steps_seen = []
    resumed = run(
        tokenizer,
        cfg,
        checkpoint=Checkpointing(directory, every=0),
        on_step=lambda step, loss: steps_seen.append(step),
    )
    assert steps_seen == list(range(stop_at + 1, 7))  # only the remaining steps were trained
    assert_same(resumed, reference)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_hard_kill_resumes_from_the_last_periodic_checkpoint(kind, tokenizer, tmp_path):
    """A kill leaves no chance to save (save_on_error=False emulates it): the stage restarts from the
    last periodic checkpoint and redoes the steps after it, still bit-identical."""
    cfg = CONFIGS[kind]
    reference = run(tokenizer, cfg)
    directory = tmp_path / "ckpt"
    with pytest.raises(Stop):
        run(
            tokenizer,
            cfg,
            checkpoint=Checkpointing(directory, every=2, save_on_error=False),
            on_step=stopper(5),
        )
    assert [s for s, _, _ in ckpt.checkpoint_dirs(directory)] == [4]  # only the latest is kept
    steps_seen = []
    resumed = run(
        tokenizer,
        cfg,
        checkpoint=Checkpointing(directory, every=2),
        on_step=lambda step, loss: steps_seen.append(step),
    )
    assert steps_seen == [5, 6]
    assert_same(resumed, reference)


def test_resume_twice_and_a_finished_stage_is_not_trained_again(tokenizer, tmp_path):
    cfg = CONFIGS["full"]
    reference = run(tokenizer, cfg)
    directory = tmp_path / "ckpt"
    with pytest.raises(Stop):
        run(tokenizer, cfg, checkpoint=Checkpointing(directory, every=1), on_step=stopper(2))
    with pytest.raises(Stop):
        run(tokenizer, cfg, checkpoint=Checkpointing(directory, every=1), on_step=stopper(5))
    done = run(tokenizer, cfg, checkpoint=Checkpointing(directory, every=1))
    assert_same(done, reference)
    assert [(s, final) for s, final, _ in ckpt.checkpoint_dirs(directory)] == [(6, True)]
    steps_seen = []
    again = run(
        tokenizer, cfg, checkpoint=Checkpointing(directory), on_step=lambda s, _: steps_seen.append(s)
    )
    assert steps_seen == []
    assert_same(again, reference)


def test_resume_false_starts_afresh(tokenizer, tmp_path):
    cfg = CONFIGS["full"]
    directory = tmp_path / "ckpt"
    with pytest.raises(Stop):
        run(tokenizer, cfg, checkpoint=Checkpointing(directory, every=0), on_step=stopper(3))
    steps_seen = []
    run(
        tokenizer,
        cfg,
        checkpoint=Checkpointing(directory, resume=False),
        on_step=lambda s, _: steps_seen.append(s),
    )
    assert steps_seen == [1, 2, 3, 4, 5, 6]


@pytest.fixture
def interrupted(tokenizer, tmp_path):
    directory = tmp_path / "ckpt"
    with pytest.raises(Stop):
        run(tokenizer, CONFIGS["full"], checkpoint=Checkpointing(directory, every=0), on_step=stopper(2))
    return directory


def test_refuses_a_checkpoint_of_another_configuration(interrupted, tokenizer):
    other = CONFIGS["full"].model_copy(update={"lr": 1e-3, "epochs": 3.0})
    with pytest.raises(
        FlearnError, match=r"different training configuration \(epochs: 2\.0 → 3\.0; lr: 0\.01 → 0\.001\)"
    ):
        run(tokenizer, other, checkpoint=Checkpointing(interrupted))


def test_refuses_a_checkpoint_of_other_data(interrupted, tokenizer):
    with pytest.raises(FlearnError, match="different training data"):
        train(
            tiny_llama(),
            tokenizer,
            PAIRS[:-1],
            CONFIGS["full"],
            progress=False,
            checkpoint=Checkpointing(interrupted),
        )


def test_refuses_a_checkpoint_of_another_model(interrupted, tokenizer):
    with pytest.raises(FlearnError, match="different starting model") as info:
        train(
            tiny_llama(seed=1),
            tokenizer,
            PAIRS,
            CONFIGS["full"],
            progress=False,
            checkpoint=Checkpointing(interrupted),
        )
    assert "data" not in str(info.value).split("made with")[1].split("Delete")[0]  # only what differs


def test_refuses_a_checkpoint_made_with_another_number_of_processes(interrupted, tokenizer):
    # a checkpoint of a 2-process run (its identity says so) cannot continue on 1 process: a step's
    # batches and the number of steps per epoch depend on the process count
    (path,) = [p for _, _, p in ckpt.checkpoint_dirs(interrupted)]
    record = json.loads((path / ckpt.JSON_FILE).read_text())
    assert record["identity"]["processes"] == 1
    record["identity"]["processes"] = 2
    (path / ckpt.JSON_FILE).write_text(json.dumps(record))
    with pytest.raises(FlearnError, match=r"made with 2 data-parallel process\(es\) \(1 now") as info:
        run(tokenizer, CONFIGS["full"], checkpoint=Checkpointing(interrupted))
    assert "configuration" not in str(info.value) and "data hash" not in str(info.value)


def test_refuses_a_damaged_or_foreign_checkpoint(interrupted, tokenizer):
    (path,) = [p for _, _, p in ckpt.checkpoint_dirs(interrupted)]
    (path / ckpt.MODEL_FILE).write_bytes(b"\x00" * 5)
    with pytest.raises(FlearnError, match="checkpoint is damaged"):
        run(tokenizer, CONFIGS["full"], checkpoint=Checkpointing(interrupted))
    record = json.loads((path / ckpt.JSON_FILE).read_text())
    (path / ckpt.JSON_FILE).write_text(json.dumps(dict(record, format="something-else")))
    with pytest.raises(FlearnError, match="not a f-learning training checkpoint"):
        run(tokenizer, CONFIGS["full"], checkpoint=Checkpointing(interrupted))


def test_checkpoint_files_are_safetensors_and_json(interrupted):
    (path,) = [p for _, _, p in ckpt.checkpoint_dirs(interrupted)]
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "state.json", "state.safetensors"]
    record = json.loads((path / "state.json").read_text())
    assert record["position"]["step"] == 2 and len(record["position"]["losses"]) == 2
    from safetensors.torch import load_file

    state = load_file(str(path / "state.safetensors"))
    assert {"optimizer/0/step", "optimizer/0/exp_avg", "optimizer/0/exp_avg_sq", "rng/torch"} <= set(state)


def test_a_failed_checkpoint_write_keeps_the_previous_one(tokenizer, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    directory = tmp_path / "ckpt"
    real = safetensors.torch.save_file
    calls = {"n": 0}

    def full_disk_on_second_checkpoint(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # two files per checkpoint: the second checkpoint fails
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk_on_second_checkpoint)
    with pytest.raises(FlearnError, match=r"no space left on device \(disk full\)"):
        run(tokenizer, CONFIGS["full"], checkpoint=Checkpointing(directory, every=2))
    assert [s for s, _, _ in ckpt.checkpoint_dirs(directory)] == [2]
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]


def test_refuses_a_checkpoint_made_by_other_library_versions(interrupted, tokenizer, monkeypatch):
    real = ckpt.code_versions
    monkeypatch.setattr(ckpt, "code_versions", lambda: {**real(), "torch": "0.0.1"})
    with pytest.raises(FlearnError, match=r"other library versions \(torch: .* → 0\.0\.1\)"):
        run(tokenizer, CONFIGS["full"], checkpoint=Checkpointing(interrupted))


def _save_step_3(directory, value: float):
    return ckpt.save_checkpoint(
        directory,
        identity=ckpt.StageIdentity(config={}, data_hash="d", model_fingerprint="m"),
        position=ckpt.Position(step=3, losses=[3.0, 2.0, value]),
        params={"w": torch.full((2,), value)},
        optimizer=None,
        scheduler=None,
        rng=ckpt.capture_rng(),
    )


def test_a_failed_rename_of_a_same_step_checkpoint_keeps_the_old_one(tmp_path, monkeypatch):
    """Saving step 3 again (as after a resume) moves the old step-3 checkpoint aside, puts the new one
    in place, then deletes the old: a failure at that rename puts the old one back."""
    import errno
    import os

    directory = tmp_path / "ckpt"
    _save_step_3(directory, 1.0)
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name.startswith(".tmp-"):  # the new checkpoint going in place
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(FlearnError, match=r"no space left on device \(disk full\)"):
        _save_step_3(directory, 2.0)
    monkeypatch.setattr(os, "replace", real_replace)
    assert ckpt.checkpoint_dirs(directory) == [(3, False, directory / "step-00000003")]
    kept = ckpt.load_checkpoint(ckpt.latest_checkpoint(directory))
    assert torch.equal(kept.params["w"], torch.full((2,), 1.0)) and kept.position.losses == [3.0, 2.0, 1.0]
    assert sorted(p.name for p in directory.iterdir()) == ["step-00000003"]  # no temporary, no aside

    _save_step_3(directory, 2.0)  # now it works: the new one replaces it
    assert torch.equal(ckpt.load_checkpoint(directory / "step-00000003").params["w"], torch.full((2,), 2.0))
    assert sorted(p.name for p in directory.iterdir()) == ["step-00000003"]


def test_a_checkpoint_moved_aside_by_a_killed_replacement_still_counts(tmp_path):
    """Killed between moving the old checkpoint aside and renaming the new one in: the old one is still
    found (and resumed from); the next save puts its checkpoint in place, then removes the aside."""
    directory = tmp_path / "ckpt"
    _save_step_3(directory, 1.0)
    aside = directory / ".old-step-00000003"
    (directory / "step-00000003").rename(aside)
    assert ckpt.checkpoint_dirs(directory) == [(3, False, aside)]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(directory)).position.losses == [3.0, 2.0, 1.0]
    _save_step_3(directory, 2.0)
    assert sorted(p.name for p in directory.iterdir()) == ["step-00000003"]
    assert ckpt.checkpoint_dirs(directory) == [(3, False, directory / "step-00000003")]
    assert ckpt.load_checkpoint(directory / "step-00000003").position.losses == [3.0, 2.0, 2.0]
