"""The updated model's README.md is a Hugging Face model card: metadata the Hub reads back
(``huggingface_hub.ModelCard.load``) and a body with the method, λ, the data, the metrics and how to load
the model and redo the update."""

from __future__ import annotations

import copy
import json
import shlex

import pytest
from huggingface_hub import ModelCard

from flearning.config import UpdateConfig, parse_overrides
from flearning.recipes.run_record import base_model, model_card, update_command
from flearning.recipes.update import update
from flearning.resources import sample_path
from tiny import toy_facts

FAST = {"learn": {"lr": 1e-2, "epochs": 2}, "forget": {"lr": 1e-2, "epochs": 1}, "eval_batch_size": 8}


@pytest.fixture(scope="module")
def updated(tmp_path_factory):
    """One tiny flearning-ft update (its README.md and run.json)."""
    from tiny import tiny_llama, tiny_tokenizer

    root = tmp_path_factory.mktemp("card")
    model_dir = root / "tiny-model"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    facts = root / "facts.jsonl"
    facts.write_text("".join(json.dumps(f) + "\n" for f in toy_facts(6)))
    out = root / "out"
    cfg = UpdateConfig(model=str(model_dir), data=facts, method="flearning-ft", lam=0.5, out=out, **FAST)
    update(cfg, progress=False)
    return out, json.loads((out / "run.json").read_text())


def test_the_written_card_is_a_hub_model_card_with_the_runs_numbers(updated):
    out, run = updated
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.base_model is None  # a local model: no hub id to name
    assert card.data.license is None and card.data.datasets is None
    assert card.data.tags == ["f-learning", "knowledge-editing", "model-editing", "flearning-ft"]
    assert set(card.data.to_dict()) == {"library_name", "pipeline_tag", "tags"}  # no custom fields
    body = card.text
    assert "`flearning-ft`, λ = 0.5" in body and "**λ**: 0.5" in body
    for key, label in [("reliability", "Reliability"), ("locality", "Locality"), ("efficacy", "Efficacy")]:
        before, after = run["metrics_before"][key]["mean"], run["metrics_after"][key]["mean"]
        row = f"| {label} | {before:.1f} | {after:.1f} | {after - before:+.1f} |"
        assert row in body, row
    assert run["data"]["new"]["sha256"][:12] in body and "6 records" in body
    assert "Learning stage" not in body  # a fixed schedule: nothing checked per epoch
    assert f'path = "{out}"' in body and "AutoModelForCausalLM.from_pretrained(path)" in body
    assert f"flearn generate --model {out}" in body
    assert update_command(run["config"]) in body


def test_the_command_in_the_card_gives_back_the_runs_settings(updated):
    _, run = updated
    command = update_command(run["config"])
    words = shlex.split(command)
    assert words[:2] == ["flearn", "update"]
    tree, problems = parse_overrides(words[2:])
    assert not problems
    rebuilt = UpdateConfig(**tree).model_dump(mode="json", by_alias=True)
    expected = {**run["config"], "overwrite": False}
    assert rebuilt == expected
    assert (
        words[2].startswith("model=") and "lambda=0.5" in words and "seed=0" not in words
    )  # defaults left out


def summary_with(run: dict, source: str, path: str | None = None, data_path: str | None = None) -> dict:
    summary = copy.deepcopy(run)
    summary["model"].update(source=source, path=path or source)
    if data_path is not None:
        for part in ("old", "new"):
            summary["data"][part]["path"] = data_path
    return summary


def test_base_model_and_licence_of_the_embedded_model_and_of_hub_ids(updated, tmp_path):
    _, run = updated
    card = ModelCard(model_card(summary_with(run, "smollm2-135m", "/cache/flearning/models/smollm2-135m")))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.license == "apache-2.0"
    assert "the embedded SmolLM2-135M-Instruct" in card.text
    for source in ("hf:org/some-model", "org/some-model"):
        card = ModelCard(model_card(summary_with(run, source)))
        assert card.data.base_model == "org/some-model" and card.data.license is None
    snapshot = "/home/u/.cache/huggingface/hub/models--org--some-model/snapshots/abc123"
    assert base_model(summary_with(run, snapshot))[0] == "org/some-model"
    local = tmp_path / "org"
    (local / "some-model").mkdir(parents=True)  # a local directory is never taken for a hub id
    assert base_model(summary_with(run, str(local / "some-model")))[0] is None


def test_datasets_when_the_facts_came_from_the_hub(updated):
    _, run = updated
    card = ModelCard(model_card(summary_with(run, "smollm2-135m", data_path="hf:someone/counterfact-edits")))
    assert card.data.datasets == ["someone/counterfact-edits"]
    summary = summary_with(run, "smollm2-135m")
    for part in ("old", "new"):
        summary["data"][part]["format"] = "counterfact-rome"
    assert "counterfact" in ModelCard(model_card(summary)).data.tags


def test_the_learning_stage_line(updated):
    _, run = updated
    summary = copy.deepcopy(run)
    history = [{"epoch": 1, "accuracy": 0.5}, {"epoch": 2, "accuracy": 0.975}]
    summary["learn_schedule"].update(history=history, epochs_trained=2, kept_epoch=2, why="reached 95")
    text = ModelCard(model_card(summary)).text
    assert (
        "Learning stage: 2 epochs, kept epoch 2; it reached 95. Accuracy on the new facts after each epoch (×100): 50, 98."
        in text
    )


def test_a_shipped_sample_is_named_sample_name_and_a_tables_split_is_kept(updated):
    _, run = updated
    summary = summary_with(run, "smollm2-135m", data_path=str(sample_path("facts.jsonl")))
    summary["config"].update(data=str(sample_path("facts.jsonl")), split="validation")
    text = ModelCard(model_card(summary)).text
    assert "`sample:facts.jsonl` (6 records" in text
    assert "--data sample:facts.jsonl --split validation --limit 5" in text
    assert "data=sample:facts.jsonl" in text and "split=validation" in text


def test_unmeasured_metrics_are_left_out_of_the_table(updated):
    _, run = updated
    assert run["metrics_after"]["fluency"]["mean"] is None  # not asked for
    assert "| Fluency |" not in ModelCard(model_card(run)).text


def test_without_evaluation_the_card_says_so(updated):
    _, run = updated
    summary = {**run, "metrics_before": None, "metrics_after": None}
    card = ModelCard(model_card(summary))
    assert "evaluation was skipped" in card.text and "| metric" not in card.text
