"""``flearn update``'s configuration (``UpdateConfig``) and how it becomes the stages of one method
(``stage_plan``, ``learn_stop_rule``), with the notes a λ deserves."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from flearning.config.edit import EditSettings, edit_plan, layer_problem
from flearning.config.stages import (
    LINF_BOUND,
    LOCALITY_PROBES,
    MAX_EPOCHS,
    UNTIL_ACCURACY,
    LearnOverrides,
    PerplexitySettings,
    ReportTo,
    RunName,
    StageOverrides,
    StagePlan,
    StopRule,
    _shipped_sample,
    default_stage,
    field_mapping,
    learn_config,
    negative_lambda,
    template_problem,
)
from flearning.data.formats import ZsreOld
from flearning.data.templates import PLAIN, TemplateName
from flearning.errors import ConfigError, FlearnError, Problem
from flearning.evaluation.definitions import (
    DEFAULT_BATCH_SIZE,
)
from flearning.methods import get_method
from flearning.models import DEFAULT_MODEL
from flearning.resources import sample_path
from flearning.training.config import (
    ConfigBool,
    ConfigFloat,
    ConfigInt,
    LoraSettings,
)


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
