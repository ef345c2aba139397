"""Every run configuration (the loader is ``config.loading``, its names re-exported here): ``flearn update``'s ``UpdateConfig``, ``flearn bench``'s
``BenchConfig`` (with its profiles) and the priming settings ``flearn prime`` shares with the bench.

``load_config`` layers (profile) < YAML file < command-line options < ``key=value`` overrides and reports
every problem at once, as ``source:field: what is wrong``. ``stage_plan`` turns an update config into the
stages' ``TrainConfig``s (``BenchConfig.stage_plan`` for the bench). Every default (stage
hyper-parameters, ε, priming, datasets) is stated here once; the default model is ``models.DEFAULT_MODEL``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetPydanticSchema,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic_core import PydanticCustomError, core_schema

from flearning.config.edit import EditPlan, EditSettings, edit_plan, layer_problem
from flearning.config.loading import (
    build_config as build_config,
)
from flearning.config.loading import (
    config_source as config_source,
)
from flearning.config.loading import (
    load_config as load_config,
)
from flearning.config.loading import (
    parse_overrides as parse_overrides,
)
from flearning.config.loading import (
    read_yaml as read_yaml,
)
from flearning.config.loading import (
    resolve_config_paths as resolve_config_paths,
)
from flearning.config.loading import (
    validation_problems,
)
from flearning.data.fields import mapping_problems
from flearning.data.formats import ZsreOld
from flearning.data.templates import PLAIN, TemplateName
from flearning.errors import ConfigError, FlearnError, Problem
from flearning.evaluation.corpus import DEFAULT_CORPUS, PerplexityCorpus
from flearning.evaluation.definitions import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_PERPLEXITY_MAX_TOKENS,
    DEFAULT_PERPLEXITY_PASSAGES,
)
from flearning.methods import FINE_TUNING, METHODS, Method, get_method
from flearning.models import DEFAULT_MODEL
from flearning.resources import SAMPLE_PREFIX, resolve_sample, sample_path
from flearning.training.config import (
    ConfigBool,
    ConfigFloat,
    ConfigInt,
    LoraSettings,
    Scheduler,
    TrainConfig,
)

# Defaults for the embedded SmolLM2-135M. Full-FT stages keep the paper's lr 5e-5 × 3 epochs.
# LoRA stages need a much larger step to move at all on a 135M model (LoRA at 5e-4 × 3 epochs
# underfitted badly); see the README's "Defaults" section for the measurement.
FULL_STAGE = {"lr": 5e-5, "epochs": 3.0, "batch_size": 8}
LORA_STAGE = {"lr": 1e-3, "epochs": 5.0, "batch_size": 8}
LINF_BOUND = 5e-4  # ε of ft-c: how far a constrained learning stage may move any weight from θ

# The experiment trackers ``report_to`` may name (accelerate's integrations; recipes/tracking.py).
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
TrackerName = Literal["tensorboard", "wandb", "mlflow", "trackio"]


def _tracker_list(value: Any) -> Any:
    """``report_to``: a list, or one text of names separated by commas (``--report-to tensorboard,wandb``,
    ``report_to=wandb``); each name once."""
    if isinstance(value, str):
        value = [name.strip() for name in value.split(",") if name.strip()]
    if isinstance(value, (list, tuple)):
        return list(dict.fromkeys(value))
    return value


def _run_name(value: str) -> str:
    if value in (".", "..") or "/" in value or "\\" in value:
        raise ValueError(f"{value!r} cannot name a run: it is a directory name (no '/', not '.' or '..')")
    return value


ReportTo = Annotated[list[TrackerName], BeforeValidator(_tracker_list)]
RunName = Annotated[str, Field(min_length=1), AfterValidator(_run_name)]


def default_stage(
    kind: str,
    lora: LoraSettings,
    seed: int,
    overrides: dict[str, Any] | None = None,
    *,
    section: str | None = None,
    source: str = "configuration",
    template: str = PLAIN,
) -> TrainConfig:
    """A stage's TrainConfig: the defaults of its kind, then the user's overrides; ``template`` is the
    run's prompt template (``data.templates``), the same for every stage.

    Raises:
        ConfigError: the settings do not make a valid stage; each problem names ``source`` and the
            field as ``section.field`` (e.g. ``run.yaml:learn.scheduler: ...``).
    """
    base = dict(FULL_STAGE if kind == "full" else LORA_STAGE)
    base["seed"] = seed
    base["template"] = template
    base.update(overrides or {})
    if kind == "lora":
        base["lora"] = lora
    try:
        return TrainConfig(**base)
    except ValidationError as ex:
        problems = validation_problems(ex, source)
        if section:
            problems = [
                Problem(p.source, p.record, f"{section}.{p.field}" if p.field else section, p.message)
                for p in problems
            ]
        raise ConfigError(problems) from ex


def template_problem(methods: list[str], template: str) -> str | None:
    """Why ``template`` cannot serve ``methods``, or None: the editors (ROME, MEMIT, AlphaEdit) locate
    the subject and write the fact on the plain prompt, so a method with an editor takes ``plain`` only."""
    editors = [m for m in methods if m in METHODS and METHODS[m].editor is not None]
    if template == PLAIN or not editors:
        return None
    return (
        f"template {template} cannot be used with {', '.join(editors)}: the editors locate the subject and "
        "write the fact on the plain prompt (template plain); run them without a template, or leave them out"
    )


def field_mapping(value: dict[str, str] | None) -> dict[str, str] | None:
    """A ``fields`` setting checked (``data.fields``: the project's fields, non-empty column names)."""
    problems = mapping_problems(value or {})
    if problems:
        raise PydanticCustomError("field_mapping", "{problems}", {"problems": "; ".join(problems)})
    return value or None


def _shipped_sample(value: Any) -> Any:
    """``sample:NAME`` is a file shipped with the package (what the shipped configs use)."""
    if isinstance(value, (str, Path)) and str(value).startswith(SAMPLE_PREFIX):
        try:
            return resolve_sample(value)
        except FlearnError as ex:
            raise ValueError(str(ex)) from None
    return value


class PerplexitySettings(BaseModel):
    """General ability, measured (``evaluation.perplexity``): the model's perplexity on the first
    ``passages`` passages of ``corpus`` (a UTF-8 text file, passages separated by blank lines;
    ``sample:NAME`` a shipped one), each cut to ``max_tokens`` tokens. ``perplexity: null`` skips it."""

    model_config = ConfigDict(extra="forbid")

    corpus: str = Field(DEFAULT_CORPUS, min_length=1)
    passages: ConfigInt = Field(DEFAULT_PERPLEXITY_PASSAGES, ge=1)
    max_tokens: ConfigInt = Field(DEFAULT_PERPLEXITY_MAX_TOKENS, ge=2)

    @field_validator("corpus", mode="before")
    @classmethod
    def _corpus(cls, value: Any) -> Any:
        if isinstance(value, Path):
            value = str(value)
        if isinstance(value, str) and value.startswith(SAMPLE_PREFIX):
            _shipped_sample(value)  # a missing shipped sample is a problem of this field
        return value

    def load(self) -> PerplexityCorpus:
        """The passages (FlearnError when the file is missing, unreadable or empty)."""
        return PerplexityCorpus.load(self.corpus, self.passages, self.max_tokens)


class StageOverrides(BaseModel):
    """Optional per-stage settings; anything left out takes the default of the stage's kind."""

    model_config = ConfigDict(extra="forbid")

    lr: ConfigFloat | None = Field(None, gt=0)
    epochs: ConfigFloat | None = Field(None, gt=0)
    max_steps: ConfigInt | None = Field(None, ge=1)
    batch_size: ConfigInt | None = Field(None, ge=1)
    grad_accum: ConfigInt | None = Field(None, ge=1)
    scheduler: Scheduler | None = None
    warmup_ratio: ConfigFloat | None = Field(None, ge=0, lt=1)
    weight_decay: ConfigFloat | None = Field(None, ge=0)
    max_grad_norm: ConfigFloat | None = Field(None, gt=0)
    add_eos: ConfigBool | None = None
    freeze_embeddings: ConfigBool | None = None
    compile: ConfigBool | None = None

    def given(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class LearnOverrides(StageOverrides):
    """The learning stage's settings: a stage's, plus when it stops (``StopRule``). ``until_accuracy``
    trains until the new facts are held, checked after every epoch, up to ``max_epochs``; ``epochs`` (or
    ``max_steps``) instead fixes the schedule, the paper's way. ``max_locality_drop`` (points of Locality
    on ``locality_probes``, prompts that are not the records' own) ends the stage at the epoch that
    exceeds it and keeps the best epoch within it."""

    until_accuracy: ConfigFloat | None = Field(None, gt=0, le=1)
    max_epochs: ConfigInt | None = Field(None, ge=1)
    max_locality_drop: ConfigFloat | None = Field(None, ge=0, le=100)
    locality_probes: Path | None = None

    @field_validator("locality_probes", mode="before")
    @classmethod
    def _shipped_probes(cls, value: Any) -> Any:
        return _shipped_sample(value)

    def given(self) -> dict[str, Any]:
        """The TrainConfig fields given (the stop rule's are not TrainConfig's)."""
        return {k: v for k, v in super().given().items() if k not in STOP_FIELDS}


STOP_FIELDS = ("until_accuracy", "max_epochs", "max_locality_drop", "locality_probes")
# ``flearn update``'s learning stage when neither a schedule (epochs, max_steps) nor a stop rule is
# given: train until teacher-forced accuracy on the new facts reaches 0.95, at most 20 epochs (see the
# README's "An update that takes" for the measurement behind both numbers).
UNTIL_ACCURACY = 0.95
MAX_EPOCHS = 20
# Prompts the locality budget measures on by default: Natural Questions pairs no shipped record uses.
LOCALITY_PROBES = "locality-probes.jsonl"


@dataclass(frozen=True)
class StopRule:
    """When a training stage ends before its last epoch, checked after every epoch: once teacher-forced
    accuracy on its own pairs reaches ``until_accuracy`` (0..1), or once Locality on ``locality_probes``
    has fallen more than ``max_locality_drop`` points below the model before the update (the best epoch
    within the budget is then kept). Empty (both None): the stage runs its epochs."""

    until_accuracy: float | None = None
    max_locality_drop: float | None = None
    locality_probes: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "until_accuracy": self.until_accuracy,
            "max_locality_drop": self.max_locality_drop,
            "locality_probes": str(self.locality_probes) if self.max_locality_drop is not None else None,
        }


@dataclass
class StagePlan:
    """Hyper-parameters of both stages; ``forget`` is ignored by methods without forgetting. ``stop``
    ends the learning stage early (None: it runs ``learn.epochs``). A method with an editor has ``edit``
    (its edit step, ``config.edit``) and no learning stage (``learn`` None)."""

    learn: TrainConfig | None
    forget: TrainConfig | None = None
    lam: float = 0.7
    stop: StopRule | None = None
    edit: EditPlan | None = None


def learn_config(
    method: Method, full: TrainConfig, lora: TrainConfig, linf_bound: float
) -> TrainConfig | None:
    """The learning stage of ``method``: the shared full or LoRA settings, plus ε for ft-c (None for a
    method with an editor instead)."""
    if method.learn is None:
        return None
    if method.learn == "lora":
        return lora
    if method.constrained:
        return full.model_copy(update={"linf_bound": linf_bound})
    return full


class UpdateConfig(BaseModel):
    """Everything ``flearn update`` needs. ``old``/``new`` may be one file holding both targets."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model: str = DEFAULT_MODEL
    data: Path | None = None
    old: Path | None = None
    new: Path | None = None
    format: str | None = None
    # the user's own column names read as the project's fields ({field: column}: --field prompt=question),
    # and the split of a DatasetDict directory or a hub dataset (data/README.md)
    fields: dict[str, str] | None = None
    split: str | None = None
    # where a ZsRE file's old answers come from: pred (the paper's) or answers (answers[0]); None: pred
    # when every record has one, else answers (data.loading.zsre_old_field)
    zsre_old: ZsreOld | None = None
    limit: ConfigInt | None = Field(None, ge=1)
    method: str = "flearning-ft"
    # λ > 0 forgets (θ' = θ − λ·Δ_old); a negative λ strengthens the old facts and is refused unless this
    # says it is meant (declared before ``lam``, whose validator reads it)
    allow_negative_lambda: ConfigBool = False
    lam: ConfigFloat = Field(0.7, alias="lambda")
    forget: StageOverrides = Field(default_factory=StageOverrides)
    learn: LearnOverrides = Field(default_factory=LearnOverrides)
    # ROME, MEMIT, AlphaEdit: how the editors write the new facts (config.edit; declared after ``method``,
    # which its validator reads)
    edit: EditSettings = Field(default_factory=EditSettings)
    # the prompt template of training and evaluation alike (data.templates: plain, alpaca, chat); declared
    # after ``method``, which its validator reads (an editor takes plain only)
    template: TemplateName = PLAIN
    lora: LoraSettings = Field(default_factory=LoraSettings)
    linf_bound: ConfigFloat = Field(LINF_BOUND, gt=0)
    # NumPy (seeded with the others) takes 0 <= seed < 2**32.
    seed: ConfigInt = Field(0, ge=0, lt=2**32)
    # Optimizer steps between checkpoints of a training stage in <out>.partial/ (0: only when a stage
    # ends or is interrupted). Does not change the result.
    checkpoint_every: ConfigInt = Field(100, ge=0)
    evaluate: ConfigBool = True
    eval_batch_size: ConfigInt = Field(DEFAULT_BATCH_SIZE, ge=1)
    generation: ConfigBool = True
    # perplexity on held-out text before and after the update (general ability); null skips it
    perplexity: PerplexitySettings | None = Field(default_factory=PerplexitySettings)
    # a record longer than the model's context is refused; with truncate its prompts are cut from the left
    truncate: ConfigBool = False
    out: Path | None = None
    overwrite: ConfigBool = False
    # knowledge_vector/ and update_vector/ (each the size of the model's weights) beside the model
    save_vectors: ConfigBool = True
    # how knowledge_vector/ and update_vector/ are written: "consolidated", one vector.safetensors (under
    # FSDP2 gathered whole onto the main process), or "sharded", one file per decoder block in the
    # streaming vector format (under FSDP2 gathered a block at a time: never whole on the main process)
    vector_files: Literal["consolidated", "sharded"] = "consolidated"
    trust_remote_code: ConfigBool = False
    # experiment tracking (recipes/tracking.py), none by default: accelerate's trackers log one run named
    # run_name (default: the output directory's name); TensorBoard and wandb write in logging_dir (default:
    # the output's logs/, written in <out>.partial/logs/ while the update runs). Not part of what a
    # resumed update must match.
    report_to: ReportTo = Field(default_factory=list)
    run_name: RunName | None = None
    logging_dir: Path | None = None

    # fields holding paths, which a YAML file's relative paths are resolved for (``load_config``)
    path_fields: ClassVar[tuple[str, ...]] = (
        "model",
        "data",
        "old",
        "new",
        "out",
        "learn.locality_probes",
        "logging_dir",
        "perplexity.corpus",
        "edit.corpus",
    )

    @field_validator("data", "old", "new", mode="before")
    @classmethod
    def _shipped_sample(cls, value: Any) -> Any:
        return _shipped_sample(value)

    @field_validator("lam")
    @classmethod
    def _forgetting_lambda(cls, value: float, info: ValidationInfo) -> float:
        if value < 0 and not info.data.get("allow_negative_lambda", False):
            raise negative_lambda(value)
        return value

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return field_mapping(value)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        try:
            return get_method(value).name
        except FlearnError as ex:
            raise ValueError(str(ex)) from None

    @field_validator("edit")
    @classmethod
    def _edit_layers(cls, value: EditSettings, info: ValidationInfo) -> EditSettings:
        problem = layer_problem([info.data.get("method", "")], value)
        if problem:
            raise PydanticCustomError("edit_layers", problem)
        return value

    @field_validator("template")
    @classmethod
    def _template_of_method(cls, value: str, info: ValidationInfo) -> str:
        problem = template_problem([info.data.get("method", "")], value)
        if problem:
            raise PydanticCustomError("template_editor", problem)
        return value

    def data_files(self) -> tuple[Path, Path]:
        """(file of old facts, file of new facts)."""
        if self.data is not None:
            if self.old is not None or self.new is not None:
                raise FlearnError(
                    "give either data (one file with old and new targets) or old and new, not both"
                )
            return self.data, self.data
        if self.old is None or self.new is None:
            raise FlearnError("no facts given: pass --data FILE, or --old FILE and --new FILE")
        return self.old, self.new


def lambda_notes(cfg: UpdateConfig) -> list[str]:
    """Warnings about λ that are not errors: λ given to a method without a forget stage (ignored), λ = 0
    (forgetting does nothing) and an allowed negative λ (it strengthens the old facts)."""
    method = get_method(cfg.method)
    if method.forget is None:
        if "lam" in cfg.model_fields_set:
            return [
                f"lambda={cfg.lam} is ignored: method {method.name} has no forget stage (λ scales Δ_old, which "
                "only the flearning-* methods compute)"
            ]
        return []
    if cfg.lam == 0:
        return [
            f"lambda=0 with {method.name}: θ' = θ − 0·Δ_old = θ, so forgetting does nothing (the forget stage "
            "still trains Δ_old); give λ > 0 to forget, or use a method without a forget stage"
        ]
    if cfg.lam < 0:
        return [f"lambda={cfg.lam} < 0 (allowed): the update strengthens the old facts by {-cfg.lam}·Δ_old"]
    return []


def stage_plan(cfg: UpdateConfig, source: str = "configuration") -> StagePlan:
    """Both stages' TrainConfigs for the configured method.

    Raises:
        ConfigError: a stage's settings are invalid, naming ``source`` (the config file) and the field.
    """
    method = get_method(cfg.method)
    learn = cfg.learn.given()
    # a method with an editor has no learning stage, so nothing to stop
    stop = learn_stop_rule(cfg.learn, source) if method.editor is None else None
    if stop is not None and stop.until_accuracy is not None:
        learn["epochs"] = cfg.learn.max_epochs or MAX_EPOCHS  # the cap; the rule stops earlier
    stage = {"source": source, "template": cfg.template}
    full = default_stage("full", cfg.lora, cfg.seed, learn, section="learn", **stage)
    lora = default_stage("lora", cfg.lora, cfg.seed, learn, section="learn", **stage)
    forget = None
    if method.forget is not None:
        forget = default_stage(
            method.forget, cfg.lora, cfg.seed, cfg.forget.given(), section="forget", **stage
        )
    return StagePlan(
        learn=learn_config(method, full, lora, cfg.linf_bound),
        forget=forget,
        lam=cfg.lam,
        stop=stop,
        edit=edit_plan(method, cfg.edit),
    )


def learn_stop_rule(learn: LearnOverrides, source: str = "configuration") -> StopRule | None:
    """The learning stage's stop rule. Neither a schedule (``epochs``, ``max_steps``) nor a rule given:
    until ``UNTIL_ACCURACY``, at most ``MAX_EPOCHS``. A schedule given: it is run (with the locality
    budget, if one is given).

    Raises:
        ConfigError: ``until_accuracy``/``max_epochs`` given together with ``epochs``/``max_steps``.
    """
    given = learn.model_dump(exclude_none=True)
    schedule = [k for k in ("epochs", "max_steps") if k in given]
    until = [k for k in ("until_accuracy", "max_epochs") if k in given]
    if schedule and until:
        raise ConfigError(
            [
                Problem(
                    source,
                    None,
                    f"learn.{until[0]}",
                    f"cannot be combined with learn.{schedule[0]}: give learn.epochs (or max_steps) for a "
                    "fixed schedule, or learn.until_accuracy with learn.max_epochs as its cap",
                )
            ]
        )
    budget = learn.max_locality_drop
    if schedule and budget is None:
        return None
    accuracy = None if schedule else (learn.until_accuracy or UNTIL_ACCURACY)
    probes = (learn.locality_probes or sample_path(LOCALITY_PROBES)) if budget is not None else None
    return StopRule(until_accuracy=accuracy, max_locality_drop=budget, locality_probes=probes)


# ---- flearn prime and flearn bench ----------------------------------------------------------------

# A seed of a bench run (NumPy, seeded with the others, takes 0 <= seed < 2**32).
Seed = Annotated[ConfigInt, Field(ge=0, lt=2**32)]


class PrimeSettings(BaseModel):
    """How θ is primed (also ``flearn prime``'s options): stop at ``threshold`` accuracy on the old facts,
    or after ``max_epochs`` (threshold null: exactly ``max_epochs`` epochs, the paper's 3 at lr 5e-5)."""

    model_config = ConfigDict(extra="forbid")

    lr: ConfigFloat = Field(1e-4, gt=0)
    max_epochs: ConfigFloat = Field(15, gt=0)
    threshold: ConfigFloat | None = Field(0.9, ge=0, le=1)
    batch_size: ConfigInt = Field(8, ge=1)
    grad_accum: ConfigInt = Field(1, ge=1)

    def train_config(self, seed: int, template: str = PLAIN) -> TrainConfig:
        """The priming stage: ``max_epochs`` is its number of epochs (``prime`` stops earlier once held),
        its pairs under the run's prompt ``template``."""
        return TrainConfig(
            lr=self.lr,
            epochs=self.max_epochs,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            seed=seed,
            template=template,
        )


class PrimeOptions(PrimeSettings):
    """``flearn prime``'s numeric options: the bench's prime settings and the seed."""

    threshold: ConfigFloat = Field(0.9, ge=0, le=1)
    seed: Seed = 0


def _auto_or_numbers(value: Any, numbers: ValidatorFunctionWrapHandler) -> Any:
    """``lambdas``: the text ``auto``, else a list checked item by item like every float of a config (a
    problem names the item, ``lambdas.1``, instead of one per member of a union)."""
    if value == "auto":
        return value
    if not isinstance(value, (list, tuple)):
        raise PydanticCustomError(
            "lambdas_type", "Input should be 'auto' or a list of numbers, not {value}", {"value": repr(value)}
        )
    return numbers(value)


def _lambdas_schema(source: Any, handler: Any) -> core_schema.CoreSchema:
    return core_schema.no_info_wrap_validator_function(
        _auto_or_numbers,
        handler.generate_schema(list[ConfigFloat]),
        serialization=core_schema.wrap_serializer_function_ser_schema(
            lambda value, serialize: serialize(value), schema=handler(source)
        ),
    )


Lambdas = Annotated[list[ConfigFloat] | Literal["auto"], GetPydanticSchema(_lambdas_schema)]

# The bench's datasets. The full development splits live under a data root outside the package
# (``data_root``, else $FLEARN_DATA, else ../shared/data from the current directory); the samples (their
# first 200 records) ship inside it.
DATA_ENV = "FLEARN_DATA"
DEFAULT_DATA_ROOT = Path("..") / "shared" / "data"
FULL_DATA = {"zsre": "zsre/zsre_dev-2.8k.json", "counterfact": "counterfact/counterfact-val.json"}
SAMPLE_DATA = {"zsre": "zsre-200.json", "counterfact": "counterfact-200.json"}
# What a bench's output directory holds besides one report directory per dataset.
RESERVED_NAMES = ("cache", "summary.json", "table.md", "logs")


def data_root(given: Path | None = None) -> Path:
    """Where the full datasets are: ``given``, else $FLEARN_DATA, else ../shared/data (an absolute path)."""
    return Path(os.path.abspath(given or os.environ.get(DATA_ENV) or DEFAULT_DATA_ROOT))


def full_data(root: Path | None = None) -> dict[str, Path]:
    """The full ZsRE and CounterFact development files under the data root (they may be missing)."""
    return {name: data_root(root) / path for name, path in FULL_DATA.items()}


def sample_data() -> dict[str, Path]:
    """The shipped samples of ZsRE and CounterFact."""
    return {name: sample_path(file) for name, file in SAMPLE_DATA.items()}


def default_data(root: Path | None = None) -> dict[str, Path]:
    """The full datasets under the data root when they are all there, else the shipped samples."""
    full = full_data(root)
    return full if all(p.is_file() for p in full.values()) else sample_data()


# The paper's appendix A.2 settings. Every stage (priming, forgetting, learning): lr 5e-5, 3 epochs,
# batch 4 × gradient accumulation 4 (effective 16); θ primed for exactly 3 epochs (no accuracy
# threshold); LoRA on the attention query and value projections (the paper states no rank: 8, alpha 16,
# this project's LoRA default); λ per method and dataset as the paper reports them for LLaMA2-7B;
# Alpaca-style prompts; ZsRE's old answer from ``pred``. The five methods without a constraint
# (ft-c and the editors are not in the paper's table).
PAPER_STAGE = {"lr": 5e-5, "epochs": 3.0, "batch_size": 4, "grad_accum": 4}
PAPER_V2: dict[str, Any] = {
    "n": 100,
    "n_val": 0,
    "seeds": [0, 1, 2],
    "data": "full",
    "methods": ["ft", "lora", "flearning-ft", "flearning-lora", "flearning-lora-ft"],
    "prime": {"lr": 5e-5, "max_epochs": 3.0, "threshold": None, "batch_size": 4, "grad_accum": 4},
    "full": PAPER_STAGE,
    "lora_stage": PAPER_STAGE,
    "forget_full": PAPER_STAGE,
    "forget_lora": PAPER_STAGE,
    "lora": {"r": 8, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"]},
    "lambdas_by_dataset": {
        "zsre": {"flearning-lora": [0.7], "flearning-lora-ft": [3.0], "flearning-ft": [0.3]},
        "counterfact": {"flearning-lora": [1.5], "flearning-lora-ft": [3.0], "flearning-ft": [0.1]},
    },
    "template": "alpaca",
    "zsre_old": "pred",
}


PROFILES: dict[str, dict[str, Any]] = {
    # A smoke run that finishes in minutes on 2 CPU cores: few records of the samples, one seed, one λ.
    "quick": {
        "n": 12,
        "n_val": 0,
        "seeds": [0],
        "lambdas": [0.7],
        "generation": True,
        "prime": {"max_epochs": 8},
        "data": "samples",
        # general ability on 20 of the 200 held-out passages: the check runs, in seconds per model
        "perplexity": {"passages": 20},
    },
    # The paper's protocol at the scale this project reports: 200 edits per dataset of the full
    # datasets, 3 seeds; every method, the editors (ROME, MEMIT, AlphaEdit) included. Its published
    # results read ZsRE's old answers from answers[0] (before issue #11 made pred the default): kept so.
    "paper": {
        "n": 200,
        "n_val": 0,
        "seeds": [0, 1, 2],
        "data": "full",
        "methods": list(METHODS),
        "zsre_old": "answers",
    },
    # The F-Learning paper's own protocol (arXiv 2311.08011 v2, §5 and appendix A.2) wherever this
    # machine allows (PAPER_V2 above; issue #11): --n and --seeds set the scale.
    "paper-v2": PAPER_V2,
}


def negative_lambda(value: float) -> PydanticCustomError:
    """The refusal of a negative λ (``flearn update`` and ``flearn bench``: λ > 0 forgets)."""
    return PydanticCustomError(
        "negative_lambda",
        "λ = {value} is negative: θ' = θ − λ·Δ_old would add {amount}·Δ_old and strengthen the old "
        "facts instead of forgetting them (λ > 0 forgets). If that is what you want, set "
        "allow_negative_lambda: true (--allow-negative-lambda)",
        {"value": value, "amount": -value},
    )


class BenchConfig(BaseModel):
    """Everything ``flearn bench`` needs. ``data`` maps a dataset name to its file; ``samples`` and ``full``
    name the shipped samples and the full datasets under ``data_root``; left out, the full datasets when
    they are there, else the samples."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    profiles: ClassVar[dict[str, dict[str, Any]]] = PROFILES

    model: str = DEFAULT_MODEL
    data_root: Path | None = None
    data: dict[str, Path] = Field(default_factory=lambda fields: default_data(fields.get("data_root")))
    # the field mapping and the split every dataset of ``data`` is read with (as in UpdateConfig)
    fields: dict[str, str] | None = None
    split: str | None = None
    # where a ZsRE dataset's old answers come from (as in UpdateConfig; None: pred when every record has
    # one, else answers)
    zsre_old: ZsreOld | None = None
    # default: the six that fine-tune (the editors on request, or with the paper profile)
    methods: list[str] = Field(default_factory=lambda: list(FINE_TUNING))
    # the prompt template of every stage and evaluation (data.templates); an editor takes plain only
    template: TemplateName = PLAIN
    n: ConfigInt = Field(200, ge=1)
    n_val: ConfigInt = Field(0, ge=0)
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    # λ > 0 forgets, as in flearn update: a negative λ (in lambdas or lambda_grid) is refused unless this
    # says it is meant (declared before both, whose validator reads it)
    allow_negative_lambda: ConfigBool = False
    lambdas: Lambdas = Field(default_factory=lambda: [0.7])
    # λ per dataset and method ({dataset: {method: [λ, ...]}}, the paper's per-method values): replaces
    # ``lambdas`` for the datasets and methods it names (unused when lambdas is auto)
    lambdas_by_dataset: dict[str, dict[str, list[ConfigFloat]]] | None = None
    lambda_grid: list[ConfigFloat] = Field(
        default_factory=lambda: [0.1, 0.3, 0.7, 1.0, 1.5, 3.0], min_length=1
    )
    locality_tolerance: ConfigFloat = Field(5.0, ge=0)
    prime: PrimeSettings = Field(default_factory=PrimeSettings)
    full: StageOverrides = Field(default_factory=StageOverrides)
    lora_stage: StageOverrides = Field(default_factory=StageOverrides)
    forget_full: StageOverrides = Field(default_factory=StageOverrides)
    forget_lora: StageOverrides = Field(default_factory=StageOverrides)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    linf_bound: ConfigFloat = Field(LINF_BOUND, gt=0)
    # the editors' settings (config.edit), shared by every method that edits; declared after ``methods``
    edit: EditSettings = Field(default_factory=EditSettings)
    eval_batch_size: ConfigInt = Field(DEFAULT_BATCH_SIZE, ge=1)
    generation: ConfigBool = True
    # both Fluencies (greedy, and top-5 sampled as ROME/EasyEdit): long generations, slow
    fluency: ConfigBool = False
    # perplexity on held-out text of θ and of every run (general ability); null skips it
    perplexity: PerplexitySettings | None = Field(default_factory=PerplexitySettings)
    out: Path | None = None
    trust_remote_code: ConfigBool = False
    # experiment tracking (recipes/tracking.py), none by default: one run named run_name (default: the
    # bench directory's name) for every stage and run of the bench; logging_dir default: its logs/
    report_to: ReportTo = Field(default_factory=list)
    run_name: RunName | None = None
    logging_dir: Path | None = None

    # fields holding paths (``data`` maps names to paths), resolved against a YAML file's directory
    path_fields: ClassVar[tuple[str, ...]] = (
        "model",
        "data_root",
        "data.*",
        "out",
        "logging_dir",
        "perplexity.corpus",
        "edit.corpus",
    )

    def stage_plan(self, method: Method, seed: int, lam: float | None = None) -> StagePlan:
        """The stages of ``method`` at ``seed``: the same learning settings for every method, the forget
        settings of its kind (``forget_full`` or ``forget_lora``)."""
        template = self.template
        full = default_stage("full", self.lora, seed, self.full.given(), template=template)
        lora = default_stage("lora", self.lora, seed, self.lora_stage.given(), template=template)
        forget = None
        if method.forget is not None:
            overrides = self.forget_full if method.forget == "full" else self.forget_lora
            forget = default_stage(method.forget, self.lora, seed, overrides.given(), template=template)
        learn = learn_config(method, full, lora, self.linf_bound)
        return StagePlan(
            learn=learn, forget=forget, lam=lam if lam is not None else 0.0, edit=edit_plan(method, self.edit)
        )

    def method_lambdas(self, dataset: str, method: str) -> list[float]:
        """The λ a forgetting method runs at on ``dataset`` when λ is not chosen on validation (lambdas
        not auto): ``lambdas_by_dataset``'s when it names both, else ``lambdas``."""
        given = (self.lambdas_by_dataset or {}).get(dataset, {}).get(method)
        if given is not None:
            return list(given)
        return [] if self.lambdas == "auto" else list(self.lambdas)

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return field_mapping(value)

    @field_validator("methods")
    @classmethod
    def _known(cls, methods: list[str]) -> list[str]:
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from: {', '.join(METHODS)}")
        if not methods:
            raise ValueError("no methods")
        return methods

    @field_validator("edit")
    @classmethod
    def _edit_layers(cls, value: EditSettings, info: ValidationInfo) -> EditSettings:
        problem = layer_problem(info.data.get("methods") or [], value)
        if problem:
            raise PydanticCustomError("edit_layers", problem)
        return value

    @field_validator("template")
    @classmethod
    def _template_of_methods(cls, value: str, info: ValidationInfo) -> str:
        problem = template_problem(info.data.get("methods") or [], value)
        if problem:
            raise PydanticCustomError("template_editor", problem)
        return value

    @field_validator("lambdas_by_dataset")
    @classmethod
    def _lambdas_by_dataset(
        cls, value: dict[str, dict[str, list[float]]] | None, info: ValidationInfo
    ) -> dict[str, dict[str, list[float]]] | None:
        if not value:
            return None
        problems = []
        for dataset, by_method in value.items():
            for method, lams in by_method.items():
                if method not in METHODS or METHODS[method].forget is None:
                    forgetting = [m for m, spec in METHODS.items() if spec.forget is not None]
                    problems.append(
                        f"{dataset}.{method}: not a method that forgets (λ scales Δ_old of "
                        f"{', '.join(forgetting)})"
                    )
                elif not lams:
                    problems.append(f"{dataset}.{method}: give at least one λ")
                elif not info.data.get("allow_negative_lambda", False) and any(lam < 0 for lam in lams):
                    raise negative_lambda(min(lams))
        if problems:
            raise PydanticCustomError("lambdas_by_dataset", "{problems}", {"problems": "; ".join(problems)})
        return value

    @field_validator("data", mode="before")
    @classmethod
    def _named_data(cls, data: Any, info: ValidationInfo) -> Any:
        if data == "samples":
            return sample_data()
        if data == "full":
            root = info.data.get("data_root")
            missing = [str(p) for p in full_data(root).values() if not p.is_file()]
            if missing:
                raise PydanticCustomError(
                    "missing_data",
                    "the full datasets are not under the data root {root}: missing {missing}; set the data "
                    "root (--data-root DIR, data_root=DIR or ${env}) or pass --data NAME=PATH",
                    {"root": str(data_root(root)), "missing": ", ".join(missing), "env": DATA_ENV},
                )
            return full_data(root)
        return data

    @field_validator("data")
    @classmethod
    def _dataset_names(cls, data: dict[str, Path]) -> dict[str, Path]:
        # each name is a report directory in out/, beside cache/, summary.json and table.md
        bad = [
            name
            for name in data
            if name in RESERVED_NAMES or not name or name.startswith(".") or "/" in name or "\\" in name
        ]
        if bad:
            raise ValueError(
                f"dataset names {bad} cannot name a report directory (not empty, no '/', no leading '.', "
                f"none of {', '.join(RESERVED_NAMES)})"
            )
        return data

    @field_validator("lambdas")
    @classmethod
    def _some_lambda(cls, value: list[float] | str, info: ValidationInfo) -> list[float] | str:
        if not value:  # each item was checked as a finite number already
            raise PydanticCustomError("too_short", "Input should be 'auto' or at least one λ")
        # n_val is checked first; when it is invalid itself, its own problem is the one reported
        if value == "auto" and info.data.get("n_val", 1) < 1:
            raise PydanticCustomError("auto_lambda", "auto needs a validation split (n_val >= 1)")
        return value

    @field_validator("lambdas", "lambda_grid")
    @classmethod
    def _forgetting_lambdas(cls, value: list[float] | str, info: ValidationInfo) -> list[float] | str:
        if value == "auto" or info.data.get("allow_negative_lambda", False):
            return value
        negative = [lam for lam in value if lam < 0]
        if negative:
            raise negative_lambda(negative[0])
        return value
