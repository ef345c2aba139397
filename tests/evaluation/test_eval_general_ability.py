"""An update reports its cost in general ability (perplexity on held-out text, before and after) and, for
KnowEdit-style facts, Locality and Portability by category: run.json, the terminal table, the report and
the model card; ``flearn update --no-perplexity`` / ``--perplexity-corpus``."""

from __future__ import annotations

import json

import pytest

from flearning.cli import main
from flearning.cli.tables import render, update_table
from flearning.config import PerplexitySettings, UpdateConfig
from flearning.errors import FlearnError
from flearning.evaluation.corpus import load_passages
from flearning.evaluation.perplexity import perplexity
from flearning.models import load_model
from flearning.recipes.update import update
from tiny import toy_facts

FAST = {"learn": {"lr": 1e-2, "epochs": 2}, "forget": {"lr": 1e-2, "epochs": 1}, "eval_batch_size": 8}
TEXT = [
    "Homarus gammarus , known as the European lobster , is a species of clawed lobster .",
    "It may grow to a length of 60 cm and a mass of 6 kilograms .",
    "Mating occurs in the summer , producing eggs which are carried by the females .",
    "The lobsters are blue , only becoming lobster red on cooking .",
]


@pytest.fixture
def facts_file(tmp_path):
    facts = toy_facts(6)
    for i, fact in enumerate(facts):  # KnowEdit-style categories on half of the probes
        fact["locality"] = [
            {"prompt": f"Colour {i} is", "answer": "blue", "category": "Relation_Specificity"},
            {"prompt": f"Shape {i} is", "answer": "round", "category": "Forgetfulness"},
        ]
        fact["portability"] = [
            {"prompt": f"Item {i} is coded as", "answer": f"new{i % 4}", "category": "Reasoning"}
        ]
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in facts))
    return path


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(TEXT) + "\n", encoding="utf-8")
    return path


def test_update_reports_perplexity_before_and_after(tiny_model_dir, facts_file, corpus_file, tmp_path):
    out = tmp_path / "out"
    settings = {"corpus": str(corpus_file), "passages": 3, "max_tokens": 40}
    cfg = UpdateConfig(
        model=str(tiny_model_dir), data=facts_file, method="ft", out=out, perplexity=settings, **FAST
    )
    result = update(cfg, progress=False)
    run = json.loads((out / "run.json").read_text())
    ppl = run["perplexity"]
    passages = load_passages(corpus_file, 3)
    theta, tokenizer = load_model(tiny_model_dir)
    updated, _ = load_model(out)
    before = perplexity(theta, tokenizer, passages, max_tokens=40)
    after = perplexity(updated, tokenizer, passages, max_tokens=40)
    assert ppl["before"] == pytest.approx(before.perplexity, rel=1e-6)
    assert ppl["after"] == pytest.approx(after.perplexity, rel=1e-6)
    assert ppl["change"] == pytest.approx(ppl["after"] - ppl["before"])
    assert ppl["before"] != ppl["after"]  # lr 1e-2 moved the model
    assert (ppl["corpus"], ppl["passages"], ppl["tokens"], ppl["max_tokens"]) == (
        str(corpus_file),
        3,
        before.tokens,
        40,
    )
    assert run["config"]["perplexity"] == settings
    # the terminal table, the report, the model card
    table = render(update_table(result.summary))
    assert "perplexity (held-out text, not ×100, lower is better)" in table
    assert f"{ppl['before']:.2f}" in table and f"{ppl['after']:.2f}" in table
    report = json.loads((out / "report" / "summary.json").read_text())
    assert report["methods"]["after"]["perplexity"]["mean"] == pytest.approx(ppl["after"])
    assert "General ability: perplexity on 3 passages" in (out / "README.md").read_text()
    # KnowEdit categories: run.json and the report have them
    cats = run["metrics_by_category_after"]
    assert set(cats["locality"]) == {"Relation_Specificity", "Forgetfulness"}
    assert set(cats["portability"]) == {"Reasoning"} and cats["portability"]["Reasoning"]["n"] == 6
    assert set(report["methods"]["before"]["categories"]) == {"locality", "portability"}


def test_perplexity_null_skips_it_and_a_bad_corpus_fails_before_training(
    tiny_model_dir, facts_file, tmp_path
):
    out = tmp_path / "out"
    cfg = UpdateConfig(
        model=str(tiny_model_dir), data=facts_file, method="ft", out=out, perplexity=None, **FAST
    )
    result = update(cfg, progress=False)
    assert json.loads((out / "run.json").read_text())["perplexity"] is None
    assert "perplexity" not in render(update_table(result.summary))
    missing = tmp_path / "missing.txt"
    bad = cfg.model_copy(
        update={"out": tmp_path / "out2", "perplexity": PerplexitySettings(corpus=str(missing))}
    )
    with pytest.raises(FlearnError, match="perplexity corpus not found"):
        update(bad, progress=False)
    assert not (tmp_path / "out2").exists()


def test_cli_perplexity_options(tiny_model_dir, facts_file, corpus_file, tmp_path, capsys):
    fast = ["learn.lr=1e-2", "learn.epochs=1", "eval_batch_size=8", "--no-progress", "--no-vectors"]
    base = ["update", "--model", str(tiny_model_dir), "--data", str(facts_file), "--method", "ft", *fast]
    out = tmp_path / "a"
    assert (
        main([*base, "--out", str(out), "--perplexity-corpus", str(corpus_file), "perplexity.passages=2"])
        == 0
    )
    ppl = json.loads((out / "run.json").read_text())["perplexity"]
    assert (ppl["corpus"], ppl["passages"]) == (str(corpus_file), 2)
    assert "perplexity (held-out text" in capsys.readouterr().out
    out = tmp_path / "b"
    assert main([*base, "--out", str(out), "--no-perplexity"]) == 0
    assert json.loads((out / "run.json").read_text())["perplexity"] is None
    code = main(
        [*base, "--out", str(tmp_path / "c"), "--no-perplexity", "--perplexity-corpus", str(corpus_file)]
    )
    assert code == 2


def test_the_corpus_is_a_protected_input(tiny_model_dir, facts_file, tmp_path):
    """The output rule (never an input, never a directory holding one) covers the perplexity corpus."""
    held = tmp_path / "held"
    held.mkdir()
    corpus = held / "corpus.txt"
    corpus.write_text("\n\n".join(TEXT))
    settings = {"corpus": str(corpus), "passages": 2}
    cfg = UpdateConfig(
        model=str(tiny_model_dir), data=facts_file, out=held, overwrite=True, perplexity=settings, **FAST
    )
    with pytest.raises(FlearnError, match="perplexity corpus"):
        update(cfg, progress=False)
    assert corpus.read_text() == "\n\n".join(TEXT)


def test_bench_reports_perplexity_per_method(tiny_model_dir, tmp_path, corpus_file):
    from flearning.config import BenchConfig
    from flearning.recipes.bench import run_bench

    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(f) + "\n" for f in toy_facts(6)))
    stage = {"lr": 1e-2, "epochs": 1}
    cfg = BenchConfig.model_validate(
        {
            "model": str(tiny_model_dir),
            "data": {"toy": str(data)},
            "n": 4,
            "seeds": [0],
            "methods": ["ft", "flearning-ft"],
            "lambdas": [0.5, 1.0],
            "prime": {"lr": 1e-2, "max_epochs": 1},
            "full": stage,
            "forget_full": stage,
            "generation": False,
            "eval_batch_size": 4,
            "perplexity": {"corpus": str(corpus_file), "passages": 3, "max_tokens": 40},
            "out": tmp_path / "bench",
        }
    )
    summary = run_bench(cfg, progress=False)
    toy = summary["datasets"]["toy"]
    labels = {"primed (θ)", "ft", "flearning-ft (λ=0.5)", "flearning-ft (λ=1)"}
    assert set(toy["perplexity"]) == labels
    assert toy["prime"][0]["perplexity"]["passages"] == 3
    assert toy["perplexity"]["ft"]["mean"] != toy["perplexity"]["primed (θ)"]["mean"]  # training moved it
    table = (tmp_path / "bench" / "table.md").read_text()
    assert "Perplexity ↓" in table and f"{toy['perplexity']['ft']['mean']:.2f}" in table
    report = json.loads((tmp_path / "bench" / "toy" / "summary.json").read_text())
    assert report["methods"]["ft"]["perplexity"]["mean"] == toy["perplexity"]["ft"]["mean"]
    sweep = json.loads((tmp_path / "bench" / "toy" / "sweep.json").read_text())
    assert [p["perplexity"]["n_seeds"] for p in sweep["methods"]["flearning-ft"]] == [1, 1]
    # a rerun takes every run from the cache, perplexity included
    again = run_bench(cfg, progress=False)
    assert again["counters"]["trained_learn"] == 0
    assert again["datasets"]["toy"]["perplexity"] == toy["perplexity"]


def test_run_keys_without_the_new_measures_are_unchanged():
    """Caches made before issue #14 stay valid for runs without fluency and perplexity: the key is the
    digest of the same parts as before; fluency (now both Fluencies) and perplexity change it."""
    from flearning.data.records import KnowledgeRecord
    from flearning.data.store import records_hash
    from flearning.recipes.bench_cache import digest, run_key
    from flearning.training.config import TrainConfig

    records = [KnowledgeRecord(id="a", prompt="p", target_old="o", target_new="n")]
    learn = TrainConfig(lr=1e-3, epochs=1.0, batch_size=2)
    legacy = digest(
        "run",
        "theta",
        records_hash(records),
        "ft",
        None,
        learn.model_dump(mode="json"),
        None,
        True,
        False,
        "eval",
    )
    args = ("theta", records, "ft", None, learn, None)
    assert run_key(*args, generation=True, fluency=False, split="eval") == legacy
    assert run_key(*args, generation=True, fluency=True, split="eval") != digest(
        "run",
        "theta",
        records_hash(records),
        "ft",
        None,
        learn.model_dump(mode="json"),
        None,
        True,
        True,
        "eval",
    )
    assert run_key(*args, generation=True, fluency=False, split="eval", perplexity={"passages": 3}) != legacy


def test_perplexity_settings_of_the_configs(tmp_path):
    from flearning.config import BenchConfig, PerplexitySettings, load_config

    assert UpdateConfig().perplexity == PerplexitySettings() == BenchConfig().perplexity
    assert PerplexitySettings().model_dump() == {
        "corpus": "sample:wikitext-2-valid-200.txt",
        "passages": 200,
        "max_tokens": 256,
    }
    assert load_config(BenchConfig, None, [], profile="quick").perplexity.passages == 20  # a smoke run
    assert load_config(BenchConfig, None, ["perplexity=null"], profile="quick").perplexity is None
    # a YAML file's relative corpus is relative to the file; a shipped sample stays a name
    (tmp_path / "texts").mkdir()
    config = tmp_path / "run.yaml"
    config.write_text("perplexity:\n  corpus: texts/held.txt\n  passages: 7\n")
    cfg = load_config(UpdateConfig, config, [])
    assert (cfg.perplexity.corpus, cfg.perplexity.passages) == (str(tmp_path / "texts" / "held.txt"), 7)
    config.write_text("perplexity:\n  corpus: sample:wikitext-2-valid-200.txt\n")
    assert load_config(UpdateConfig, config, []).perplexity.corpus == "sample:wikitext-2-valid-200.txt"
