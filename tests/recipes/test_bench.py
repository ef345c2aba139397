"""The bench protocol on a tiny random Llama: caching, resume and the λ choice."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from flearning.config import BenchConfig
from flearning.recipes import bench as bench_module
from flearning.recipes.bench import Bench, run_bench
from flearning.recipes.run_record import machine_facts
from tiny import toy_facts

FACTS = toy_facts(10)


@pytest.fixture
def bench_cfg(tmp_path, tiny_model_dir):
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(f) + "\n" for f in FACTS))

    def make(**kw):
        fields = dict(
            model=str(tiny_model_dir),
            data={"toy": str(data)},
            n=6,
            n_val=0,
            seeds=[0],
            methods=["ft", "flearning-ft", "flearning-lora", "flearning-lora-ft"],
            lambdas=[0.5],
            prime={"lr": 1e-2, "max_epochs": 2, "threshold": 0.99},
            full={"lr": 1e-2, "epochs": 1},
            lora_stage={"lr": 1e-2, "epochs": 1},
            forget_full={"lr": 1e-2, "epochs": 1},
            forget_lora={"lr": 1e-2, "epochs": 1},
            lora={"r": 2, "target_modules": ["q_proj"]},
            generation=False,
            eval_batch_size=4,
            out=tmp_path / "bench",
        )
        fields.update(kw)
        return BenchConfig.model_validate(fields)

    return make


def _strip_timing(summary):
    summary = json.loads(json.dumps(summary, default=str))
    summary.pop("wall_seconds")
    summary.pop("counters")
    for ds in summary["datasets"].values():
        for p in ds["prime"]:
            p.pop("seconds")
    return summary


def test_summary_has_every_method_and_metric(bench_cfg):
    summary = run_bench(bench_cfg(), progress=False)
    methods = summary["datasets"]["toy"]["methods"]
    assert set(methods) == {
        "primed (θ)",
        "ft",
        "flearning-ft (λ=0.5)",
        "flearning-lora (λ=0.5)",
        "flearning-lora-ft (λ=0.5)",
    }
    for metrics in methods.values():
        for name in ("reliability", "generality", "locality", "old_retention", "efficacy", "paraphrase"):
            assert metrics[name]["n"] == 6
    assert methods["primed (θ)"]["locality"]["mean"] == pytest.approx(100.0)
    # flearning-lora and flearning-lora-ft forget alike: one LoRA vector and one full vector trained
    assert summary["counters"] == {
        "trained_prime": 1,
        "trained_forget": 2,
        "trained_learn": 4,
        "edits": 0,
        "cached_runs": 0,
    }
    paired = {(p["method"], p["metric"]) for p in summary["datasets"]["toy"]["paired"]}
    assert ("flearning-ft", "reliability") in paired and ("flearning-lora-ft", "locality") in paired
    assert (bench_cfg().out / "table.md").read_text().startswith("**toy**")
    # results record paths relative to the current directory, never this machine's absolute paths
    written = json.loads((bench_cfg().out / "summary.json").read_text())["config"]
    data = bench_cfg().data["toy"]
    assert (
        written["data"] == {"toy": os.path.relpath(data)} and not Path(written["data"]["toy"]).is_absolute()
    )
    assert written["out"] == os.path.relpath(bench_cfg().out)
    # every timing says where it was measured: each run (θ's evaluation timed too), prime.json, the summary
    facts = machine_facts()
    cache = bench_cfg().out / "cache"
    runs = [json.loads(p.read_text()) for p in cache.glob("runs/*.json")]
    assert len(runs) == 5 and all(r["machine"] == facts for r in runs)
    (primed,) = [r for r in runs if r["method"] == "primed (θ)"]
    assert primed["seconds"]["evaluate"] > 0
    (prime_json,) = cache.glob("prime/*/prime.json")
    assert json.loads(prime_json.read_text())["machine"] == facts == written_summary(bench_cfg())["machine"]


def written_summary(cfg):
    return json.loads((cfg.out / "summary.json").read_text())


def test_machine_facts_name_the_cpu_and_its_vector_instructions(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n\n"
        "processor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"
    )
    facts = machine_facts(cpuinfo)
    assert facts["cpu"] == "AMD EPYC" and facts["simd"] == ["avx2"]
    cpuinfo.write_text("model name : Intel Xeon\nflags : avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert machine_facts(cpuinfo)["simd"] == ["avx2", "avx512f", "avx512_bf16", "amx_tile"]
    missing = machine_facts(tmp_path / "absent")
    assert missing["simd"] == [] and missing["cpu"] and missing["cores"] == os.cpu_count()


def test_second_run_of_a_sweep_reuses_prime_and_forget(bench_cfg):
    run_bench(bench_cfg(), progress=False)
    bench = Bench(bench_cfg(lambdas=[0.5, 1.0]), progress=False)
    bench.run()
    # λ=0.5 runs come from the cache, λ=1.0 reuses the cached θ and forgetting vectors
    assert bench.counters == {
        "trained_prime": 0,
        "trained_forget": 0,
        "trained_learn": 3,
        "edits": 0,
        "cached_runs": 4,
    }


def test_killed_bench_rerun_gives_the_same_summary(bench_cfg, tmp_path, monkeypatch):
    uninterrupted = _strip_timing(run_bench(bench_cfg(out=tmp_path / "a"), progress=False))

    real = bench_module.Bench.run_one
    calls = {"n": 0}

    def dies_on_third(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(bench_module.Bench, "run_one", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_bench(bench_cfg(out=tmp_path / "b"), progress=False)
    monkeypatch.setattr(bench_module.Bench, "run_one", real)
    resumed_bench = Bench(bench_cfg(out=tmp_path / "b"), progress=False)
    resumed = resumed_bench.run()
    assert resumed_bench.counters["cached_runs"] == 2 and resumed_bench.counters["trained_prime"] == 0
    resumed = _strip_timing(resumed)
    resumed["config"]["out"] = uninterrupted["config"]["out"]
    assert resumed == uninterrupted


def test_auto_lambda_is_chosen_on_validation_only(bench_cfg):
    bench = Bench(
        bench_cfg(n=5, n_val=4, lambdas="auto", lambda_grid=[0.1, 2.0], methods=["ft", "flearning-ft"]),
        progress=False,
    )
    summary = bench.run()
    chosen = summary["datasets"]["toy"]["chosen_lambda"]["flearning-ft"]
    assert set(chosen) == {0} and chosen[0] in (0.1, 2.0)
    val_ids = {r["id"] for run in bench.runs if run.split == "val" for r in run.records}
    eval_ids = {r["id"] for run in bench.runs if run.split == "eval" for r in run.records}
    assert val_ids == {"f5", "f6", "f7", "f8"} and eval_ids == {"f0", "f1", "f2", "f3", "f4"}
    assert f"flearning-ft (λ={chosen[0]:g})" in summary["datasets"]["toy"]["methods"]


def test_first_seed_lambda_choice_validates_once_and_keeps_the_choice(bench_cfg):
    cfg = bench_cfg(
        n=3, n_val=3, seeds=[0, 1], lambdas="auto", lambda_grid=[0.1, 2.0], methods=["ft", "flearning-ft"]
    )
    bench = Bench(cfg.model_copy(update={"lambda_choice": "first_seed"}), progress=False)
    # per seed: ft and flearning-ft evaluated; validation (ft + the grid's 2) on the first seed only
    assert bench.planned_runs() == 2 * 2 + 3 == Bench(cfg, progress=False).planned_runs() - 3
    summary = bench.run()
    val_seeds = {run.seed for run in bench.runs if run.split == "val"}
    assert val_seeds == {0} and sum(run.split == "val" for run in bench.runs) == 3
    chosen = summary["datasets"]["toy"]["chosen_lambda"]["flearning-ft"]
    assert set(chosen) == {0, 1} and chosen[0] == chosen[1] in (0.1, 2.0)
    evaluated = [r for r in bench.runs if r.split == "eval" and r.method == "flearning-ft"]
    assert sorted((r.seed, r.lam) for r in evaluated) == [(0, chosen[0]), (1, chosen[0])]


def test_config_errors():
    with pytest.raises(ValueError, match="auto needs a validation split"):
        BenchConfig(lambdas="auto", n_val=0)
    with pytest.raises(ValueError, match="unknown methods"):
        BenchConfig(methods=["ft", "no-such-method"])


def test_a_cache_kept_without_its_weights_resumes_from_its_json_files(bench_cfg, tmp_path, monkeypatch):
    """What a shipped bench directory keeps (every JSON file, no safetensors) is enough to rewrite its
    reports without θ; a run not in it retrains θ, which keeps its first prime.json."""
    first = _strip_timing(run_bench(bench_cfg(), progress=False))
    cache = bench_cfg().out / "cache"
    for path in [*cache.rglob("*.safetensors"), *(cache / "forget").rglob("*")]:
        if path.is_file():
            path.unlink()
    (prime_json,) = cache.glob("prime/*/prime.json")
    recorded = prime_json.read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("θ trained although every run is cached")

    monkeypatch.setattr(bench_module.Bench, "_train_primed", no_training)
    again = Bench(bench_cfg(), progress=False)
    assert _strip_timing(again.run()) == first
    assert again.counters["cached_runs"] == 4 and again.counters["trained_prime"] == 0
    monkeypatch.undo()

    # one run more (λ 1.0): θ retrained from nothing but its prime.json, which stays as it was
    more = Bench(bench_cfg(lambdas=[0.5, 1.0]), progress=False)
    summary = more.run()
    assert more.counters["trained_prime"] == 1 and more.counters["cached_runs"] == 4
    assert prime_json.read_text() == recorded
    assert "flearning-ft (λ=1)" in summary["datasets"]["toy"]["methods"]
    # the retrained θ is the same model: the cached θ row and a fresh evaluation agree
    assert (
        summary["datasets"]["toy"]["methods"]["primed (θ)"]
        == first["datasets"]["toy"]["methods"]["primed (θ)"]
    )
