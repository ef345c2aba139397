"""``flearn bench``: the paper's experiment, every method side by side from one primed θ.

    for each dataset and seed:   θ  = prime(θ₀, K_old)           # one shared model holding the old facts
        for each method and λ:   θ* = method(θ, K_old, K_new)    # the same learning settings for all
                                 evaluate θ* against θ           # Locality relative to θ

Every product is cached by content (``bench_cache``): a λ sweep, an added method or the rerun of a killed
bench computes only what is new. ``lambdas="auto"`` chooses λ on a validation split (``_choose_lambdas``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flearning.config import BenchConfig
from flearning.data.records import KnowledgeRecord
from flearning.errors import FlearnError
from flearning.methods import METHODS, get_method
from flearning.recipes.bench_cache import (
    Cache,
    RunRecord,
    forget_key,
    prime_key,
    primed_eval_key,
    run_key,
)
from flearning.recipes.bench_report import PRIMED, portable_config, write_summary
from flearning.recipes.run_record import machine_facts
from flearning.recipes.tracking import NO_TRACKING, RunTracker, check_trackers, scalars

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


@dataclass
class Primed:
    """θ of one (dataset, seed): the base model taught the old facts, shared by every method. Its
    weights are loaded (or trained) on first use only: a bench whose runs are all cached, from an
    earlier sitting whose cache kept only its JSON files (the shipped results' ``cache/``), needs none."""

    dataset: str
    seed: int
    key: str  # its cache key, part of every key derived from it
    info: dict[str, Any]  # prime.json: accuracy before and after, epochs, ...
    make: Callable[[], tuple[PreTrainedModel, dict[str, Any]]] = dataclasses.field(repr=False)
    _model: PreTrainedModel | None = dataclasses.field(default=None, repr=False)

    @property
    def model(self) -> PreTrainedModel:
        if self._model is None:
            self._model, info = self.make()
            self.info = {**info, **self.info}  # what was recorded first wins (a retrained θ's seconds)
        return self._model


@dataclass
class Split:
    """Records runs from θ are evaluated on (``eval``: the reported records, ``val``: the validation
    split λ is chosen on), with θ's predictions on them (Locality's reference, computed on first use)."""

    theta: Primed
    name: str
    records: list[KnowledgeRecord]
    make_reference: Callable[[], Any] = dataclasses.field(repr=False)
    _reference: Any = dataclasses.field(default=None, repr=False)

    @property
    def reference(self) -> Any:
        if self._reference is None:
            self._reference = self.make_reference()
        return self._reference


class Bench:
    """Runs the protocol for one config; ``run()`` returns the summary written to ``out``."""

    def __init__(self, cfg: BenchConfig, *, progress: bool = True) -> None:
        self.cfg = cfg
        self.progress = progress
        check_trackers(cfg.report_to)  # report_to: every tracker's library is there (before any work)
        self.tracker: RunTracker = NO_TRACKING  # report_to's trackers, while run() runs
        self.out = default_out(cfg)
        self.cache = Cache(self.out / "cache")
        self.machine = machine_facts()  # where this process measures: in every run record it writes
        # dataset -> (evaluated records, validation records); filled by setup()
        self.datasets: dict[str, tuple[list[KnowledgeRecord], list[KnowledgeRecord]]] = {}
        # dataset -> the field its old answers were read from (a ZsRE file: pred or answers; else None)
        self.old_fields: dict[str, str | None] = {}
        self.base = self.tokenizer = None  # θ₀, filled by setup()
        self.held_out = None  # PerplexityCorpus, filled by setup() (None: perplexity: null)
        self.base_fp = ""
        self.runs: list[RunRecord] = []
        self.primes: dict[str, list[dict[str, Any]]] = {}
        self.chosen_lambda: dict[str, dict[str, dict[int, float]]] = {}
        self.counters = {
            "trained_prime": 0,
            "trained_forget": 0,
            "trained_learn": 0,
            "edits": 0,  # edit steps of ROME, MEMIT, AlphaEdit (in place of a learning stage)
            "cached_runs": 0,
        }

    # ---- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        """Load every dataset (refusing one too small for n + n_val) and the base model θ₀."""
        from flearning.data import load_combined
        from flearning.data.templates import check_template
        from flearning.models import load_model, model_fingerprint

        for name, path in self.cfg.data.items():
            files = path if isinstance(path, list) else [path]
            ds = load_combined(
                files, fields=self.cfg.fields, split=self.cfg.split, zsre_old=self.cfg.zsre_old
            )
            self.old_fields[name] = ds.zsre_old
            need = self.cfg.n + self.cfg.n_val
            if len(ds.records) < need:
                raise FlearnError(
                    f"{' + '.join(map(str, files))}: {len(ds.records)} usable records, the bench needs "
                    f"n + n_val = {need}"
                )
            self.datasets[name] = (ds.records[: self.cfg.n], ds.records[self.cfg.n : need])
            if self._edit_plans():  # an editor writes these facts: each needs its subject (before any work)
                from flearning.recipes.edit import check_requests

                check_requests(ds.records[:need], ds.locations[:need])
        # the held-out text θ and every run are scored on (general ability); a bad corpus fails here
        self.held_out = self.cfg.perplexity.load() if self.cfg.perplexity is not None else None
        start = time.perf_counter()
        self.base, self.tokenizer = load_model(self.cfg.model, trust_remote_code=self.cfg.trust_remote_code)
        check_template(self.tokenizer, self.cfg.template)  # chat: the tokenizer has a chat template
        self.base_fp = model_fingerprint(self.base)
        for plan in self._edit_plans():  # the editors' layers exist in this model, C's corpus is readable
            from flearning.recipes.edit import check_corpus, check_edit_target

            check_edit_target(self.base.config, plan)
            check_corpus(plan)
        log.info(
            "bench: base model loaded in %.1f s (fingerprint %s)", time.perf_counter() - start, self.base_fp
        )

    def _edit_plans(self) -> list[Any]:
        """The edit step of each method of the bench that has an editor (``config.EditPlan``)."""
        methods = [METHODS[m] for m in self.cfg.methods if METHODS[m].editor is not None]
        return [self.cfg.stage_plan(m, 0).edit for m in methods]

    def planned_runs(self) -> int:
        cfg = self.cfg
        runs = 0
        for dataset in cfg.data:
            for m in cfg.methods:
                if METHODS[m].forget is None:
                    runs += 1
                else:
                    runs += (
                        1 + len(cfg.lambda_grid)
                        if cfg.lambdas == "auto"
                        else len(cfg.method_lambdas(dataset, m))
                    )
            runs += 1 if cfg.lambdas == "auto" else 0  # the ft baseline on validation
        if cfg.lambdas != "auto" or cfg.lambda_choice == "each_seed":
            return runs * len(cfg.seeds)
        validation = sum(len(cfg.lambda_grid) for _ in cfg.data for m in cfg.methods if METHODS[m].forget)
        validation += len(cfg.data)  # the ft baselines
        return runs * len(cfg.seeds) - validation * (len(cfg.seeds) - 1)

    # ---- stages ----------------------------------------------------------------------------------
    def primed(self, dataset: str, seed: int, records: list[KnowledgeRecord]) -> Primed:
        """θ for (dataset, seed), trained once and cached as a safetensors model directory; its weights
        are loaded, or trained, when a run first needs them (``Primed.model``)."""
        p = self.cfg.prime
        cfg = p.train_config(seed, self.cfg.template)
        key = prime_key(self.base_fp, records, cfg, p.threshold)
        path = self.cache.primed_dir(key)
        info_path = path / "prime.json"
        # prime.json is kept even where the weights are not (a cache shipped without its safetensors)
        info = dict(json.loads(info_path.read_text()), dataset=dataset) if info_path.is_file() else {}

        def make() -> tuple[PreTrainedModel, dict[str, Any]]:
            if self.cache.has_primed_model(key):
                from flearning.models import load_model

                model, _ = load_model(path)
                return model, dict(json.loads(info_path.read_text()), dataset=dataset)  # as for runs
            return self._train_primed(dataset, seed, records, cfg, key, recorded=info)

        theta = Primed(dataset, seed, key, info, make)
        if not info:
            theta.model  # noqa: B018 (trained now: its prime.json is part of every report)
        return theta

    def _train_primed(
        self,
        dataset: str,
        seed: int,
        records: list[KnowledgeRecord],
        cfg: Any,
        key: str,
        recorded: dict[str, Any],
    ) -> tuple[PreTrainedModel, dict[str, Any]]:
        """Train θ and cache it. ``recorded``: the prime.json of a cache that kept it without the weights
        (kept as it is: the retrained θ is the same model, its first training's record stands)."""
        from flearning.recipes.prime import prime, save_primed

        threshold = self.cfg.prime.threshold
        model = copy.deepcopy(self.base)
        scope = self.tracker.scoped(f"{dataset}/seed{seed}")
        result = prime(
            model,
            self.tokenizer,
            records,
            cfg,
            threshold=threshold,
            progress=self.progress,
            on_stats=scope.stage("prime"),
        )
        scope.stage_done(len(result.losses))
        self.counters["trained_prime"] += 1
        info = {
            "dataset": dataset,
            "seed": seed,
            "accuracy_before": result.accuracy_before,
            "accuracy": result.accuracy,
            "epochs": result.epochs,
            "seconds": result.seconds,
            "machine": self.machine,
            "history": result.history,
            "key": key,
        }
        if recorded:
            info = {**recorded, "dataset": dataset}
        save_primed(self.cache.primed_dir(key), model, self.tokenizer, info)
        return model, info

    def split(self, theta: Primed, name: str, records: list[KnowledgeRecord]) -> Split:
        from flearning.evaluation import reference_predictions

        def make_reference() -> Any:
            return reference_predictions(
                theta.model,
                self.tokenizer,
                records,
                batch_size=self.cfg.eval_batch_size,
                template=self.cfg.template,
            )

        return Split(theta, name, records, make_reference)

    def run_one(self, split: Split, method_name: str, lam: float | None) -> RunRecord:
        """One method (at one λ) from θ on a split, evaluated; cached, and its Δ_old cached apart."""
        from flearning.evaluation.evaluate import evaluate
        from flearning.recipes.algorithm import run_method

        theta = split.theta
        method = get_method(method_name)
        lam = lam if method.forget else None
        plan = self.cfg.stage_plan(method, theta.seed, lam)
        key = run_key(
            theta.key,
            split.records,
            method_name,
            lam,
            plan.learn,
            plan.forget,
            generation=self.cfg.generation,
            fluency=self.cfg.fluency,
            split=split.name,
            perplexity=self._perplexity_key(split),
            edit=plan.edit.to_json() if plan.edit is not None else None,
            template=self.cfg.template,
        )
        scope = self.tracker.scoped(_run_scope(split, method_name, lam))
        cached = self.cache.load_run(key)
        if cached is not None:
            # keys do not hold the dataset's name: two names of the same records share their runs, and a
            # run read back is this dataset's (not the name it was first cached under)
            cached = dataclasses.replace(cached, dataset=theta.dataset)
            self.counters["cached_runs"] += 1
            scope.log(scalars("eval", cached.result().summary()))
            return cached
        outcome = run_method(
            method,
            copy.deepcopy(theta.model),
            self.tokenizer,
            [r.old_pair for r in split.records],
            [r.new_pair for r in split.records],
            plan,
            progress=self.progress,
            vector_metadata={"method": f"forget-{method.forget}"},
            # Δ_old depends on θ, the split and the forget stage only: shared by every λ and by the
            # methods that forget alike (flearning-lora and flearning-lora-ft)
            forget_cache=(
                self.cache.vector_dir(forget_key(theta.key, split.name, plan.forget)) if plan.forget else None
            ),
            tracker=scope,
            records=split.records,  # what an editor writes (their subjects)
        )
        if outcome.forget is not None and outcome.forget.trained:
            self.counters["trained_forget"] += 1
        self.counters["edits" if outcome.edit is not None else "trained_learn"] += 1
        seconds = dict(outcome.timings)
        start = time.perf_counter()
        result = evaluate(
            outcome.model,
            self.tokenizer,
            split.records,
            reference=split.reference,
            batch_size=self.cfg.eval_batch_size,
            generation=self.cfg.generation,
            fluency=self.cfg.fluency,
            fluency_sampled=self.cfg.fluency,  # both Fluencies: greedy and ROME/EasyEdit's sampled
            perplexity=self.held_out if split.name == "eval" else None,  # λ is chosen on the metrics
            progress=False,
            seed=theta.seed,
            template=self.cfg.template,
        )
        seconds["evaluate"] = time.perf_counter() - start
        run = RunRecord(
            theta.dataset,
            theta.seed,
            method_name,
            lam,
            split.name,
            result.records,
            {k: round(v, 3) for k, v in seconds.items()},
            perplexity=result.perplexity,
            template=self.cfg.template,
            zsre_old=self.old_fields.get(theta.dataset),
            machine=self.machine,
        )
        self.cache.save_run(key, run)
        scope.log(scalars("eval", result.summary()))
        return run

    def _perplexity_key(self, split: Split) -> dict[str, Any] | None:
        """What a run's perplexity depends on, for its cache key (None: not measured on this split)."""
        if self.held_out is None or split.name != "eval":
            return None
        return self.cfg.perplexity.model_dump(mode="json")

    # ---- the protocol ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Set up, run the protocol (every stage and run logged to ``report_to``'s trackers), write."""
        self.setup()
        self.tracker = self._start_tracking()
        try:
            return self._protocol()
        finally:
            self.tracker.finish()

    def _start_tracking(self) -> RunTracker:
        """The bench's trackers (``recipes.tracking``): one run for all its stages and runs, named
        ``run_name`` or the bench directory's name; local files in ``logging_dir``, else its ``logs/``."""
        cfg = self.cfg
        if not cfg.report_to:
            return NO_TRACKING
        return RunTracker(
            cfg.report_to,
            run_name=cfg.run_name or self.out.resolve().name,
            logging_dir=cfg.logging_dir or self.out / "logs",
            config=portable_config(cfg.model_dump(mode="json")),
            mlflow_artifacts=True,
        )

    def _protocol(self) -> dict[str, Any]:
        from flearning.io.progress import progress_bar

        started = time.perf_counter()
        bar = progress_bar(total=self.planned_runs(), desc="bench runs", unit="run", enabled=self.progress)
        for dataset, (evaluated, validation) in self.datasets.items():
            for seed in self.cfg.seeds:
                theta = self.primed(dataset, seed, [*evaluated, *validation])
                split = self.split(theta, "eval", evaluated)
                primed_eval = self._primed_eval(split)
                measured = primed_eval.perplexity  # θ's general ability, without how it was obtained
                how = ("seconds", "cached")
                perplexity = {k: v for k, v in measured.items() if k not in how} if measured else None
                info = dict(theta.info, metrics=primed_eval.summary(), perplexity=perplexity)
                primed_scope = self.tracker.scoped(f"{dataset}/seed{seed}/primed")
                primed_scope.log(scalars("eval", primed_eval.summary()))
                self.primes.setdefault(dataset, []).append(info)
                primed_run = RunRecord(dataset, seed, PRIMED, None, "eval", primed_eval.records)
                primed_run.perplexity = primed_eval.perplexity
                primed_run.template, primed_run.zsre_old = self.cfg.template, self.old_fields.get(dataset)
                self.runs.append(primed_run)
                chosen = self._auto_lambdas(theta, validation, bar) if self.cfg.lambdas == "auto" else {}
                for method_name in self.cfg.methods:
                    method = METHODS[method_name]
                    lams = (
                        [None]
                        if method.forget is None
                        else (
                            [chosen[method_name]]
                            if self.cfg.lambdas == "auto"
                            else self.cfg.method_lambdas(dataset, method_name)
                        )
                    )
                    for lam in lams:
                        bar.set_postfix_str(f"{dataset} seed {seed} {method_name} λ={lam}")
                        self.runs.append(self.run_one(split, method_name, lam))
                        bar.update(1)
                del theta, split
        bar.close()
        wall = time.perf_counter() - started
        return self.write(wall)

    def _primed_eval(self, split: Split) -> Any:
        """θ evaluated on the evaluated records (the reports' primed row), cached like a run."""
        from flearning.evaluation.evaluate import evaluate

        theta = split.theta
        key = primed_eval_key(
            theta.key,
            split.records,
            generation=self.cfg.generation,
            perplexity=self._perplexity_key(split),
            template=self.cfg.template,
        )
        cached = self.cache.load_run(key)
        if cached is not None:
            return cached.result()
        start = time.perf_counter()
        result = evaluate(
            theta.model,
            self.tokenizer,
            split.records,
            reference=split.reference,
            batch_size=self.cfg.eval_batch_size,
            generation=self.cfg.generation,
            perplexity=self.held_out,
            cache_dir=self.cache.root / "evaluation",  # θ's perplexity, once
            progress=False,
            seed=theta.seed,
            template=self.cfg.template,
        )
        seconds = {"evaluate": round(time.perf_counter() - start, 3)}
        record = RunRecord(theta.dataset, theta.seed, PRIMED, None, split.name, result.records, seconds)
        record.perplexity, record.machine = result.perplexity, self.machine
        self.cache.save_run(key, record)
        return result

    def _auto_lambdas(self, theta: Primed, validation: list[KnowledgeRecord], bar) -> dict[str, float]:
        """λ per F-Learning method for θ's seed: chosen on its validation split, or with ``lambda_choice:
        first_seed`` the first seed's choice for every later seed (recorded under each seed)."""
        first = self.cfg.seeds[0]
        if self.cfg.lambda_choice == "each_seed" or theta.seed == first:
            return self._choose_lambdas(self.split(theta, "val", validation), bar)
        by_method = self.chosen_lambda.get(theta.dataset, {})
        chosen = {method: by_seed[first] for method, by_seed in by_method.items()}
        for method, lam in chosen.items():
            by_method[method][theta.seed] = lam
        return chosen

    def _choose_lambdas(self, val: Split, bar) -> dict[str, float]:
        """λ per F-Learning method from the validation split, disjoint from the evaluated records: maximise
        Reliability + Generality on validation, subject to Locality not more than ``locality_tolerance``
        points below the ``ft`` baseline's validation Locality."""
        baseline = self.run_one(val, "ft", None)
        self.runs.append(baseline)
        bar.update(1)
        base_loc = baseline.result().summary()["locality"]["mean"] or 0.0
        chosen: dict[str, float] = {}
        for method_name in self.cfg.methods:
            if METHODS[method_name].forget is None:
                continue
            scored = []
            for lam in self.cfg.lambda_grid:
                run = self.run_one(val, method_name, lam)
                self.runs.append(run)
                bar.update(1)
                s = run.result().summary()
                objective = (s["reliability"]["mean"] or 0) + (s["generality"]["mean"] or 0)
                allowed = (s["locality"]["mean"] or 0) >= base_loc - self.cfg.locality_tolerance
                scored.append((allowed, objective, -lam, lam))
            best = max(scored)  # allowed first, then objective, then the smaller λ on ties
            chosen[method_name] = best[3]
            dataset, seed = val.theta.dataset, val.theta.seed
            self.chosen_lambda.setdefault(dataset, {}).setdefault(method_name, {})[seed] = best[3]
            log.info("bench: %s %s seed %d: λ = %s chosen on validation", dataset, method_name, seed, best[3])
        return chosen

    # ---- reports ---------------------------------------------------------------------------------
    def write(self, wall: float) -> dict[str, Any]:
        """Write the per-dataset reports, ``summary.json`` and ``table.md`` together: all are written in a
        staging directory first and swapped in at the end (``io.atomic.atomic_entries``), so ``out`` shows
        the previous bench's results or this one's, never a mix. A dataset's existing directory stays:
        only its report files are replaced (an earlier report's files this one does not write are
        removed in the same swap); the user's files beside them are not touched."""
        from flearning.evaluation.report import REPORT_FILES
        from flearning.io.atomic import atomic_entries

        stale = [f"{dataset}/{name}" for dataset in self.datasets for name in REPORT_FILES]
        with atomic_entries(self.out, stale=stale) as staging:
            return write_summary(
                staging,
                self.cfg,
                self.runs,
                list(self.datasets),
                wall=wall,
                machine=self.machine,
                base_fingerprint=self.base_fp,
                counters=self.counters,
                old_fields=self.old_fields,
                primes=self.primes,
                chosen_lambda=self.chosen_lambda,
            )


def default_out(cfg: BenchConfig) -> Path:
    """Where a bench writes: ``cfg.out``, else ``runs/bench``."""
    return Path(cfg.out).expanduser() if cfg.out else Path("runs/bench")


def run_bench(
    cfg: BenchConfig, *, progress: bool = True, inputs: dict[str, Path | None] | None = None
) -> dict[str, Any]:
    """Python API of ``flearn bench``.

    Its directory follows the output rule (``io.output``): never an input (``inputs``, e.g. the config
    file, besides the data and the model) or a directory holding one; none of the entries it writes may
    be another's (a directory that is not an earlier bench's holding a ``summary.json`` is refused); an
    earlier bench's directory is continued (its cache makes the rerun resume). The bench holds the
    directory's lock from here to its end, and removes what killed runs left in it.
    """
    from flearning.io.output import claim_output, output_kind, write_marker

    out = default_out(cfg)
    given = {}
    for name, paths in cfg.data.items():
        files = paths if isinstance(paths, list) else [paths]
        for k, path in enumerate(files):
            given[f"data ({name})" if len(files) == 1 else f"data ({name}, file {k + 1})"] = path
    rule = {
        "kind": "bench",
        "inputs": {**given, "model": cfg.model, **(inputs or {})},
        "overwrite": False,
        "whole": False,
        "entries": [
            "summary.json",
            "table.md",
            "cache",
            *cfg.data,
            *(["logs"] if cfg.report_to and cfg.logging_dir is None else []),  # the trackers' files
        ],
        "rerun": True,
    }
    with claim_output(out, within=[out / "cache"], **rule) as target:
        if output_kind(target) != "bench":  # recognisable from the start: a killed bench is continued
            target.mkdir(parents=True, exist_ok=True)
            write_marker(target, "bench")
        return Bench(cfg, progress=progress).run()


def _run_scope(split: Split, method_name: str, lam: float | None) -> str:
    """Where a run's scalars go in the bench's tracking run: ``zsre/seed0/flearning-ft/lambda0.7/``
    (the validation runs of ``lambdas: auto`` under ``zsre/seed0/val/``)."""
    theta = split.theta
    parts = [theta.dataset, f"seed{theta.seed}", *(["val"] if split.name == "val" else []), method_name]
    if lam is not None:
        parts.append(f"lambda{lam:g}")
    return "/".join(parts)
