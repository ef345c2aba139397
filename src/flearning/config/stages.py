"""What ``flearn update`` and ``flearn bench`` share: each stage's defaults (the embedded model's
full-FT and LoRA settings, ε of ft-c), the overrides a config may give a stage, the stop rule of the
learning stage, ``StagePlan`` (the stages of one method, resolved) and the perplexity and tracking
settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

from flearning.config.edit import EditPlan
from flearning.config.loading import (
    validation_problems,
)
from flearning.data.fields import mapping_problems
from flearning.data.templates import PLAIN
from flearning.errors import ConfigError, FlearnError, Problem
from flearning.evaluation.corpus import DEFAULT_CORPUS, PerplexityCorpus
from flearning.evaluation.definitions import (
    DEFAULT_PERPLEXITY_MAX_TOKENS,
    DEFAULT_PERPLEXITY_PASSAGES,
)
from flearning.methods import METHODS, Method
from flearning.resources import SAMPLE_PREFIX, resolve_sample
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
    if isinstance(value, (list, tuple)) and all(isinstance(name, str) for name in value):
        return list(dict.fromkeys(value))
    return value  # anything else is for the field's type to refuse, naming it


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
    fused_accumulation: ConfigBool | None = None

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


def negative_lambda(value: float) -> PydanticCustomError:
    """The refusal of a negative λ (``flearn update`` and ``flearn bench``: λ > 0 forgets)."""
    return PydanticCustomError(
        "negative_lambda",
        "λ = {value} is negative: θ' = θ − λ·Δ_old would add {amount}·Δ_old and strengthen the old "
        "facts instead of forgetting them (λ > 0 forgets). If that is what you want, set "
        "allow_negative_lambda: true (--allow-negative-lambda)",
        {"value": value, "amount": -value},
    )
