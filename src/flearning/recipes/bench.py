"""``flearn bench``: the paper's experiment, every method side by side (DESIGN.md §1 protocol).

    for each dataset, for each seed:
        θ₀ = base model
        θ  = prime(θ₀, K_old)                 # one shared model that holds the old facts
        for each method (and λ):
            θ* = method(θ, K_old, K_new)      # same learning hyper-parameters for all methods
            evaluate θ* against θ             # Locality relative to θ

Every expensive product is cached under ``<out>/cache`` by a content hash of what it depends on
(base model fingerprint, records, hyper-parameters, seed): the primed model, each forgetting vector
(shared by every λ, and by flearning-lora and flearning-lora-ft, which forget alike) and each
finished run's per-record results. A λ sweep or an added method reruns only what is new, and a killed
bench rerun with the same command continues where it stopped.

``lambdas="auto"`` picks λ per F-Learning method on a validation split disjoint from the evaluated
records: maximise Reliability + Generality on validation, subject to Locality not more than
``locality_tolerance`` points below the ``ft`` baseline's validation Locality.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flearning.config import BenchConfig, default_stage, learn_config
from flearning.data.records import KnowledgeRecord
from flearning.errors import FlearnError
from flearning.methods import METHODS, get_method
from flearning.training.config import TrainConfig

log = logging.getLogger(__name__)

PRIMED = "primed (θ)"  # the label of the primed model's own evaluation

PAPER_METRICS = ("reliability", "generality", "locality")
# F-Learning method -> the baseline it is compared with (paired, same records and seeds).
COMPARISONS = {"flearning-ft": "ft", "flearning-lora": "lora", "flearning-lora-ft": "flearning-ft"}


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (cache keys)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class RunRecord:
    """One finished (dataset, seed, method, λ, split) run, as cached on disk."""

    dataset: str
    seed: int
    method: str
    lam: float | None
    split: str  # "eval" or "val"
    records: list[dict[str, Any]]
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return self.__dict__

    def result(self):
        from flearning.evaluation import EvalResult

        return EvalResult(
            records=self.records, seed=self.seed, meta={"method": self.method, "lambda": self.lam}
        )


class Cache:
    """Content-addressed products of a bench under one directory (safetensors and JSON only)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def run_path(self, key: str) -> Path:
        return self.root / "runs" / f"{key}.json"

    def load_run(self, key: str) -> RunRecord | None:
        path = self.run_path(key)
        if not path.is_file():
            return None
        return RunRecord(**json.loads(path.read_text()))

    def save_run(self, key: str, run: RunRecord) -> None:
        from flearning.io.atomic import atomic_write_text

        atomic_write_text(self.run_path(key), json.dumps(run.to_json()))

    def primed_dir(self, key: str) -> Path:
        return self.root / "prime" / key

    def vector_dir(self, key: str) -> Path:
        return self.root / "forget" / key


class Bench:
    """Runs the protocol for one config; ``run()`` returns the summary written to ``out``."""

    def __init__(self, cfg: BenchConfig, *, progress: bool = True) -> None:
        self.cfg = cfg
        self.progress = progress
        self.out = default_out(cfg)
        self.cache = Cache(self.out / "cache")
        self.runs: list[RunRecord] = []
        self.primes: dict[str, list[dict[str, Any]]] = {}
        self.chosen_lambda: dict[str, dict[str, dict[int, float]]] = {}
        self.counters = {"trained_prime": 0, "trained_forget": 0, "trained_learn": 0, "cached_runs": 0}

    # ---- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        from flearning.data import load_dataset
        from flearning.models import load_model, model_fingerprint

        self.datasets: dict[str, tuple[list[KnowledgeRecord], list[KnowledgeRecord], str]] = {}
        for name, path in self.cfg.data.items():
            ds = load_dataset(path)
            need = self.cfg.n + self.cfg.n_val
            if len(ds.records) < need:
                raise FlearnError(
                    f"{path}: {len(ds.records)} usable records, the bench needs n + n_val = {need}"
                )
            evaluated = ds.records[: self.cfg.n]
            validation = ds.records[self.cfg.n : need]
            self.datasets[name] = (evaluated, validation, ds.sha256)
        start = time.perf_counter()
        self.base, self.tokenizer = load_model(self.cfg.model, trust_remote_code=self.cfg.trust_remote_code)
        self.base_fp = model_fingerprint(self.base)
        log.info(
            "bench: base model loaded in %.1f s (fingerprint %s)", time.perf_counter() - start, self.base_fp
        )
        c = self.cfg
        self.full_cfg = lambda seed: default_stage("full", c.lora, seed, c.full.given())
        self.lora_cfg = lambda seed: default_stage("lora", c.lora, seed, c.lora_stage.given())
        self.forget_cfg = {
            "full": lambda seed: default_stage("full", c.lora, seed, c.forget_full.given()),
            "lora": lambda seed: default_stage("lora", c.lora, seed, c.forget_lora.given()),
        }

    def planned_runs(self) -> int:
        per_method = {
            m: 1
            if METHODS[m].forget is None
            else (len(self.cfg.lambdas) if self.cfg.lambdas != "auto" else 1 + len(self.cfg.lambda_grid))
            for m in self.cfg.methods
        }
        extra_val = 1 if self.cfg.lambdas == "auto" else 0  # the ft baseline on validation
        return len(self.cfg.data) * len(self.cfg.seeds) * (sum(per_method.values()) + extra_val)

    # ---- stages ----------------------------------------------------------------------------------
    def primed(self, dataset: str, seed: int, records: Sequence[KnowledgeRecord]):
        """θ for (dataset, seed), trained once and cached as a safetensors model directory."""
        from flearning.data import records_hash
        from flearning.models import load_model
        from flearning.recipes.prime import prime

        p = self.cfg.prime
        cfg = p.train_config(seed)
        key = digest("prime", self.base_fp, records_hash(records), cfg.model_dump(mode="json"), p.threshold)
        path = self.cache.primed_dir(key)
        info_path = path / "prime.json"
        if info_path.is_file():
            model, _ = load_model(path)
            info = json.loads(info_path.read_text())
        else:
            model = copy.deepcopy(self.base)
            result = prime(model, self.tokenizer, records, cfg, threshold=p.threshold, progress=self.progress)
            self.counters["trained_prime"] += 1
            info = {
                "dataset": dataset,
                "seed": seed,
                "accuracy_before": result.accuracy_before,
                "accuracy": result.accuracy,
                "epochs": result.epochs,
                "seconds": result.seconds,
                "history": result.history,
                "key": key,
            }
            from flearning.io.atomic import atomic_directory

            with atomic_directory(path) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
                (tmp / "prime.json").write_text(json.dumps(info, indent=2))
        return model, key, info

    def old_vector(self, theta, theta_key: str, kind: str, seed: int, split: str, records):
        """Δ_old of ``kind`` for (θ, split, seed), computed once and shared by all λ and methods."""
        from flearning.recipes.algorithm import old_knowledge_vector
        from flearning.vectors import KnowledgeVector

        cfg: TrainConfig = self.forget_cfg[kind](seed)
        key = digest("forget", theta_key, split, cfg.model_dump(mode="json"))
        path = self.cache.vector_dir(key)
        if (path / "vector.json").is_file():
            return KnowledgeVector.load(path)
        work = copy.deepcopy(theta)
        vector, _ = old_knowledge_vector(
            work,
            self.tokenizer,
            [(r.prompt, r.target_old) for r in records],
            cfg,
            progress=self.progress,
            metadata={"method": f"forget-{kind}"},
        )
        self.counters["trained_forget"] += 1
        vector.save(path, overwrite=True)
        return vector

    def run_one(
        self, dataset, seed, method_name, lam, split, records, theta, theta_key, reference
    ) -> RunRecord:
        from flearning.config import StagePlan
        from flearning.data import records_hash
        from flearning.evaluation.evaluate import evaluate
        from flearning.recipes.algorithm import run_method

        method = get_method(method_name)
        learn = learn_config(method, self.full_cfg(seed), self.lora_cfg(seed), self.cfg.linf_bound)
        forget = self.forget_cfg[method.forget](seed) if method.forget else None
        key = digest(
            "run",
            theta_key,
            records_hash(records),
            method_name,
            lam if method.forget else None,
            learn.model_dump(mode="json"),
            forget.model_dump(mode="json") if forget else None,
            self.cfg.generation,
            self.cfg.fluency,
            split,
        )
        cached = self.cache.load_run(key)
        if cached is not None:
            self.counters["cached_runs"] += 1
            return cached
        start = time.perf_counter()
        vector = (
            self.old_vector(theta, theta_key, method.forget, seed, split, records) if method.forget else None
        )
        seconds = {"forget": time.perf_counter() - start}
        model = copy.deepcopy(theta)
        plan = StagePlan(learn=learn, forget=forget, lam=lam if lam is not None else 0.0)
        outcome = run_method(
            method,
            model,
            self.tokenizer,
            [(r.prompt, r.target_old) for r in records],
            [(r.prompt, r.target_new) for r in records],
            plan,
            progress=self.progress,
            old_vector=vector,
        )
        self.counters["trained_learn"] += 1
        seconds.update(outcome.timings)
        start = time.perf_counter()
        result = evaluate(
            outcome.model,
            self.tokenizer,
            records,
            reference=reference,
            batch_size=self.cfg.eval_batch_size,
            generation=self.cfg.generation,
            fluency=self.cfg.fluency,
            progress=False,
            seed=seed,
        )
        seconds["evaluate"] = time.perf_counter() - start
        run = RunRecord(
            dataset,
            seed,
            method_name,
            lam if method.forget else None,
            split,
            result.records,
            {k: round(v, 3) for k, v in seconds.items()},
        )
        self.cache.save_run(key, run)
        return run

    # ---- the protocol ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        from flearning.evaluation import reference_predictions
        from flearning.evaluation.evaluate import evaluate

        self.setup()
        started = time.perf_counter()
        bar = tqdm(total=self.planned_runs(), desc="bench runs", unit="run", disable=not self.progress)
        for dataset, (evaluated, validation, _) in self.datasets.items():
            for seed in self.cfg.seeds:
                theta, theta_key, info = self.primed(dataset, seed, [*evaluated, *validation])
                ref_eval = reference_predictions(
                    theta, self.tokenizer, evaluated, batch_size=self.cfg.eval_batch_size
                )
                primed_eval = evaluate(
                    theta,
                    self.tokenizer,
                    evaluated,
                    reference=ref_eval,
                    batch_size=self.cfg.eval_batch_size,
                    generation=self.cfg.generation,
                    progress=False,
                    seed=seed,
                )
                info = dict(info, metrics=primed_eval.summary())
                self.primes.setdefault(dataset, []).append(info)
                self.runs.append(RunRecord(dataset, seed, PRIMED, None, "eval", primed_eval.records))
                chosen = (
                    self._choose_lambdas(dataset, seed, validation, theta, theta_key, bar)
                    if self.cfg.lambdas == "auto"
                    else {}
                )
                for method_name in self.cfg.methods:
                    method = METHODS[method_name]
                    lams = (
                        [None]
                        if method.forget is None
                        else ([chosen[method_name]] if self.cfg.lambdas == "auto" else list(self.cfg.lambdas))
                    )
                    for lam in lams:
                        bar.set_postfix_str(f"{dataset} seed {seed} {method_name} λ={lam}")
                        self.runs.append(
                            self.run_one(
                                dataset, seed, method_name, lam, "eval", evaluated, theta, theta_key, ref_eval
                            )
                        )
                        bar.update(1)
                del theta
        bar.close()
        wall = time.perf_counter() - started
        return self.write(wall)

    def _choose_lambdas(self, dataset, seed, validation, theta, theta_key, bar) -> dict[str, float]:
        """λ per F-Learning method from the validation split (never the evaluated records)."""
        from flearning.evaluation import reference_predictions

        ref_val = reference_predictions(
            theta, self.tokenizer, validation, batch_size=self.cfg.eval_batch_size
        )
        baseline = self.run_one(dataset, seed, "ft", None, "val", validation, theta, theta_key, ref_val)
        self.runs.append(baseline)
        bar.update(1)
        base_loc = baseline.result().summary()["locality"]["mean"] or 0.0
        chosen: dict[str, float] = {}
        for method_name in self.cfg.methods:
            if METHODS[method_name].forget is None:
                continue
            scored = []
            for lam in self.cfg.lambda_grid:
                run = self.run_one(
                    dataset, seed, method_name, lam, "val", validation, theta, theta_key, ref_val
                )
                self.runs.append(run)
                bar.update(1)
                s = run.result().summary()
                objective = (s["reliability"]["mean"] or 0) + (s["generality"]["mean"] or 0)
                allowed = (s["locality"]["mean"] or 0) >= base_loc - self.cfg.locality_tolerance
                scored.append((allowed, objective, -lam, lam))
            best = max(scored)  # allowed first, then objective, then the smaller λ on ties
            chosen[method_name] = best[3]
            self.chosen_lambda.setdefault(dataset, {}).setdefault(method_name, {})[seed] = best[3]
            log.info("bench: %s %s seed %d: λ = %s chosen on validation", dataset, method_name, seed, best[3])
        return chosen

    # ---- reports ---------------------------------------------------------------------------------
    def write(self, wall: float) -> dict[str, Any]:
        """Write the per-dataset reports, ``summary.json`` and ``table.md`` together: all are written in a
        staging directory first and swapped in at the end (``outputs.atomic_entries``), so ``out`` shows
        the previous bench's results or this one's, never a mix. A dataset's existing directory stays:
        only its report files are replaced (an earlier report's files this one does not write are
        removed in the same swap); the user's files beside them are not touched."""
        from flearning.evaluation.report import REPORT_FILES
        from flearning.io.atomic import atomic_entries

        stale = [f"{dataset}/{name}" for dataset in self.datasets for name in REPORT_FILES]
        with atomic_entries(self.out, stale=stale) as staging:
            return self._write_into(staging, wall)

    def _write_into(self, staging: Path, wall: float) -> dict[str, Any]:
        from flearning.evaluation import aggregate, write_report

        summary: dict[str, Any] = {
            "config": self.cfg.model_dump(mode="json"),
            "wall_seconds": round(wall, 1),
            "base_fingerprint": self.base_fp,
            "counters": self.counters,
            "datasets": {},
        }
        tables = []
        for dataset in self.datasets:
            runs = [r for r in self.runs if r.dataset == dataset and r.split == "eval"]
            by_label: dict[str, list] = {}
            sweep: dict[str, dict[float, list]] = {}
            for r in runs:
                by_label.setdefault(label(r), []).append(r.result())
                if r.lam is not None:
                    sweep.setdefault(r.method, {}).setdefault(r.lam, []).append(r.result())
            multi_lambda = {m: v for m, v in sweep.items() if len(v) > 1}
            write_report(
                by_label,
                staging / dataset,
                title=f"flearn bench: {dataset}",
                sweep=multi_lambda or None,
                # ft, lora, ft-c as reference lines (θ itself would squash the axes)
                sweep_baselines=sorted({label(r) for r in runs if r.lam is None and r.method != PRIMED}),
            )
            methods = {name: aggregate(results) for name, results in by_label.items()}
            summary["datasets"][dataset] = {
                "n": self.cfg.n,
                "seeds": self.cfg.seeds,
                "prime": self.primes.get(dataset, []),
                "chosen_lambda": self.chosen_lambda.get(dataset),
                "methods": methods,
                "paired": paired_comparisons(runs),
            }
            tables.append(paper_table(dataset, methods))
        summary["table_markdown"] = "\n\n".join(tables)
        (staging / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        (staging / "table.md").write_text(summary["table_markdown"] + "\n")
        return summary


def default_out(cfg: BenchConfig) -> Path:
    """Where a bench writes: ``cfg.out``, else ``runs/bench``."""
    return Path(cfg.out) if cfg.out else Path("runs/bench")


def label(run: RunRecord) -> str:
    return run.method if run.lam is None else f"{run.method} (λ={run.lam:g})"


def paired_comparisons(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """F-Learning vs its baseline on the same records and seeds: mean per-record difference ×100 and a
    normal-approximation 95 % confidence interval, for Reliability, Generality and Locality."""
    index: dict[tuple[str, float | None], dict[tuple[int, str], dict]] = {}
    for r in runs:
        index.setdefault((r.method, r.lam), {}).update({(r.seed, str(row["id"])): row for row in r.records})
    out = []
    for (method, lam), rows in index.items():
        base_name = COMPARISONS.get(method)
        base_keys = [k for k in index if k[0] == base_name]
        for base_key in base_keys:
            base_rows = index[base_key]
            for metric in PAPER_METRICS:
                diffs = [
                    rows[k][metric] - base_rows[k][metric]
                    for k in rows
                    if k in base_rows
                    and rows[k].get(metric) is not None
                    and base_rows[k].get(metric) is not None
                ]
                if len(diffs) < 2:
                    continue
                mean = sum(diffs) / len(diffs)
                sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
                half = 1.96 * sd / math.sqrt(len(diffs))
                out.append(
                    {
                        "method": method,
                        "lambda": lam,
                        "baseline": base_name,
                        "baseline_lambda": base_key[1],
                        "metric": metric,
                        "n": len(diffs),
                        "diff": 100 * mean,
                        "ci95": [100 * (mean - half), 100 * (mean + half)],
                    }
                )
    return out


def paper_table(dataset: str, methods: dict[str, dict[str, Any]]) -> str:
    """Methods × (Reliability, Generality, Locality) and the extra metrics, mean ± std over seeds."""
    cols = [
        "reliability",
        "generality",
        "locality",
        "old_retention",
        "efficacy",
        "paraphrase",
        "gen_exact_match",
    ]
    names = ["Reliability", "Generality", "Locality", "Old retention", "Efficacy", "Paraphrase", "Gen. EM"]
    lines = [f"**{dataset}**", "", "| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(cols)]
    for method, metrics in methods.items():
        cells = []
        for c in cols:
            m = metrics.get(c) or {}
            if m.get("mean") is None:
                cells.append("–")
                continue
            spread = m.get("std_seeds")
            cells.append(f"{m['mean']:.1f}" + (f" ± {spread:.1f}" if spread is not None else ""))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_bench(cfg: BenchConfig, *, progress: bool = True) -> dict[str, Any]:
    """Python API of ``flearn bench``."""
    return Bench(cfg, progress=progress).run()
