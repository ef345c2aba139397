"""ROME, MEMIT, AlphaEdit and their F-Learning variants as methods (issue #12), on a tiny random Llama:
``flearn update`` writes θ + ΔW of the editor itself, flearning-memit forgets then edits, the settings and
the facts are checked before any work, the bench reports the editors, and ΔW is a knowledge vector."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from config_checks import lax_values_refused
from flearning.config import BenchConfig, UpdateConfig, load_config, stage_plan
from flearning.config.edit import EditSettings, ValueOverrides
from flearning.errors import ConfigError, FlearnError, InputError
from flearning.methods import FINE_TUNING, METHODS
from flearning.recipes.update import update
from tiny import tiny_llama, tiny_tokenizer

EDITORS = ["rome", "memit", "alphaedit", "flearning-memit", "flearning-alphaedit"]
# small and fast on the 3-layer model: C from 2,000 tokens, 5 steps of the value optimisation
EDIT = {"covariance_tokens": 2000, "nullspace_threshold": 1.0, "values": {"steps": 5}}
FAST = {
    "forget": {"lr": 1e-2, "epochs": 1},
    "eval_batch_size": 8,
    "perplexity": None,
}


def facts(n: int = 6, subject: bool = True) -> list[dict]:
    out = []
    for i in range(n):
        fact = {
            "id": f"f{i}",
            "prompt": f"The code of item{i} is",
            "target_old": f"old{i % 3}",
            "target_new": f"new{i % 4}",
            "rephrase_prompts": [f"Item{i} has the code"],
            "locality": [{"prompt": f"Colour {i} is", "answer": "blue"}],
        }
        if subject:
            fact["subject"] = f"item{i}"
        out.append(fact)
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model_dir(tmp_path):
    """A 3-layer tiny Llama (the editors' layers 0-2)."""
    path = tmp_path / "tiny3"
    tiny_llama(layers=3).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def facts_file(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in facts()))
    return path


def _config(model_dir, facts_file, method, out, layers, **extra) -> UpdateConfig:
    return UpdateConfig(
        model=str(model_dir),
        data=facts_file,
        method=method,
        out=out,
        edit={**EDIT, "layers": layers},
        **{**FAST, **extra},
    )


def _edited_directly(model, tokenizer, records, plan):
    """ΔW of the editor called directly, with the settings the update used."""
    from flearning.editing import ValueSettings, alphaedit_edit, memit_edit, rome_edits
    from flearning.recipes.edit import covariance_settings

    covariance = covariance_settings(plan, model)
    values = ValueSettings(**plan.values)
    if plan.editor == "rome":
        return rome_edits(model, tokenizer, records, plan.layers[0], covariance=covariance, values=values)[0]
    if plan.editor == "memit":
        return memit_edit(
            model,
            tokenizer,
            records,
            list(plan.layers),
            mom2_update_weight=plan.mom2_update_weight,
            covariance=covariance,
            values=values,
        ).deltas
    return alphaedit_edit(
        model,
        tokenizer,
        records,
        list(plan.layers),
        nullspace_threshold=plan.nullspace_threshold,
        l2=plan.l2,
        covariance=covariance,
        values=values,
    ).deltas


def _assert_same_weights(model, expected, atol=1e-6):
    for (name, a), b in zip(model.named_parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize(("method", "layers"), [("rome", [1]), ("memit", [0, 2]), ("alphaedit", [1, 2])])
def test_update_writes_theta_plus_the_editors_delta(method, layers, model_dir, facts_file, tmp_path):
    from flearning.data import load_dataset
    from flearning.editing import apply_deltas
    from flearning.models import load_model
    from flearning.vectors import KnowledgeVector

    out = tmp_path / f"out-{method}"
    cfg = _config(model_dir, facts_file, method, out, layers)
    result = update(cfg, progress=False)
    theta, tokenizer = load_model(model_dir)
    records = load_dataset(facts_file).records
    deltas = _edited_directly(theta, tokenizer, records, stage_plan(cfg).edit)
    assert set(deltas) == {f"model.layers.{i}.mlp.down_proj.weight" for i in layers}
    apply_deltas(theta, deltas)
    _assert_same_weights(AutoModelForCausalLM.from_pretrained(out), theta)

    run = json.loads((out / "run.json").read_text())
    assert run["method"] == method and run["lambda"] is None
    assert run["stages"]["learn"] is None and run["stages"]["edit"]["layers"] == layers
    assert run["edit"]["requests"] == 6 and run["edit"]["editor"] == method
    assert run["metrics_after"]["reliability"]["n"] == 6
    assert not (out / "knowledge_vector").exists() and not (out / "adapter").exists()
    # ΔW is a knowledge vector, on θ; for a baseline editor it is the whole update (θ* − θ)
    edit_vector = KnowledgeVector.load(out / "edit_vector")
    update_vector = KnowledgeVector.load(out / "update_vector")
    assert edit_vector.metadata.method == method
    assert edit_vector.metadata.hyperparameters["layers"] == layers
    assert edit_vector.metadata.base_fingerprint == result.summary["model"]["fingerprint"]
    assert edit_vector.keys() == sorted(deltas) == update_vector.keys()
    for name in deltas:
        torch.testing.assert_close(edit_vector[name], deltas[name], atol=0, rtol=0)
        torch.testing.assert_close(update_vector[name], deltas[name], atol=1e-6, rtol=0)
    assert "written by" in (out / "README.md").read_text()


@pytest.mark.parametrize("method", ["flearning-memit", "flearning-alphaedit"])
def test_flearning_editor_forgets_then_edits(method, model_dir, facts_file, tmp_path):
    from flearning.data import load_dataset
    from flearning.editing import apply_deltas
    from flearning.models import load_model
    from flearning.vectors import KnowledgeVector, forget

    out = tmp_path / "out"
    cfg = _config(model_dir, facts_file, method, out, [0, 1], **{"lambda": 0.5})
    update(cfg, progress=False)
    theta, tokenizer = load_model(model_dir)
    old = KnowledgeVector.load(out / "knowledge_vector")
    assert old.metadata.kind == "full"  # the forget stage of flearning-ft
    forget(theta, old, 0.5)  # θ' = θ − λ·Δ_old
    deltas = _edited_directly(theta, tokenizer, load_dataset(facts_file).records, stage_plan(cfg).edit)
    edit_vector = KnowledgeVector.load(out / "edit_vector")
    for name in deltas:
        torch.testing.assert_close(edit_vector[name], deltas[name], atol=0, rtol=0)
    apply_deltas(theta, deltas)  # θ* = θ' + ΔW
    _assert_same_weights(AutoModelForCausalLM.from_pretrained(out), theta)
    run = json.loads((out / "run.json").read_text())
    assert run["lambda"] == 0.5 and run["stages"]["forget"] is not None and run["edit"]["batches"] == 1


def test_batches_edit_one_after_the_other(model_dir, facts_file, tmp_path):
    from flearning.data import load_dataset
    from flearning.editing import apply_deltas, memit_edit
    from flearning.models import load_model
    from flearning.recipes.edit import covariance_settings, edit_stage

    cfg = _config(model_dir, facts_file, "memit", None, [0, 1])
    cfg.edit.batch_size = 4
    plan = stage_plan(cfg).edit
    theta, tokenizer = load_model(model_dir)
    records = load_dataset(facts_file).records
    before = {k: v.clone() for k, v in theta.state_dict().items()}
    outcome = edit_stage(theta, tokenizer, records, plan, progress=False)
    assert outcome.batches == 2 and outcome.requests == 6
    assert all(torch.equal(before[k], v) for k, v in theta.state_dict().items())  # model unchanged
    # the second batch is edited on the model holding the first, with C of the model as given
    from flearning.editing import ValueSettings

    covariance = covariance_settings(plan, theta)
    values = ValueSettings(**plan.values)
    first = memit_edit(theta, tokenizer, records[:4], [0, 1], covariance=covariance, values=values).deltas
    moments = {}
    from flearning.editing import second_moments

    found = second_moments(theta, tokenizer, [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)], covariance)
    moments = {i: found[f"model.layers.{i}.mlp.down_proj"] for i in (0, 1)}
    apply_deltas(theta, first)
    second = memit_edit(theta, tokenizer, records[4:], [0, 1], covariance=moments, values=values).deltas
    for name, delta in outcome.deltas.items():
        torch.testing.assert_close(delta, first[name] + second[name], atol=1e-6, rtol=0)


def test_settings_are_validated(tmp_path):
    def problems(*pairs):
        with pytest.raises(ConfigError) as info:
            load_config(UpdateConfig, None, list(pairs))
        return str(info.value)

    assert "rome edits one layer, not [1, 2]" in problems("method=rome", "edit.layers=[1,2]")
    assert "edit.nope" in problems("edit.nope=1")
    assert "edit.values.steps" in problems("edit.values.steps=0")
    assert "edit.values.bogus" in problems("edit.values.bogus=1")
    assert "edit.layers.0" in problems("edit.layers=[-1]")
    assert "each layer may be given once" in problems("edit.layers=[1,1]")
    assert "edit.layers" in problems("edit.layers=[]")
    assert "no shipped sample 'nope.txt'" in problems("edit.corpus=sample:nope.txt")
    assert "edit.mom2_update_weight" in problems("edit.mom2_update_weight=0")
    with pytest.raises(ConfigError, match="rome edits one layer"):
        load_config(BenchConfig, None, ["methods=[memit,rome]", "edit.layers=[4,5]"])
    load_config(BenchConfig, None, ["methods=[memit,alphaedit]", "edit.layers=[4,5]"])  # no ROME: fine
    assert lax_values_refused(EditSettings) and lax_values_refused(ValueOverrides)
    # a YAML file's corpus is relative to the file, as every path of a config
    (tmp_path / "c.txt").write_text("some text\n")
    (tmp_path / "run.yaml").write_text("method: memit\nedit:\n  corpus: c.txt\n")
    cfg = load_config(UpdateConfig, tmp_path / "run.yaml", [])
    assert cfg.edit.corpus == str(tmp_path / "c.txt")


def test_defaults_and_what_each_editor_reads():
    plans = {m: stage_plan(UpdateConfig(method=m)) for m in EDITORS}
    assert plans["rome"].edit.layers == (12,) and plans["memit"].edit.layers == (3, 4, 5, 6, 7)
    assert plans["alphaedit"].edit.layers == (3, 4, 5, 6, 7)
    assert plans["alphaedit"].edit.values["lr"] == 0.1 and plans["memit"].edit.values["lr"] == 0.5
    assert plans["flearning-memit"].forget.lora is None and plans["flearning-memit"].learn is None
    assert "nullspace_threshold" not in plans["memit"].edit.to_json()
    assert "mom2_update_weight" not in plans["alphaedit"].edit.to_json()
    assert "batch_size" not in plans["rome"].edit.to_json()
    assert all(METHODS[m].editor is None for m in FINE_TUNING)
    assert BenchConfig().methods == list(FINE_TUNING)
    assert load_config(BenchConfig, None, [], profile="quick").methods == list(FINE_TUNING)
    assert set(EDITORS) <= set(BenchConfig.profiles["paper"]["methods"])


def test_facts_without_a_subject_are_refused_before_any_work(model_dir, tmp_path, monkeypatch):
    import flearning.models

    data = tmp_path / "facts.jsonl"
    rows = facts(3, subject=False)
    rows[1]["subject"] = "nothing like it"
    data.write_text("".join(json.dumps(f) + "\n" for f in rows))
    monkeypatch.setattr(flearning.models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        update(_config(model_dir, data, "memit", out, [0]), progress=False)
    message = str(info.value)
    assert f"{data}:line 1:subject: missing" in message
    assert (
        f"{data}:line 2:subject: edit request 'The code of item1 is': the subject 'nothing like it'"
        in message
    )
    assert f"{data}:line 3:subject: missing" in message
    assert not out.exists()
    monkeypatch.undo()
    update(_config(model_dir, data, "ft", None, [0], learn={"epochs": 1}, evaluate=False), progress=False)


def test_layers_the_model_does_not_have_are_refused_before_any_work(model_dir, facts_file, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FlearnError, match=r"edit.layers \[3, 4, 5, 6, 7\]: the model has layers 0 to 2"):
        update(
            UpdateConfig(model=str(model_dir), data=facts_file, method="memit", out=out, **FAST),
            progress=False,
        )
    assert not out.exists()


def test_dry_run_plans_the_edit_step(model_dir, facts_file):
    from flearning.recipes.dry_run import dry_run
    from flearning.recipes.memory import plan_memory

    plan = dry_run(_config(model_dir, facts_file, "flearning-memit", None, [0, 1]), available=2**40)
    assert [(s.name, s.kind) for s in plan.stages] == [("forget", "full"), ("edit", "memit")]
    edit = plan.stages[1]
    assert edit.batch_size == 6 and edit.gradients < edit.weights
    labels = [label for label, _ in edit.other]
    assert "Δ_old" in labels and "C per edited layer (fp32)" in labels
    rome = dry_run(_config(model_dir, facts_file, "rome", None, [1]), available=2**40)
    assert [(s.name, s.kind, s.batch_size) for s in rome.stages] == [("edit", "rome", 1)]
    # without data: every default, the facts assumed; the embedded model's 30 layers hold 4-8
    assert plan_memory(model_dir, "alphaedit", available=2**40).stages[0].kind == "alphaedit"
    with pytest.raises(FlearnError, match="FSDP2"):
        plan_memory(model_dir, "memit", processes=2, sharding="fsdp2", available=2**40)
    # a plan that does not fit suggests no LoRA variant and no sharding for an editor
    tight = plan_memory(model_dir, "memit", available=2**20)
    assert not any("LoRA" in s or "FSDP2" in s for s in tight.suggestions)


def test_edit_vector_through_flearn_vector(model_dir, facts_file, tmp_path):
    from flearning.cli.vector import vector_app
    from flearning.models import load_model
    from flearning.vectors import KnowledgeVector

    out = tmp_path / "out"
    update(_config(model_dir, facts_file, "memit", out, [0, 1], evaluate=False), progress=False)
    runner = CliRunner()
    info = runner.invoke(vector_app, ["info", str(out / "edit_vector")])
    assert info.exit_code == 0, info.output
    assert "memit" in info.output and "model.layers.1" in info.output and "layers=[0, 1]" in info.output
    negated = tmp_path / "negated"
    scaled = runner.invoke(
        vector_app, ["scale", str(out / "edit_vector"), "--by", "-1", "--out", str(negated)]
    )
    assert scaled.exit_code == 0, scaled.output
    vector, minus = KnowledgeVector.load(out / "edit_vector"), KnowledgeVector.load(negated)
    assert all(torch.equal(minus[k], -vector[k]) for k in vector)
    # θ + ΔW through the command line is the updated model (the vector's base is θ)
    applied = tmp_path / "applied"
    result = runner.invoke(
        vector_app,
        [
            "apply",
            "--model",
            str(model_dir),
            "--vector",
            str(out / "edit_vector"),
            "--add",
            "1",
            "--out",
            str(applied),
        ],
    )
    assert result.exit_code == 0, result.output
    _assert_same_weights(load_model(applied)[0], load_model(out)[0])


def test_bench_reports_the_editors(tmp_path, model_dir):
    from flearning.recipes.bench import Bench, run_bench

    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(f) + "\n" for f in facts(8)))

    def cfg(**kw):
        fields = dict(
            model=str(model_dir),
            data={"toy": str(data)},
            n=6,
            seeds=[0],
            methods=["flearning-ft", *EDITORS],
            lambdas=[0.5],
            prime={"lr": 1e-2, "max_epochs": 1, "threshold": 0.99},
            full={"lr": 1e-2, "epochs": 1},
            forget_full={"lr": 1e-2, "epochs": 1},
            edit={**EDIT, "layers": [1]},
            generation=False,
            perplexity=None,
            eval_batch_size=8,
            out=tmp_path / "bench",
        )
        fields.update(kw)
        return BenchConfig.model_validate(fields)

    summary = run_bench(cfg(), progress=False)
    report = summary["datasets"]["toy"]
    assert set(report["methods"]) == {
        "primed (θ)",
        "flearning-ft (λ=0.5)",
        "rome",
        "memit",
        "alphaedit",
        "flearning-memit (λ=0.5)",
        "flearning-alphaedit (λ=0.5)",
    }
    assert report["methods"]["memit"]["reliability"]["n"] == 6
    # flearning-memit and flearning-alphaedit forget as flearning-ft: one Δ_old for the three
    assert summary["counters"] == {
        "trained_prime": 1,
        "trained_forget": 1,
        "trained_learn": 1,
        "edits": 5,
        "cached_runs": 0,
    }
    paired = {(p["method"], p["baseline"]) for p in report["paired"]}
    assert {("flearning-memit", "memit"), ("flearning-alphaedit", "alphaedit")} <= paired
    table = (tmp_path / "bench" / "table.md").read_text()
    assert "| memit |" in table and "| flearning-memit (λ=0.5) |" in table
    assert (tmp_path / "bench" / "toy" / "metrics.png").is_file()
    # the edit settings are part of an editor's key, and of no other method's
    bench = Bench(cfg(edit={**EDIT, "layers": [1], "mom2_update_weight": 100.0}), progress=False)
    bench.run()
    assert bench.counters["edits"] == 2 and bench.counters["cached_runs"] == 4  # memit, flearning-memit
