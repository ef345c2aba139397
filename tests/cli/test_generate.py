"""``flearn generate`` on tiny random models saved in tmp_path: the continuations are a plain greedy
``model.generate`` decode, --reference puts the model before beside it, --data takes edit and rephrase
prompts, and bad input is exit 2 before any weights are loaded."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from flearning.cli import app, main
from flearning.cli.generate import _first_line
from tiny import tiny_llama, toy_facts

PROMPTS = ["The code of item 1 is", "Colour 2 is", "Zebra"]


def run(*args) -> str:
    # wide enough that no title or cell wraps
    result = CliRunner().invoke(app, ["generate", *(str(a) for a in args)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def hand_greedy(model_dir, prompt: str, max_new_tokens: int) -> str:
    """What plain transformers says: one prompt, greedy, no batching, new tokens decoded."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.fixture
def other_model_dir(tmp_path, tokenizer):
    """A second tiny model, "the model before" in the --reference tests: another seed, and untied (a tiny
    tied model mostly repeats the prompt's last token, whatever its seed)."""
    path = tmp_path / "other-model"
    tiny_llama(seed=1, tie=False).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def facts_file(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in toy_facts(4)))
    return path


def test_continuations_equal_a_hand_greedy_decode(tiny_model_dir):
    out = json.loads(
        run("--model", tiny_model_dir, *PROMPTS, "--max-new-tokens", 7, "--batch-size", 2, "--json")
    )
    assert out["model"] == str(tiny_model_dir) and out["reference"] is None and out["max_new_tokens"] == 7
    assert [r["prompt"] for r in out["results"]] == PROMPTS
    for result in out["results"]:
        assert "reference_generated" not in result and result["id"] is None
        assert result["generated"] == hand_greedy(tiny_model_dir, result["prompt"], 7)


def test_the_table_shows_prompts_and_continuations(tiny_model_dir):
    text = run("--model", tiny_model_dir, "Colour 2 is", "-t", 3)
    assert "Greedy continuations (3 new tokens at most)" in text
    assert "prompt" in text and "continuation" in text and "Colour 2 is" in text
    assert hand_greedy(tiny_model_dir, "Colour 2 is", 3).strip() in text
    assert "before" not in text


def test_reference_is_a_before_column_beside_after(tiny_model_dir, other_model_dir):
    args = ("--model", tiny_model_dir, "--reference", other_model_dir, *PROMPTS, "-t", 6)
    out = json.loads(run(*args, "--json"))
    for result in out["results"]:
        assert result["generated"] == hand_greedy(tiny_model_dir, result["prompt"], 6)
        assert result["reference_generated"] == hand_greedy(other_model_dir, result["prompt"], 6)
    # two different models: different continuations (of at least one prompt)
    assert any(r["generated"] != r["reference_generated"] for r in out["results"])
    table = run(*args)
    header = next(line for line in table.splitlines() if "prompt" in line)
    assert "before" in header and "after" in header and header.index("before") < header.index("after")
    assert f"before: {other_model_dir}, after: {tiny_model_dir}" in table


def test_data_gives_edit_and_rephrase_prompts(tiny_model_dir, facts_file):
    facts = toy_facts(4)
    out = json.loads(run("--model", tiny_model_dir, "--data", facts_file, "--limit", 2, "-t", 2, "--json"))
    assert [(r["id"], r["kind"], r["prompt"]) for r in out["results"]] == [
        ("f0", "edit", facts[0]["prompt"]),
        ("f0", "rephrase", facts[0]["rephrase_prompts"][0]),
        ("f1", "edit", facts[1]["prompt"]),
        ("f1", "rephrase", facts[1]["rephrase_prompts"][0]),
    ]
    assert [r["target_new"] for r in out["results"]] == ["new0", "new0", "new1", "new1"]
    assert [r["target_old"] for r in out["results"]] == ["old0", "old0", "old1", "old1"]
    # prompts given as arguments come first; --no-rephrase keeps the edit prompts only
    out = json.loads(
        run("--model", tiny_model_dir, "Zebra", "--data", facts_file, "--no-rephrase", "-t", 2, "--json")
    )
    assert [r["prompt"] for r in out["results"]] == ["Zebra"] + [f["prompt"] for f in facts]
    table = run("--model", tiny_model_dir, "--data", facts_file, "-n", 1, "-t", 2)
    header = next(line for line in table.splitlines() if "prompt" in line)
    assert "old answer" in header and "new answer" in header and "continuation" in header
    assert "new0" in table and "old0" in table and facts[0]["rephrase_prompts"][0] in table


def test_data_takes_a_shipped_sample(tiny_model_dir):
    out = json.loads(
        run("--model", tiny_model_dir, "--data", "sample:facts.jsonl", "-n", 1, "-t", 1, "--json")
    )
    assert (
        out["results"][0]["id"] == "uk-prime-minister" and out["results"][0]["target_new"] == "Keir Starmer"
    )


def test_stop_at_newline(tiny_model_dir):
    out = json.loads(run("--model", tiny_model_dir, *PROMPTS, "-t", 12, "--stop-at-newline", "--json"))
    for result in out["results"]:
        assert result["generated"] == _first_line(hand_greedy(tiny_model_dir, result["prompt"], 12))
    assert _first_line(" Paris.\nThe capital") == " Paris."
    assert _first_line("\n\nParis\n") == "\n\nParis"
    assert _first_line("no break") == "no break"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "{tmp}/no-such-model", "Hello"], "no such model directory"),
        (["--model", "{model}"], "no prompts"),
        (["--model", "{model}", "Hello", "  "], "empty prompt (prompt 2)"),
        (["--model", "{model}", "Hello", "--limit", "2"], "--limit takes the first N records of --data"),
        (["--model", "{model}", "Hello", "--split", "train"], "describe --data"),
        (["--model", "{model}", "--data", "{tmp}/missing.jsonl"], "missing.jsonl"),
        (["--model", "{model}", "--reference", "{tmp}/no-such-before", "Hello"], "no-such-before"),
        (["--model", "{model}", "x" * 300], "but the model takes at most 256"),
    ],
)
def test_bad_input_is_exit_2(tmp_path, tiny_model_dir, capsys, monkeypatch, args, message):
    loaded = []
    if "at most" not in message:  # refused before any weights are loaded
        import flearning.models

        monkeypatch.setattr(flearning.models, "load_model", lambda *a, **k: loaded.append(a))
    argv = [a.format(tmp=tmp_path, model=tiny_model_dir) for a in args]
    assert main(["generate", *argv]) == 2
    assert message in capsys.readouterr().err
    assert loaded == []


def test_alpaca_template_continues_the_dressed_prompt(tiny_model_dir):
    """--template alpaca continues the prompt as training and evaluation dress it (issue #11)."""
    from flearning.data.templates import ALPACA_NO_INPUT

    out = json.loads(run("--model", tiny_model_dir, "Colour 2 is", "-t", 4, "--template", "alpaca", "--json"))
    dressed = ALPACA_NO_INPUT.format(instruction="Colour 2 is")
    assert out["results"][0]["generated"] == hand_greedy(tiny_model_dir, dressed, 4)


def test_chat_template_without_one_is_refused(tiny_model_dir, capsys):
    assert main(["generate", "--model", str(tiny_model_dir), "Colour 2 is", "--template", "chat"]) == 2
    assert "has no chat template" in capsys.readouterr().err
