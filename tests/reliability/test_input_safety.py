"""Input safety (issue 16, findings 3, 4, 9 and 10).

- λ has one meaning a user cannot get wrong: ``flearn update`` forgets with λ > 0 and refuses λ < 0 unless
  ``allow_negative_lambda`` says it is meant; λ = 0 and a λ given to a method without a forget stage are
  warned about; ``flearn vector apply`` says which way it goes (``--forget X``: θ − X·Δ, ``--add X``:
  θ + X·Δ, ``--lambda L``: θ + L·Δ), exactly one of them.
- ``--old FILE --new FILE`` takes split files (one target each), joined by id or by prompt, and names every
  record that has no partner; ``--dry-run`` reads and checks the data and plans from its real token lengths.
- An input longer than the model's context is named (file, record, field, tokens against the limit):
  ``data check --model`` warns, ``update`` (and its dry run) refuses unless ``--truncate``.
- The smaller ones: ``--no-eval`` output and model card, ``--no-vectors``, ``--trust-remote-code``, config
  errors from the Python API, resumed stages in ``run.json``, ``flearn --version``, config-relative paths,
  duplicate YAML keys, conflicting edits.

Every test drives the commands a user types (``flearning.cli.main``) or the Python API and asserts on values:
exit code 2, the file, record and field in the message, outputs absent or unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from reliability_helpers import FACTS, bench_args, update_args

import flearning
import flearning.recipes.stopping as stopping
from flearning.cli import main
from flearning.config import BenchConfig, UpdateConfig, load_config
from flearning.data.encoding import encode_pair
from flearning.errors import ConfigError, FlearnError
from flearning.recipes.work_dir import work_dir_for
from flearning.resources import config_path
from tiny import tiny_llama, tiny_tokenizer

LIMIT = 256  # max_position_embeddings of the tiny Llama (tests/tiny.py)
FILLER = "Long text " * 30  # 300 bytes: 300 tokens of the byte-level test tokenizer


def run(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def warnings_of(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# ---- finding 3: λ's sign ----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["option", "override", "yaml", "python"])
def test_update_refuses_a_negative_lambda(how, tiny_model_dir, facts, tmp_path, capsys):
    out = tmp_path / "out"
    before = tree_digest(tmp_path)
    if how == "python":
        with pytest.raises(ConfigError) as caught:
            flearning.update(model=str(tiny_model_dir), data=facts, lam=-0.7, out=out, progress=False)
        err = str(caught.value)
    else:
        extra = {"option": ["--lambda=-0.7"], "override": ["lambda=-0.7"]}.get(how, [])
        if how == "yaml":
            config = tmp_path / "run.yaml"
            config.write_text("lambda: -0.7\n")
            extra = ["--config", str(config)]
            before = tree_digest(tmp_path)
        code, _, err = run(update_args(tiny_model_dir, facts, out, "flearning-ft", *extra), capsys)
        assert code == 2
    assert "lambda" in err and "-0.7" in err
    assert "strengthen" in err and "allow_negative_lambda" in err  # says what it would do and how to mean it
    assert not out.exists() and not work_dir_for(out).exists()
    assert tree_digest(tmp_path) == before


def test_a_negative_lambda_runs_when_explicitly_allowed(tiny_model_dir, facts, tmp_path, capsys):
    out = tmp_path / "out"
    args = update_args(tiny_model_dir, facts, out, "flearning-ft", "--lambda=-0.7", "--allow-negative-lambda")
    code, _, err = run(args, capsys)
    assert code == 0, err
    saved = json.loads((out / "run.json").read_text())
    assert saved["lambda"] == -0.7 and saved["config"]["allow_negative_lambda"] is True


def test_lambda_zero_and_lambda_without_a_forget_stage_are_warned_about(
    tiny_model_dir, facts, tmp_path, capsys, caplog
):
    def dry(*extra: str) -> str:
        caplog.clear()
        code, _, err = run(
            ["update", "--model", tiny_model_dir, "--data", facts, "--dry-run", *extra], capsys
        )
        assert code == 0, err
        return warnings_of(caplog)

    assert "forgetting does nothing" in dry("--method", "flearning-ft", "--lambda", "0")
    for method in ("ft", "lora", "ft-c"):
        assert f"method {method} has no forget stage" in dry("--method", method, "--lambda", "0.5")
        assert "lambda" not in dry("--method", method)  # not given: nothing to warn about
    config = tmp_path / "ft.yaml"
    config.write_text("method: ft\nlambda: 0.7\n")
    assert "method ft has no forget stage" in dry("--config", config)
    quiet = dry("--method", "flearning-ft", "--lambda", "0.7")
    assert "lambda" not in quiet and "forget stage" not in quiet


@pytest.mark.parametrize("how", ["option", "override", "yaml", "grid", "python"])
def test_bench_refuses_a_negative_lambda_like_update(how, tiny_model_dir, facts, tmp_path, capsys):
    out = tmp_path / "bench"
    args = bench_args(tiny_model_dir, facts, out, "flearning-ft")
    at = args.index("--lambda")
    if how == "python":
        with pytest.raises(ValidationError) as caught:
            BenchConfig(model=str(tiny_model_dir), data={"toy": facts}, lambdas=[0.5, -0.5], out=out)
        err = str(caught.value)
    else:
        if how == "option":
            args[at + 1] = "-0.5"
        else:
            del args[at : at + 2]
            if how == "override":
                args.append("lambdas=[0.5,-0.5]")
            else:
                config = tmp_path / "bench.yaml"
                text = (
                    "lambdas: [0.5, -0.5]\n"
                    if how == "yaml"
                    else "lambdas: auto\nn_val: 2\nlambda_grid: [0.3, -0.5]\n"
                )
                config.write_text(text)
                args += ["--config", str(config)]
        before = tree_digest(tmp_path)
        code, _, err = run(args, capsys)
        assert code == 2, err
        assert tree_digest(tmp_path) == before
    flat = " ".join(err.split())
    field = "lambda_grid" if how == "grid" else "lambdas"
    assert field in flat
    assert "λ = -0.5 is negative: θ' = θ − λ·Δ_old would add 0.5·Δ_old and strengthen the old facts" in flat
    assert "allow_negative_lambda: true (--allow-negative-lambda)" in flat
    assert not out.exists()


def test_bench_takes_a_negative_lambda_when_explicitly_allowed(tiny_model_dir, facts):
    cfg = BenchConfig(
        data={"toy": facts}, lambdas=[-0.5], lambda_grid=[-1.0, 0.5], allow_negative_lambda=True
    )
    assert cfg.lambdas == [-0.5] and cfg.lambda_grid == [-1.0, 0.5]
    assert load_config(BenchConfig, None, [], {"lambdas": [-0.5], "allow_negative_lambda": True}).lambdas == [
        -0.5
    ]


@pytest.fixture
def vector_dir(tmp_path, tiny_model_dir, capsys):
    tuned = tiny_llama()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 1e-2)
    tuned_dir = tmp_path / "tuned"
    tuned.save_pretrained(tuned_dir)
    tiny_tokenizer().save_pretrained(tuned_dir)
    out = tmp_path / "vec"
    code, _, err = run(
        ["vector", "compute", "--base", tiny_model_dir, "--finetuned", tuned_dir, "--out", out], capsys
    )
    assert code == 0, err
    return out


@pytest.mark.parametrize(
    ("args", "sign"), [(["--forget", "0.7"], -1), (["--add", "0.7"], 1), (["--lambda=-0.7"], -1)]
)
def test_vector_apply_forget_and_add_say_which_way(args, sign, tmp_path, tiny_model_dir, vector_dir, capsys):
    from flearning.models import load_model
    from flearning.vectors import KnowledgeVector

    out = tmp_path / "applied"
    code, text, err = run(
        ["vector", "apply", "--model", tiny_model_dir, "--vector", vector_dir, *args, "--out", out], capsys
    )
    assert code == 0, err
    theta = dict(tiny_llama().named_parameters())
    vector = KnowledgeVector.load(vector_dir)
    applied, _ = load_model(out)
    for name, p in applied.named_parameters():
        expected = theta[name].detach() + sign * 0.7 * vector[name] if name in vector else theta[name]
        torch.testing.assert_close(p, expected, atol=1e-6, rtol=0, msg=name)
    assert ("θ − 0.7·Δ" if sign < 0 else "θ + 0.7·Δ") in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "exactly one of --forget, --add or --lambda"),
        (["--forget", "0.7", "--add", "0.7"], "exactly one of --forget, --add or --lambda"),
        (["--forget", "0.7", "--lambda", "-0.7"], "exactly one of --forget, --add or --lambda"),
        (["--forget=-0.7"], "--forget takes how much to forget (> 0)"),
        (["--add=-0.7"], "--add takes how much to add (> 0)"),
    ],
)
def test_vector_apply_refuses_ambiguous_amounts(args, message, tmp_path, tiny_model_dir, vector_dir, capsys):
    out = tmp_path / "applied"
    before = tree_digest(tmp_path)
    code, _, err = run(
        ["vector", "apply", "--model", tiny_model_dir, "--vector", vector_dir, *args, "--out", out], capsys
    )
    assert code == 2
    assert message in err
    assert not out.exists() and tree_digest(tmp_path) == before


# ---- finding 4: split files, --dry-run reads the data ---------------------------------------------------


def split_files(tmp_path: Path, *, ids: bool = True) -> tuple[Path, Path]:
    """The toy facts split in two: the old file with prompt and target_old, the new one (in another order)
    with prompt, target_new and the evaluation probes."""
    old = [{"id": f["id"], "prompt": f["prompt"], "target_old": f["target_old"]} for f in FACTS]
    new = [{k: v for k, v in f.items() if k != "target_old"} for f in reversed(FACTS)]
    if not ids:
        old = [{k: v for k, v in r.items() if k != "id"} for r in old]
        new = [{k: v for k, v in r.items() if k != "id"} for r in new]
    return write_jsonl(tmp_path / "old.jsonl", old), write_jsonl(tmp_path / "new.jsonl", new)


@pytest.mark.parametrize("ids", [True, False])
def test_split_old_and_new_files_are_joined(ids, tmp_path):
    from flearning.data import load_update_data

    old, new = split_files(tmp_path, ids=ids)
    data = load_update_data(old, new)
    assert data.joined_by == ("id" if ids else "prompt")
    by_prompt = {f["prompt"]: f for f in FACTS}
    assert len(data.records) == len(FACTS)
    for record in data.records:
        fact = by_prompt[record.prompt]
        assert (record.target_old, record.target_new) == (fact["target_old"], fact["target_new"])
        assert record.rephrase_prompts == fact["rephrase_prompts"]  # the probes come from the new file
    # the order of the new file (the facts learned and evaluated)
    assert [r.prompt for r in data.records] == [f["prompt"] for f in reversed(FACTS)]


def test_update_takes_split_files(tiny_model_dir, tmp_path, capsys):
    old, new = split_files(tmp_path)
    out = tmp_path / "out"
    args = update_args(tiny_model_dir, old, out)
    at = args.index("--data")
    args[at : at + 2] = ["--old", str(old), "--new", str(new)]
    code, _, err = run(args, capsys)
    assert code == 0, err
    saved = json.loads((out / "run.json").read_text())
    assert saved["data"]["old"]["path"] == str(old) and saved["data"]["new"]["path"] == str(new)
    assert saved["data"]["joined_by"] == "id" and saved["data"]["new"]["records"] == len(FACTS)


def test_unmatched_split_records_are_named(tiny_model_dir, tmp_path, capsys):
    old, new = split_files(tmp_path)
    lines = old.read_text().splitlines()
    lines[1] = json.dumps({"id": "gone", "prompt": "Nobody asks", "target_old": "x"})
    old.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    for extra in ([], ["--dry-run"]):
        code, _, err = run(
            ["update", "--model", tiny_model_dir, "--old", old, "--new", new, "--out", out, *extra], capsys
        )
        assert code == 2
        assert f"{old}:line 2:id: no record of {new} has id 'gone'" in err
        assert f"{new}:line 11:id: no record of {old} has id 'f1'" in err
        assert not out.exists()


def test_split_records_need_their_own_target_and_unique_keys(tmp_path):
    from flearning.data import load_update_data

    old, new = split_files(tmp_path, ids=False)
    lines = new.read_text().splitlines()
    lines[0] = json.dumps({"prompt": FACTS[-1]["prompt"]})  # no target_new
    new.write_text("\n".join(lines) + "\n")
    with pytest.raises(FlearnError, match=f"{new}:line 1:target_new: missing"):
        load_update_data(old, new)
    lines[0] = json.dumps({"prompt": FACTS[0]["prompt"], "target_new": "again"})  # a prompt twice
    new.write_text("\n".join(lines) + "\n")
    with pytest.raises(FlearnError) as caught:
        load_update_data(old, new)
    assert f"{new}:line 12:prompt: the same prompt as line 1: give both files ids to join them" in str(
        caught.value
    )
    assert f"{old}:line 12:prompt: no record of {new} has this prompt" in str(caught.value)


def test_dry_run_checks_the_data(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a is", "target_old": "b"}\n')
    code, _, err = run(["update", "--model", tiny_model_dir, "--data", bad, "--dry-run"], capsys)
    assert code == 2
    assert f"{bad}:line 1:target_new: missing" in err


def test_dry_run_plans_from_the_datas_real_token_lengths(tiny_model_dir, tmp_path, capsys):
    facts = [dict(f) for f in FACTS]
    facts[4]["prompt"] = "A longer prompt, so that the longest text is this one: " + facts[4]["prompt"]
    data = write_jsonl(tmp_path / "facts.jsonl", facts)
    tok = tiny_tokenizer()
    longest = max(
        len(encode_pair(tok, f["prompt"], f[t], add_eos=True).input_ids)
        for f in facts
        for t in ("target_old", "target_new")
    )
    assert longest > 32
    code, text, err = run(["update", "--model", tiny_model_dir, "--data", data, "--dry-run"], capsys)
    assert code == 0, err
    assert f"sequences of {longest} tokens (the longest training text of the data" in " ".join(text.split())


# ---- finding 9: inputs longer than the model's context ----------------------------------------------------


def long_facts(tmp_path: Path, field: str = "prompt") -> Path:
    """The toy facts and, on line 13, a record whose ``field`` does not fit the tiny model's 256 tokens."""
    record = {"id": "long", "prompt": "The code of item 99 is", "target_old": "old9", "target_new": "new9"}
    if field == "prompt":
        record["prompt"] = FILLER + record["prompt"]
    elif field == "rephrase_prompts":
        record["rephrase_prompts"] = [FILLER + "Item 99 has the code"]
    elif field == "locality":
        record["locality"] = [{"prompt": FILLER + "Colour 99 is", "answer": "blue"}]
    return write_jsonl(tmp_path / "long.jsonl", [*FACTS, record])


def test_data_check_warns_with_the_models_limit(tiny_model_dir, tmp_path, capsys):
    data = long_facts(tmp_path)
    tokens = len(FILLER + "The code of item 99 is") + 1 + len("new9") + 1  # bytes, the space, EOS
    code, text, _ = run(["data", "check", data, "--model", tiny_model_dir], capsys)
    assert code == 0
    flat = " ".join(text.split())
    assert f"{data}:line 13:prompt: {tokens} tokens" in flat
    assert f"the model takes at most {LIMIT} (max_position_embeddings)" in flat
    code, text, _ = run(["data", "check", data, "--model", tiny_model_dir, "--json"], capsys)
    summary = json.loads(text)
    assert summary["context"] == {
        "limit": LIMIT,
        "too_long": [{"where": f"{data}:line 13", "id": "long", "field": "prompt", "tokens": tokens}],
    }
    code, text, _ = run(
        ["data", "check", write_jsonl(tmp_path / "ok.jsonl", FACTS), "--model", tiny_model_dir], capsys
    )
    assert code == 0 and "tokens but the model takes" not in text


@pytest.mark.parametrize(
    ("field", "named"),
    [("prompt", "prompt"), ("rephrase_prompts", "rephrase_prompts[0]"), ("locality", "locality[0].prompt")],
)
def test_update_refuses_inputs_longer_than_the_context(field, named, tiny_model_dir, tmp_path, capsys):
    data = long_facts(tmp_path, field)
    out = tmp_path / "out"
    before = tree_digest(tmp_path)
    for extra in ([], ["--dry-run"]):
        code, _, err = run(
            update_args(tiny_model_dir, data, out, "flearning-ft", *extra, evaluate=True), capsys
        )
        assert code == 2
        flat = " ".join(err.split())
        assert f"{data}:line 13:{named}: " in flat and f"the model takes at most {LIMIT}" in flat
        assert "--truncate" in flat
        assert not out.exists() and not work_dir_for(out).exists()
        assert tree_digest(tmp_path) == before


def test_truncate_cuts_long_prompts_from_the_left_and_says_so(tiny_model_dir, tmp_path, capsys, caplog):
    from flearning.data import load_update_data
    from flearning.data.context import fit_to_context

    data = long_facts(tmp_path)
    records = load_update_data(data, data).records
    tok = tiny_tokenizer()
    loaded = load_update_data(data, data)
    fitted, cut = fit_to_context(loaded.records, tok, LIMIT, locations=loaded.locations)
    assert [(c.id, c.field) for c in cut] == [("long", "prompt")]
    long = next(r for r in fitted if r.id == "long")
    original = next(r for r in records if r.id == "long")
    assert original.prompt.endswith(long.prompt) and long.prompt.endswith("The code of item 99 is")
    assert len(encode_pair(tok, long.prompt, long.target_new, add_eos=True).input_ids) <= LIMIT
    assert [r for r in fitted if r.id != "long"] == [r for r in records if r.id != "long"]

    out = tmp_path / "out"
    code, _, err = run(update_args(tiny_model_dir, data, out, "flearning-ft", "--truncate"), capsys)
    assert code == 0, err
    assert f"{data}:line 13:prompt" in warnings_of(caplog)
    saved = json.loads((out / "run.json").read_text())
    assert saved["data"]["truncated"] == [
        {"where": f"{data}:line 13", "id": "long", "field": "prompt", "tokens": cut[0].tokens}
    ]


def test_an_answer_alone_longer_than_the_context_cannot_be_truncated(tiny_model_dir, tmp_path, capsys):
    record = {"id": "huge", "prompt": "The code is", "target_old": "a", "target_new": FILLER}
    data = write_jsonl(tmp_path / "huge.jsonl", [*FACTS, record])
    code, _, err = run(update_args(tiny_model_dir, data, tmp_path / "out", "ft", "--truncate"), capsys)
    assert code == 2
    assert f"{data}:line 13:target_new: " in " ".join(err.split())


def test_eval_refuses_inputs_longer_than_the_context(tiny_model_dir, tmp_path, capsys):
    data = long_facts(tmp_path)
    out = tmp_path / "report"
    before = tree_digest(tmp_path)
    code, _, err = run(
        ["eval", "--model", tiny_model_dir, "--data", data, "--out", out, "--no-progress"], capsys
    )
    assert code == 2
    flat = " ".join(err.split())
    assert f"{data}:line 13:prompt: " in flat and f"the model takes at most {LIMIT}" in flat
    assert "--truncate" in flat
    assert not out.exists()
    assert tree_digest(tmp_path) == before


def test_eval_truncate_cuts_long_prompts_and_says_so(tiny_model_dir, tmp_path, capsys, caplog):
    data = long_facts(tmp_path)
    out = tmp_path / "report"
    args = ["eval", "--model", tiny_model_dir, "--data", data, "--out", out, "--no-generation"]
    code, _, err = run([*args, "--no-progress", "--truncate"], capsys)
    assert code == 0, err
    assert f"{data}:line 13:prompt: " in warnings_of(caplog)
    assert "its prompt was cut from the left to fit (--truncate)" in warnings_of(caplog)
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == len(FACTS) + 1
    tokens = len(FILLER + "The code of item 99 is") + 1 + len("new9") + 1  # bytes, the space, EOS
    (meta,) = json.loads((out / "summary.json").read_text())["methods"]["tiny-model"]["meta"]
    assert meta["truncated"] == [
        {"where": f"{data}:line 13", "id": "long", "field": "prompt", "tokens": tokens}
    ]


# ---- finding 10: the smaller ones ---------------------------------------------------------------------


def test_no_eval_prints_no_empty_table_and_the_card_links_no_missing_report(
    tiny_model_dir, facts, tmp_path, capsys
):
    out = tmp_path / "out"
    code, text, err = run(update_args(tiny_model_dir, facts, out, "flearning-ft"), capsys)
    assert code == 0, err
    assert "evaluation was skipped (--no-eval)" in text
    assert "before" not in text and "┃" not in text and "–" not in text  # no table (of dashes)
    card = (out / "README.md").read_text()
    assert not (out / "report").exists()
    assert "report/summary.md" not in card and "evaluation was skipped" in card


def test_the_card_links_the_report_when_there_is_one(tiny_model_dir, facts, tmp_path, capsys):
    out = tmp_path / "out"
    code, text, err = run(update_args(tiny_model_dir, facts, out, "ft", evaluate=True), capsys)
    assert code == 0, err
    assert (
        "report/summary.md" in (out / "README.md").read_text() and (out / "report" / "summary.md").is_file()
    )


@pytest.mark.parametrize("flag", ["--no-vectors", "save_vectors=false"])
def test_no_vectors_writes_the_model_alone(flag, tiny_model_dir, facts, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(update_args(tiny_model_dir, facts, out, "flearning-ft", flag), capsys)
    assert code == 0, err
    assert (out / "model.safetensors").is_file()
    assert not (out / "knowledge_vector").exists() and not (out / "update_vector").exists()
    card = (out / "README.md").read_text()
    assert "update_vector/" not in card and "knowledge_vector/" not in card
    assert json.loads((out / "run.json").read_text())["config"]["save_vectors"] is False


def test_update_takes_trust_remote_code(tiny_model_dir, facts, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(update_args(tiny_model_dir, facts, out, "ft", "--trust-remote-code"), capsys)
    assert code == 0, err
    assert json.loads((out / "run.json").read_text())["config"]["trust_remote_code"] is True


def test_the_python_api_raises_config_errors_listing_every_problem(tiny_model_dir, facts, tmp_path):
    with pytest.raises(ConfigError) as caught:
        flearning.update(
            model=str(tiny_model_dir), data=facts, lam="lots", learn={"lr": -1}, bogus=1, out=tmp_path / "o"
        )
    message = str(caught.value)
    assert message.startswith("invalid configuration: 3 problems")
    assert "update():lam:" in message and "update():learn.lr:" in message and "update():bogus:" in message
    assert not (tmp_path / "o").exists()


def test_run_json_says_which_stages_were_resumed(tiny_model_dir, facts, tmp_path, capsys, monkeypatch):
    real = stopping.train
    stop = {"at": 3}

    def interrupted(model, tokenizer, pairs, cfg, *, description, on_step=None, **kwargs):
        given = on_step

        def on_step(step, loss):
            if given is not None:
                given(step, loss)
            if description.startswith("learn") and step == stop.get("at"):
                stop.clear()
                raise KeyboardInterrupt

        return real(model, tokenizer, pairs, cfg, description=description, on_step=on_step, **kwargs)

    monkeypatch.setattr(stopping, "train", interrupted)  # the learning stage (train_until)
    out = tmp_path / "out"
    args = update_args(tiny_model_dir, facts, out, "flearning-ft")
    assert run(args, capsys)[0] == 130
    code, text, err = run(args, capsys)
    assert code == 0, err
    resumed = json.loads((out / "run.json").read_text())["resumed"]
    assert set(resumed) == {"forget", "learn"}
    assert "finished by an earlier process" in resumed["forget"]
    assert "optimizer step 3" in resumed["learn"]
    assert (
        "timings_seconds count this process only"
        in json.loads((out / "run.json").read_text())["timings_note"]
    )

    fresh = tmp_path / "fresh"
    assert run(update_args(tiny_model_dir, facts, fresh, "flearning-ft"), capsys)[0] == 0
    saved = json.loads((fresh / "run.json").read_text())
    assert saved["resumed"] == {} and "timings_note" not in saved


def test_flearn_version(capsys):
    code, text, _ = run(["--version"], capsys)
    assert code == 0 and text == f"flearn {flearning.__version__}\n"


def test_relative_paths_in_a_config_file_resolve_against_its_directory(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    conf = tmp_path / "conf"
    conf.mkdir()
    write_jsonl(conf / "facts.jsonl", FACTS)
    (conf / "probes.jsonl").write_text('{"prompt": "Sky is", "answer": "blue"}\n')
    (conf / "run.yaml").write_text(
        "data: facts.jsonl\nout: runs/x\nlearn:\n  max_locality_drop: 5\n  locality_probes: probes.jsonl\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(UpdateConfig, Path("../conf/run.yaml"), [])
    assert cfg.data == conf / "facts.jsonl" and cfg.data.is_file()
    assert cfg.out == conf / "runs" / "x"
    assert cfg.learn.locality_probes == conf / "probes.jsonl"
    # options and key=value overrides are the command line's: relative to the current directory
    cfg = load_config(UpdateConfig, conf / "run.yaml", ["out=mine"], {"data": Path("given.jsonl")})
    assert cfg.out == Path("mine") and cfg.data == Path("given.jsonl")
    # the bench's datasets too
    (conf / "bench.yaml").write_text("data:\n  toy: facts.jsonl\n")
    assert load_config(BenchConfig, conf / "bench.yaml", []).data == {"toy": conf / "facts.jsonl"}
    # a shipped config is a template: its out is where the command runs
    assert load_config(UpdateConfig, config_path("demo"), []).out == Path("runs/demo")
    # end to end: the dry run finds the config's data from another directory
    code, _, err = run(
        ["update", "--config", "../conf/run.yaml", f"model={tiny_model_dir}", "--dry-run"], capsys
    )
    assert code == 0, err


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("lambda: 0.5\nmethod: ft\nlambda: 0.7\n", ":line 3:lambda: duplicate key (first given at line 1)"),
        (
            "learn:\n  lr: 1.0e-3\n  epochs: 2\n  lr: 2.0e-3\n",
            ":line 4:learn.lr: duplicate key (first given at line 2)",
        ),
    ],
)
def test_duplicate_yaml_keys_are_refused(text, problem, tmp_path, tiny_model_dir, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(UpdateConfig, config, [])
    assert f"{config}{problem}" in str(caught.value)
    code, _, err = run(["update", "--config", config, "--model", tiny_model_dir, "--dry-run"], capsys)
    assert code == 2 and f"{config}{problem}" in err


def test_conflicting_edits_are_noted(tiny_model_dir, tmp_path, capsys, caplog):
    facts = [dict(f) for f in FACTS]
    facts[7]["prompt"] = facts[2]["prompt"]  # same prompt, another new target (new3 vs new2)
    data = write_jsonl(tmp_path / "facts.jsonl", facts)
    expected = f"conflicting edits: the same prompt '{facts[2]['prompt']}' gets target_new 'new2' ({data}:line 3, id f2) and 'new3' ({data}:line 8, id f7)"
    code, text, _ = run(["data", "check", data, "--model", "none"], capsys)
    assert code == 0 and expected in " ".join(text.split())
    caplog.clear()
    code, _, err = run(["update", "--model", tiny_model_dir, "--data", data, "--dry-run"], capsys)
    assert code == 0, err
    assert expected in warnings_of(caplog)
