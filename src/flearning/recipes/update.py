"""The ``flearn update`` recipe: setup → (evaluate θ) → forget → learn → evaluate θ* → save.

``UpdateRecipe`` keeps the run's state on itself: ``__init__`` checks the settings, ``setup`` loads the
data and the model, ``run`` trains and evaluates, ``save`` writes the output directory atomically (its
layout: ``UpdateRecipe.save``). Finished stages wait in ``<out>.partial/`` until the output is in place,
so that rerunning an interrupted update resumes it (``recipes/work_dir.py``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flearning.config import UpdateConfig, build_config, lambda_notes, stage_plan
from flearning.distributed import is_main_process, on_main_process
from flearning.errors import FlearnError
from flearning.io.atomic import atomic_directory
from flearning.methods import get_method
from flearning.recipes.algorithm import MethodOutcome, run_method
from flearning.recipes.run_record import data_record, model_card, resumed_stages, run_summary
from flearning.recipes.tracking import NO_TRACKING, RunTracker, check_trackers, scalars
from flearning.recipes.work_dir import (
    ResumeMode,
    check_work_dir_path,
    close_after_failure,
    open_work_dir,
    run_identity,
    work_dir_for,
)
from flearning.sharding import all_finite, fsdp2_requested, is_sharded, whole_state

log = logging.getLogger(__name__)


@dataclass
class UpdateResult:
    out: Path | None
    summary: dict[str, Any]  # run.json content
    outcome: MethodOutcome
    records: list[Any] = field(default_factory=list)  # the new facts (KnowledgeRecord)
    before: Any = None  # EvalResult of θ on them (None without evaluation)
    after: Any = None  # EvalResult of θ*


class NonFiniteModelError(FlearnError):
    """The updated model has NaN/inf weights; nothing is written."""


class UpdateRecipe:
    """One update, as a recipe: ``__init__`` checks the settings, ``setup`` loads the data and the model
    and opens the work directory, ``run`` evaluates θ, forgets, learns and evaluates θ*, ``save`` writes
    the output. Everything that can fail on bad input fails before any training."""

    def __init__(
        self,
        cfg: UpdateConfig,
        *,
        progress: bool = True,
        resume: ResumeMode = "auto",
        inputs: dict[str, Path | None] | None = None,
    ) -> None:
        if resume not in ("auto", "resume", "restart"):
            raise ValueError(f"resume must be auto, resume or restart, not {resume!r}")
        self.cfg = cfg
        self.inputs = dict(inputs or {})  # inputs besides the model and the data (the config file)
        self.progress = progress
        self.resume = resume
        self.method = get_method(cfg.method)
        self.plan = stage_plan(cfg)
        self.old_file, self.new_file = cfg.data_files()
        self.timings: dict[str, float] = {}
        for note in lambda_notes(cfg):
            log.warning(note)
        check_tracking(cfg)  # report_to: every tracker's library is there (before any work)
        # set by setup()
        self.data = None  # UpdateData: the facts, one file or a split pair joined
        self.old_ds = self.new_ds = None  # LoadedDataset
        self.records: list[Any] = []  # the facts learned and evaluated (KnowledgeRecord), both targets
        self.truncated: list[Any] = []  # data.context.TooLong: prompts cut to fit (truncate)
        self.resumed: dict[str, str] = {}  # stage -> how it resumes an earlier process's work
        self.old_pairs: list[tuple[str, str]] = []
        self.new_pairs: list[tuple[str, str]] = []
        self.model_source = ""  # cfg.model resolved (a directory or a hub id)
        self.out: Path | None = None
        self.model = self.tokenizer = None
        self.base_fp = ""  # θ's fingerprint
        self.theta: dict[str, Any] | None = None  # θ's parameters, for update_vector/
        self.vector_meta: dict[str, Any] = {}  # provenance of Δ_old and of update_vector/
        self.work: Path | None = None  # <out>.partial, while the update runs
        # set by run()
        self.tracker: RunTracker = NO_TRACKING  # report_to's trackers, while run() runs
        self.logs: Path | None = None  # the trackers' local files in the work directory, for <out>/logs
        self.reference = self.before = self.after = None
        self.outcome: MethodOutcome | None = None
        # held-out passages θ and θ* are scored on (general ability: perplexity), read by setup()
        self.perplexity_corpus = None

    # ---- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        self._setup_data()
        self._fit_context(*tokenizer_and_config(self.cfg))  # before the output is touched
        self._setup_output()
        self._setup_model()
        self._setup_work_dir()

    def _setup_data(self) -> None:
        """The facts (one file, or a split pair joined: ``data.joining``), checked before anything else
        is loaded; conflicting edits (one prompt, two new targets) are warned about."""
        from flearning.data import load_update_data
        from flearning.data.summary import conflicting_edits

        cfg = self.cfg
        self.data = load_update_data(
            self.old_file,
            self.new_file,
            cfg.format,
            limit=cfg.limit,
            fields=cfg.fields,
            split=cfg.split,
            zsre_old=cfg.zsre_old,
        )
        self.old_ds, self.new_ds = self.data.old, self.data.new
        self._use_records(self.data.records)
        for note in conflicting_edits(self.data.records, self.data.locations):
            log.warning(note)
        if self.plan.edit is not None:  # an editor: every fact has its subject, and C's corpus is readable
            from flearning.recipes.edit import check_corpus, check_requests

            if fsdp2_requested():
                raise FlearnError(
                    f"{self.method.name} cannot run under FSDP2: the editors need the whole weights of the "
                    "edited layers; run it in one process (or with DDP)"
                )
            check_requests(self.records, self.data.locations)
            check_corpus(self.plan.edit)
        stop = self.plan.stop
        if stop is not None and stop.max_locality_drop is not None:  # a bad probe file fails here, not later
            from flearning.data.probes import load_probe_pairs

            load_probe_pairs(stop.locality_probes)
        if cfg.evaluate and cfg.perplexity is not None:  # a bad corpus fails here, not after training
            self.perplexity_corpus = cfg.perplexity.load()

    def _setup_output(self) -> None:
        """Check the output (``io.output``'s rule) and, on the main process, take its lock for the whole
        run (a second run on it exits 2) and remove what killed runs of it left behind."""
        from flearning.io.output import claim_output
        from flearning.models import resolve_model

        self.model_source = resolve_model(self.cfg.model)
        if self.cfg.out is not None:
            same = self.new_file == self.old_file
            data = (
                {"data": self.old_file} if same else {"old facts": self.old_file, "new facts": self.new_file}
            )
            inputs = {"model": self.model_source, **data, **self.inputs}
            if self.perplexity_corpus is not None:  # held-out text, read before and after
                from flearning.evaluation.corpus import corpus_path

                inputs["perplexity corpus"] = corpus_path(self.perplexity_corpus.corpus)

            def claim() -> Path:
                self._claim = claim_output(
                    self.cfg.out,
                    kind="update",
                    inputs=inputs,
                    overwrite=self.cfg.overwrite,
                    within=[work_dir_for(Path(self.cfg.out).expanduser().resolve())],
                )
                return self._claim.path

            self.out = on_main_process(claim)
            check_work_dir_path(self.out)

    def _use_records(self, records: list[Any]) -> None:
        self.records = list(records)
        self.old_pairs = [r.old_pair for r in self.records]
        self.new_pairs = [r.new_pair for r in self.records]

    def _fit_context(self, tokenizer, model_config) -> None:
        """Every text of the facts fits the model's context (``data.context``, the one rule): else exit 2
        naming file, record and field, or with ``truncate`` the prompts are cut (and named in a warning)."""
        from flearning.data.context import check_context, context_limit
        from flearning.data.templates import check_template

        check_template(tokenizer, self.cfg.template)  # chat: the tokenizer has a chat template
        limit = context_limit(model_config)
        records, cut = check_context(
            self.records,
            tokenizer,
            limit,
            self.data.locations,
            truncate=self.cfg.truncate,
            template=self.cfg.template,
        )
        if cut:
            positions, name = limit
            for item in cut:
                log.warning(
                    "%s:%s: %s; its prompt was cut from the left to fit (truncate)",
                    item.where,
                    item.field,
                    item.message(positions, name),
                )
        self.truncated = cut
        self._use_records(records)
        if self.plan.edit is not None:  # the editors' layers exist in this model (from its config)
            from flearning.recipes.edit import check_edit_target, check_requests

            check_edit_target(model_config, self.plan.edit)
            if cut:  # a prompt cut from the left may have lost its subject
                check_requests(self.records, self.data.locations)

    def _setup_model(self) -> None:
        from flearning.models import load_model, model_fingerprint

        start = time.perf_counter()
        try:
            self.model, self.tokenizer = load_model(
                self.model_source, trust_remote_code=self.cfg.trust_remote_code
            )
        except (OSError, ValueError) as ex:  # e.g. a model directory without tokenizer files
            raise FlearnError(f"cannot load the model or its tokenizer from '{self.cfg.model}': {ex}") from ex
        self.timings["load_model"] = time.perf_counter() - start
        self.base_fp = model_fingerprint(self.model)
        # for update_vector/ = θ* − θ; under FSDP2 only the main process, which writes it, keeps θ
        if self.out is not None and self.cfg.save_vectors and (is_main_process() or not fsdp2_requested()):
            self.theta = {k: v.detach().clone() for k, v in self.model.named_parameters()}
        self.vector_meta = {
            "base_model": self.cfg.model,
            "base_fingerprint": self.base_fp,
            "method": self.method.name,
            "data_hash": self.old_ds.sha256,
            "hyperparameters": self.plan.forget.model_dump(mode="json") if self.plan.forget else {},
        }

    def _setup_work_dir(self) -> None:
        from flearning.io.atomic import write_errors_as_flearn

        if self.out is None:
            return
        subjects = [r.subject for r in self.records]
        identity = run_identity(
            self.method, self.plan, self.base_fp, self.old_pairs, self.new_pairs, subjects
        )
        with write_errors_as_flearn(work_dir_for(self.out), what=f"the work directory of {self.out}"):
            self.work = on_main_process(open_work_dir, self.out, identity, self.resume)
        self.resumed = on_main_process(resumed_stages, self.work)

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Around ``run`` and ``save``: write errors name the output, and after a failure the work
        directory is kept for a rerun or discarded (``work_dir.close_after_failure``)."""
        from flearning.io.atomic import write_errors_as_flearn
        from flearning.training import TrainingDivergedError
        from flearning.vectors.ops import VectorError

        writes, note = [], ""
        if self.out is not None:
            writes = [self.out, work_dir_for(self.out)]  # an error on any other path is not ours
            note = (
                "The previous output (if any) is untouched; finished training stages (if any) are kept in "
                f"{self.work}: rerun the same command to resume."
            )
        try:
            with write_errors_as_flearn(writes, what="the output", note=note):
                try:
                    yield
                finally:  # a failed run's log is closed before its work directory is kept or removed
                    self.tracker.finish()
        except (TrainingDivergedError, VectorError, NonFiniteModelError):
            if self.work is not None:
                close_after_failure(self.work, resumable=False)
            raise
        except BaseException:
            if self.work is not None:
                close_after_failure(self.work, resumable=True)
            raise

    # ---- run -------------------------------------------------------------------------------------
    def run(self) -> None:
        """(evaluate θ) → forget → learn → check θ* is finite → (evaluate θ*); each step's scalars to
        the run's trackers (``report_to``)."""

        from flearning.training.checkpoint import Checkpointing

        self._start_tracking()
        if self.cfg.evaluate:
            from flearning.evaluation import reference_predictions

            start = time.perf_counter()
            self.reference = reference_predictions(
                self.model,
                self.tokenizer,
                self.records,
                batch_size=self.cfg.eval_batch_size,
                template=self.cfg.template,
            )
            self.timings["reference"] = time.perf_counter() - start
            self.before = self._evaluate(self.model, "before")
            self.tracker.log(scalars("eval/before", self.before.summary()))

        work, every = self.work, self.cfg.checkpoint_every
        self.outcome = run_method(
            self.method,
            self.model,
            self.tokenizer,
            self.old_pairs,
            self.new_pairs,
            self.plan,
            progress=self.progress,
            vector_metadata=self.vector_meta,
            # where the stages keep their work for a rerun (work_dir.py); none without an output
            forget_cache=work / "knowledge_vector" if work else None,
            forget_trace=work / "forget.json" if work else None,
            forget_checkpoint=Checkpointing(work / "forget", every=every) if work else None,
            adapter_dir=work / "adapter" if work else None,  # copied into the output
            learn_checkpoint=Checkpointing(work / "learn", every=every) if work else None,
            eval_batch_size=self.cfg.eval_batch_size,
            tracker=self.tracker,
            records=self.records,  # what an editor writes (their subjects)
            vector_files=self.cfg.vector_files,  # Δ_old kept whole or a block at a time
        )
        self.timings.update(self.outcome.timings)
        if not all(all_finite(p) for p in self.outcome.model.parameters()):  # every shard, under FSDP2
            raise NonFiniteModelError("the updated model has non-finite weights; nothing was written")
        if self.cfg.evaluate:
            self.after = self._evaluate(self.outcome.model, "after")
            self.tracker.log(scalars("eval/after", self.after.summary()))
        self.tracker.finish()

    def _start_tracking(self) -> None:
        """The run's trackers (``recipes.tracking``), on the main process. Their local files go to
        ``logging_dir``, else to the work directory's ``logs/``, copied into the output's ``logs/``: a
        resumed update continues them there."""
        cfg = self.cfg
        if not cfg.report_to:
            return
        logging_dir = cfg.logging_dir
        if logging_dir is None and self.work is not None:
            logging_dir = self.logs = self.work / "logs"
        self.tracker = RunTracker(
            cfg.report_to,
            run_name=cfg.run_name or (self.out.name if self.out is not None else "flearn-update"),
            logging_dir=logging_dir,
            config=cfg.model_dump(mode="json", by_alias=True),
            mlflow_artifacts=cfg.logging_dir is not None,
        )

    def _evaluate(self, evaluated, when: str):
        """Every metric on the new facts, Locality against θ (the model before the update), and the
        perplexity on held-out text (general ability) unless ``perplexity`` is null."""
        from flearning.evaluation.evaluate import evaluate
        from flearning.models import cache_root

        start = time.perf_counter()
        result = evaluate(
            evaluated,
            self.tokenizer,
            self.records,
            reference=self.reference,
            batch_size=self.cfg.eval_batch_size,
            generation=self.cfg.generation,
            perplexity=self.perplexity_corpus,
            # θ's perplexity is measured once per base model and corpus (evaluation's disk cache)
            cache_dir=cache_root() / "evaluation" if when == "before" else None,
            progress=self.progress,
            template=self.cfg.template,
        )
        self.timings[f"evaluate_{when}"] = time.perf_counter() - start
        return result

    # ---- save ------------------------------------------------------------------------------------
    def save(self) -> UpdateResult:
        """The run summary; with an output directory, written there atomically (``run.json`` last):

        config.json, model.safetensors, tokenizer files   θ* (Hugging Face format)
        knowledge_vector/    Δ_old of F-Learning methods (safetensors + JSON; not with save_vectors=false):
                             vector.safetensors, or with vector_files=sharded one
                             vector-0000i-of-0000n.safetensors per decoder block (+ one for the rest)
        update_vector/       θ* − θ: apply it to θ to replay the whole update (not with save_vectors=false);
                             files as knowledge_vector/
        edit_vector/         ΔW of an editor (ROME, MEMIT, AlphaEdit) alone, on θ or θ' (not with
                             save_vectors=false); for the baselines it equals update_vector/
        adapter/             the LoRA adapter of a LoRA learning stage
        report/              evaluation of θ (before) and θ* (after), when evaluated
        logs/                the experiment trackers' local files (report_to; not with logging_dir)
        run.json             resolved config, versions, hashes, timings, losses, metrics
        README.md            model card
        """
        outcome = self.outcome
        data = {
            "old": data_record(self.old_file, self.old_ds),
            "new": data_record(self.new_file, self.new_ds),
            "facts": len(self.records),
            "joined_by": self.data.joined_by,
            "truncated": [item.to_json() for item in self.truncated],
        }
        if self.data.dropped:
            data["dropped_after_joining"] = self.data.dropped
        summary = run_summary(
            self.cfg,
            self.method,
            self.plan,
            model={"source": self.cfg.model, "path": self.model_source, "fingerprint": self.base_fp},
            data=data,
            timings=self.timings,
            outcome=outcome,
            before=self.before,
            after=self.after,
            resumed=self.resumed,
        )
        if self.out is not None:  # by the main process only; the others wait until it is in place
            # under FSDP2 the weights are gathered onto the main process first, one tensor at a time
            self.whole = whole_state(outcome.model) if is_sharded(outcome.model) else None
            summary["timings_seconds"]["save"] = on_main_process(self._write_output, summary)
            self.whole = None
            if outcome.adapter_dir is not None:
                outcome.adapter_dir = self.out / "adapter"
        if self.work is not None:  # the output is in place: nothing is left to resume
            on_main_process(shutil.rmtree, self.work, ignore_errors=True)
        if getattr(self, "_claim", None) is not None:  # the output's lock (main process): the next run's
            self._claim.release()
        return UpdateResult(
            out=self.out,
            summary=summary,
            outcome=outcome,
            records=list(self.records),
            before=self.before,
            after=self.after,
        )

    def _write_output(self, summary: dict[str, Any]) -> float:
        """Write the output directory atomically (``run.json`` last); returns the seconds it took."""
        start = time.perf_counter()
        with atomic_directory(self.out, kind="update", overwrite=self.cfg.overwrite) as stage_dir:
            self._write_into(stage_dir, summary)
            summary["timings_seconds"]["save"] = round(time.perf_counter() - start, 3)
            (stage_dir / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info("wrote %s", self.out)
        return summary["timings_seconds"]["save"]

    def _write_into(self, stage_dir: Path, summary: dict[str, Any]) -> None:
        from flearning.evaluation import write_report
        from flearning.vectors import KnowledgeVector, Provenance
        from flearning.vectors.vector import save_difference_sharded

        outcome, model = self.outcome, self.outcome.model
        whole = getattr(self, "whole", None)  # θ*'s gathered weights under FSDP2
        model.save_pretrained(stage_dir, safe_serialization=True, state_dict=whole)
        self.tokenizer.save_pretrained(stage_dir)
        if outcome.adapter_dir is not None:  # saved in the work directory by the LoRA learning stage
            shutil.copytree(outcome.adapter_dir, stage_dir / "adapter")
        if outcome.forget is not None and self.cfg.save_vectors:
            self._write_knowledge_vector(stage_dir / "knowledge_vector")
        if outcome.edit is not None and self.cfg.save_vectors:  # ΔW, on the model it was computed on
            base = (
                self.cfg.model
                if outcome.forget is None
                else f"θ' = θ − {self.cfg.lam}·Δ_old of {self.cfg.model}"
            )
            provenance = Provenance(base_model=base, data_hash=self.new_ds.sha256)
            outcome.edit.vector(provenance).save(stage_dir / "edit_vector")
        if self.theta is not None:  # kept only with save_vectors
            now = {k: whole[k] if whole is not None else p for k, p in model.named_parameters()}
            meta = dict(
                self.vector_meta, method=f"update:{self.cfg.method}", hyperparameters=summary["stages"]
            )
            if self.cfg.vector_files == "sharded":  # Δ computed and written a block at a time
                save_difference_sharded(now, self.theta, Provenance(**meta), stage_dir / "update_vector")
            else:
                delta = {k: p.detach().float() - self.theta[k].float() for k, p in now.items()}
                KnowledgeVector.from_deltas(delta, Provenance(**meta), kind="full").save(
                    stage_dir / "update_vector"
                )
        if self.before is not None and self.after is not None:
            write_report(
                {"before": [self.before], "after": [self.after]},
                stage_dir / "report",
                title=f"flearn update ({self.cfg.method}): before vs after",
            )
        if self.logs is not None and self.logs.is_dir():  # the trackers' files (report_to)
            shutil.copytree(self.logs, stage_dir / "logs")
        (stage_dir / "README.md").write_text(model_card(summary))

    def _write_knowledge_vector(self, target: Path) -> None:
        """Δ_old as ``vector_files`` says. Sharded: the forget stage's copy in the work directory when it
        is sharded already (under FSDP2 it was written there a block at a time, by every process), else
        written from the whole Δ_old (one process, or read back from a consolidated copy)."""
        from flearning.vectors.files import SHARDED_FORMAT_VERSION, read_record

        forget = self.outcome.forget
        if self.cfg.vector_files == "consolidated":
            forget.whole.save(target)
            return
        kept = self.work / "knowledge_vector" if self.work is not None else None
        sharded = (
            kept is not None
            and (kept / "vector.json").is_file()
            and read_record(kept)[1]["format_version"] == SHARDED_FORMAT_VERSION
        )
        if sharded:
            shutil.copytree(kept, target)
        else:
            forget.whole.save_sharded(target)


def update(
    config: UpdateConfig | None = None,
    *,
    progress: bool = True,
    resume: ResumeMode = "auto",
    inputs: dict[str, Path | None] | None = None,
    **fields: Any,
) -> UpdateResult:
    """Replace old facts by new ones in a causal LM and write the result (Python API of ``flearn update``).

    Args:
        config: an ``UpdateConfig``; or pass its fields as keyword arguments
            (``update(model=..., data=..., method="flearning-ft", out=...)``; ``lam`` is λ).
        progress: progress bars.
        resume: what to do with ``<out>.partial/`` left by an interrupted run: ``auto`` resumes it if it
            was made by the same run (else refuses, naming what differs), ``resume`` also requires it to
            exist, ``restart`` discards it.
        inputs: other files the run reads, by what they are (``{"config": path}``: the YAML config), that
            the output rule (``io.output``) protects like the model and the data.
    Returns:
        ``UpdateResult`` with the output directory, the run summary and the in-memory updated model.
    Raises:
        ConfigError: invalid fields, every problem at once (``update():learn.lr: ...``).
        FlearnError: bad input (config, data, model, output path), a diverged loss, non-finite weights,
            a disk that is full or not writable; nothing is written to ``out`` then.
    """
    if config is None:
        config = build_config(UpdateConfig, fields, "update()")  # a ConfigError listing every problem
    recipe = UpdateRecipe(config, progress=progress, resume=resume, inputs=inputs)
    recipe.setup()
    with recipe.guard():
        recipe.run()
        return recipe.save()


def check_tracking(cfg: UpdateConfig) -> None:
    """``report_to`` can work: each tracker's library is installed, TensorBoard has a directory to write
    in, and ``logging_dir`` is not inside the output (which is replaced whole when the update ends).

    Raises:
        FlearnError: naming what to install or change.
    """
    if not cfg.report_to:
        return
    check_trackers(cfg.report_to)
    if "tensorboard" in cfg.report_to and cfg.logging_dir is None and cfg.out is None:
        raise FlearnError("report_to tensorboard needs an output directory (out) or a logging_dir")
    if cfg.logging_dir is not None and cfg.out is not None:
        logs, out = Path(cfg.logging_dir).expanduser().resolve(), Path(cfg.out).expanduser().resolve()
        if logs.is_relative_to(out):
            raise FlearnError(
                f"logging_dir {cfg.logging_dir} is inside the output {cfg.out}, which is replaced whole when "
                "the update ends: leave logging_dir unset (the logs then go to the output's logs/) or "
                "choose a directory outside it"
            )


def tokenizer_and_config(cfg: UpdateConfig):
    """The tokenizer and config of ``cfg.model``, without its weights (for the checks before any work).

    Raises:
        FlearnError: the model cannot be found, or its tokenizer or config cannot be loaded.
    """
    from transformers import AutoConfig, AutoTokenizer

    from flearning.models import resolve_model

    source = resolve_model(cfg.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        model_config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as ex:
        raise FlearnError(f"cannot load the model or its tokenizer from '{cfg.model}': {ex}") from ex
    return tokenizer, model_config
