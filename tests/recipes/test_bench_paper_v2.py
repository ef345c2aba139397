"""The ``paper-v2`` profile (issue #11): the F-Learning paper's appendix settings resolved into every
stage, λ per method and dataset, the Alpaca template and ZsRE's ``pred``; end to end on a tiny model."""

from __future__ import annotations

import json

import pytest

from flearning.config import BenchConfig, load_config
from flearning.errors import ConfigError
from flearning.methods import get_method
from flearning.recipes.bench import run_bench
from tiny import toy_facts

PAPER_STAGE = {"lr": 5e-5, "epochs": 3.0, "batch_size": 4, "grad_accum": 4}


def paper_v2(*overrides: str, **cli) -> BenchConfig:
    return load_config(BenchConfig, None, list(overrides), {"data": "samples", **cli}, profile="paper-v2")


def test_profile_resolves_the_appendix_settings():
    cfg = paper_v2(n=100, seeds=[0])
    assert (cfg.n, cfg.seeds, cfg.template, cfg.zsre_old) == (100, [0], "alpaca", "pred")
    assert cfg.methods == ["ft", "lora", "flearning-ft", "flearning-lora", "flearning-lora-ft"]
    prime = cfg.prime.train_config(0, cfg.template)
    assert cfg.prime.threshold is None
    assert (prime.lr, prime.epochs, prime.batch_size, prime.grad_accum, prime.template) == (
        5e-5,
        3.0,
        4,
        4,
        "alpaca",
    )
    for name in cfg.methods:
        plan = cfg.stage_plan(get_method(name), 0)
        for stage in (plan.learn, plan.forget):
            if stage is None:
                continue
            assert {k: getattr(stage, k) for k in PAPER_STAGE} == PAPER_STAGE
            assert stage.template == "alpaca"
            if stage.lora is not None:
                assert (stage.lora.r, stage.lora.alpha, stage.lora.target_modules) == (
                    8,
                    16.0,
                    ["q_proj", "v_proj"],
                )
    lams = {(d, m): cfg.method_lambdas(d, m) for d in ("zsre", "counterfact") for m in cfg.methods[2:]}
    assert lams == {
        ("zsre", "flearning-ft"): [0.3],
        ("zsre", "flearning-lora"): [0.7],
        ("zsre", "flearning-lora-ft"): [3.0],
        ("counterfact", "flearning-ft"): [0.1],
        ("counterfact", "flearning-lora"): [1.5],
        ("counterfact", "flearning-lora-ft"): [3.0],
    }


def test_lambda_auto_is_still_available():
    cfg = paper_v2(n_val=20, lambdas="auto")
    assert cfg.lambdas == "auto" and cfg.method_lambdas("zsre", "flearning-ft") == [0.3]
    with pytest.raises(ConfigError, match="auto needs a validation split"):
        paper_v2(lambdas="auto")


def test_lambdas_by_dataset_is_checked():
    with pytest.raises(ConfigError) as info:
        paper_v2("lambdas_by_dataset={zsre: {ft: [0.5], flearning-ft: []}}")
    text = str(info.value)
    assert "zsre.ft: not a method that forgets (λ scales Δ_old of flearning-ft," in text
    assert "zsre.flearning-ft: give at least one λ" in text
    with pytest.raises(ConfigError, match="λ = -0.3 is negative"):
        paper_v2("lambdas_by_dataset={zsre: {flearning-ft: [-0.3]}}")


def test_tiny_paper_v2_bench_records_the_settings(tmp_path, tiny_model_dir):
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(f) + "\n" for f in toy_facts(6)))
    cfg = load_config(
        BenchConfig,
        None,
        ["perplexity=null", "generation=false"],
        {
            "model": str(tiny_model_dir),
            "data": {"zsre": str(data), "counterfact": str(data)},
            "n": 4,
            "seeds": [0],
            "out": tmp_path / "bench",
        },
        profile="paper-v2",
    )
    summary = run_bench(cfg, progress=False)
    assert summary["config"]["template"] == "alpaca" and summary["config"]["zsre_old"] == "pred"
    stages = summary["stages"]
    assert stages["prime"]["threshold"] is None and stages["prime"]["grad_accum"] == 4
    forget = stages["methods"]["flearning-lora"]["forget"]
    assert {k: forget[k] for k in PAPER_STAGE} == PAPER_STAGE
    assert forget["lora"]["target_modules"] == ["q_proj", "v_proj"] and forget["template"] == "alpaca"
    assert stages["methods"]["flearning-ft"]["lambda"] == {"zsre": [0.3], "counterfact": [0.1]}
    zsre, counterfact = summary["datasets"]["zsre"], summary["datasets"]["counterfact"]
    assert (zsre["template"], zsre["zsre_old"]) == ("alpaca", None)  # the toy facts are not a ZsRE file
    assert "flearning-ft (λ=0.3)" in zsre["methods"] and "flearning-ft (λ=0.1)" in counterfact["methods"]
    assert zsre["prime"][0]["epochs"] == 3
    paired = zsre["paired"][0]
    assert (paired["n_seeds"], paired["seed_ci95"]) == (1, None)
    assert "Prompt template: alpaca." in summary["table_markdown"]
    assert "one seed: none" in summary["table_markdown"]
    # both names read the same file: the runs they share are cached once and reported under each name
    assert summary["counters"]["cached_runs"] == 3  # ft, lora and flearning-lora-ft (λ 3 on both)
    for name in ("zsre", "counterfact"):
        report = json.loads((tmp_path / "bench" / name / "summary.json").read_text())
        metas = [m for entry in report["methods"].values() for m in entry["meta"]]
        assert len(metas) == 6 and all(m["template"] == "alpaca" for m in metas)  # θ and the five methods
