"""Run configuration: YAML files plus ``key=value`` overrides, validated by pydantic.

Every problem in a config is reported at once, as ``source:field: what is wrong``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flearning.errors import ConfigError, FlearnError, Problem
from flearning.evaluation.definitions import DEFAULT_BATCH_SIZE
from flearning.methods import METHODS
from flearning.models import DEFAULT_MODEL
from flearning.training.config import (
    ConfigBool,
    ConfigFloat,
    ConfigInt,
    LoraSettings,
    Scheduler,
    TrainConfig,
)

# Defaults for the embedded SmolLM2-135M. Full-FT stages keep the paper's lr 5e-5 × 3 epochs.
# LoRA stages need a much larger step to move at all on a 135M model (DESIGN.md §3 measured LoRA at
# 5e-4 × 3 epochs underfitting badly); see the README's "Defaults" section for the measurement.
FULL_STAGE = {"lr": 5e-5, "epochs": 3.0, "batch_size": 8}
LORA_STAGE = {"lr": 1e-3, "epochs": 5.0, "batch_size": 8}


def default_stage(
    kind: str,
    lora: LoraSettings,
    seed: int,
    overrides: dict[str, Any] | None = None,
    *,
    section: str | None = None,
    source: str = "configuration",
) -> TrainConfig:
    """A stage's TrainConfig: the defaults of its kind, then the user's overrides.

    Raises:
        ConfigError: the settings do not make a valid stage; each problem names ``source`` and the
            field as ``section.field`` (e.g. ``run.yaml:learn.scheduler: ...``).
    """
    base = dict(FULL_STAGE if kind == "full" else LORA_STAGE)
    base["seed"] = seed
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


class UpdateConfig(BaseModel):
    """Everything ``flearn update`` needs. ``old``/``new`` may be one file holding both targets."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model: str = DEFAULT_MODEL
    data: Path | None = None
    old: Path | None = None
    new: Path | None = None
    format: str | None = None
    limit: ConfigInt | None = Field(None, ge=1)
    method: str = "flearning-ft"
    lam: ConfigFloat = Field(0.7, alias="lambda")
    forget: StageOverrides = Field(default_factory=StageOverrides)
    learn: StageOverrides = Field(default_factory=StageOverrides)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    linf_bound: ConfigFloat = Field(5e-4, gt=0)
    # NumPy (seeded with the others) takes 0 <= seed < 2**32.
    seed: ConfigInt = Field(0, ge=0, lt=2**32)
    # Optimizer steps between checkpoints of a training stage in <out>.partial/ (0: only when a stage
    # ends or is interrupted). Does not change the result.
    checkpoint_every: ConfigInt = Field(100, ge=0)
    evaluate: ConfigBool = True
    eval_batch_size: ConfigInt = Field(DEFAULT_BATCH_SIZE, ge=1)
    generation: ConfigBool = True
    out: Path | None = None
    overwrite: ConfigBool = False
    trust_remote_code: ConfigBool = False

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method '{value}'; choose one of: {', '.join(METHODS)}")
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


class _CoreSchemaLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's core-schema scalars instead of YAML 1.1's: only
    ``true``/``false`` are booleans (not ``yes``, ``on``, ``off``), integers are plain decimals (no
    ``1_000``, no octal ``010`` = 8), and ``5e-5`` is a float (YAML 1.1 wanted a dot). Anything else
    stays text, which the strict setting types then refuse with a message."""


_IMPLICIT_11 = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}
_CoreSchemaLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _IMPLICIT_11]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _pattern, _first in (
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:int", r"^[-+]?[0-9]+$", "-+0123456789"),
    (
        "tag:yaml.org,2002:float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+0123456789.",
    ),
):
    _CoreSchemaLoader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


# YAML 1.1's integer constructor reads a leading 0 as octal; the core schema's integers are decimal
_CoreSchemaLoader.add_constructor(
    "tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node), 10)
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_CoreSchemaLoader)  # noqa: S506 - a SafeLoader subclass


def parse_overrides(pairs: list[str], source: str = "command line") -> tuple[dict[str, Any], list[Problem]]:
    """``a.b=value`` strings into a nested dict; values are parsed as YAML scalars (so ``5e-5``,
    ``true`` and ``[q_proj, v_proj]`` have their natural types)."""
    tree: dict[str, Any] = {}
    problems: list[Problem] = []
    for item in pairs:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(Problem(source, None, item, "expected key=value"))
            continue
        try:
            value = _load_yaml(raw) if raw.strip() else None
        except (yaml.YAMLError, RecursionError) as ex:
            problems.append(Problem(source, None, key, f"cannot parse value {raw!r}: {_yaml_reason(ex)}"))
            continue
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(Problem(source, None, key, f"'{part}' is not a section"))
                break
        else:
            node[parts[-1]] = value
    return tree, problems


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _yaml_reason(ex: BaseException) -> str:
    return "nested too deeply" if isinstance(ex, RecursionError) else str(ex)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except OSError as ex:
        raise FlearnError(f"{path}: cannot read config: {ex.strerror or ex}") from ex
    except UnicodeDecodeError as ex:
        raise ConfigError(
            [Problem(str(path), None, None, f"not UTF-8 text (invalid byte at offset {ex.start})")]
        ) from ex
    except ValueError as ex:  # e.g. a NUL byte in the path
        raise FlearnError(f"{path}: cannot read config: {ex}") from ex
    try:
        loaded = _load_yaml(text)
    except (yaml.YAMLError, RecursionError) as ex:
        raise ConfigError([Problem(str(path), None, None, f"not valid YAML: {_yaml_reason(ex)}")]) from ex
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            [Problem(str(path), None, None, f"expected a mapping at the top, got {type(loaded).__name__}")]
        )
    return loaded


def validation_problems(ex: ValidationError, source: str) -> list[Problem]:
    return [
        Problem(source, None, ".".join(str(p) for p in err["loc"]) or None, err["msg"]) for err in ex.errors()
    ]


def config_source(path: Path | None) -> str:
    """How problems of a configuration name where it came from: its file, else the command line."""
    return str(path) if path else "command line"


def load_config(
    model: type[BaseModel], path: Path | None, overrides: list[str], cli: dict[str, Any] | None = None
):
    """Build ``model`` from (YAML file) < (explicit CLI options) < (key=value overrides).

    Relative paths inside a YAML file are taken relative to the current directory, like CLI paths.
    """
    source = config_source(path)
    data = read_yaml(path) if path else {}
    data = _merge(data, {k: v for k, v in (cli or {}).items() if v is not None})
    extra, problems = parse_overrides(overrides)
    data = _merge(data, extra)
    try:
        config = model.model_validate(data)
    except ValidationError as ex:
        problems += validation_problems(ex, source)
        config = None
    if problems:
        raise ConfigError(problems)
    return config
