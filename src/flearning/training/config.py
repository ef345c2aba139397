"""Hyper-parameters of one training stage (prime, forget or learn): ``TrainConfig`` and ``LoraSettings``.

Also the strict setting types every config uses (``ConfigFloat``, ``ConfigInt``, ``ConfigBool``): no
boolean as a number, no ``"yes"`` as a switch, every float finite.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from flearning.data.templates import PLAIN, TemplateName

ALL_LINEAR = "all-linear"
Scheduler = Literal["linear", "constant"]

# A number written as text: YAML 1.1 (PyYAML) reads ``5e-5`` (no dot) as a string, and a quoted
# ``"5e-5"`` is one too. Python's own parsing is laxer (``1_0``, ``inf``, `` 3 ``); this is not.
_FLOAT_TEXT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_INT_TEXT = re.compile(r"[+-]?\d+")


def _float_input(value: Any) -> Any:
    """What a float setting accepts before pydantic's own checks: finite numbers, and text that is a
    plain decimal number; never a boolean (pydantic's lax mode would read ``true`` as 1.0)."""
    if isinstance(value, bool):
        raise PydanticCustomError("float_type", "Input should be a number, not a boolean")
    if isinstance(value, str):
        if not _FLOAT_TEXT.fullmatch(value):
            raise PydanticCustomError(
                "float_parsing", "Input should be a number, got the text {text}", {"text": repr(value)}
            )
        value = float(value)  # "1e400" is inf
    if isinstance(value, float) and not math.isfinite(value):
        # here, so that NaN is named as such and not as "should be less than 1" by a bound
        raise PydanticCustomError("finite_number", "Input should be a finite number")
    return value


def _int_input(value: Any) -> Any:
    """What an integer setting accepts before pydantic's own checks: never a boolean, and text only
    when it is plain digits (pydantic's lax mode reads ``true`` as 1 and ``"1_0"`` as 10)."""
    if isinstance(value, bool):
        raise PydanticCustomError("int_type", "Input should be an integer, not a boolean")
    if isinstance(value, str):
        if not _INT_TEXT.fullmatch(value):
            raise PydanticCustomError(
                "int_parsing", "Input should be an integer, got the text {text}", {"text": repr(value)}
            )
        return int(value)
    return value


def _bool_input(value: Any) -> Any:
    """A switch takes a real boolean only (YAML ``true``/``false``, or a CLI flag); pydantic's lax mode
    would read ``"yes"`` as true, ``"off"`` and ``0`` as false."""
    if not isinstance(value, bool):
        raise PydanticCustomError(
            "bool_type", "Input should be true or false, not {value}", {"value": repr(value)}
        )
    return value


# The types of every number and switch of a configuration (run, stage, LoRA): finite floats, integers
# that are not booleans, and booleans that are real booleans (YAML true/false), not "yes"/"off"/1.
ConfigFloat = Annotated[float, BeforeValidator(_float_input), AllowInfNan(False)]
ConfigInt = Annotated[int, BeforeValidator(_int_input)]
ConfigBool = Annotated[bool, BeforeValidator(_bool_input)]


class LoraSettings(BaseModel):
    """LoRA adapter shape. ``target_modules`` is a list of module names or ``"all-linear"``."""

    model_config = ConfigDict(extra="forbid")

    r: ConfigInt = Field(8, ge=1)
    alpha: ConfigFloat = Field(16.0, gt=0)
    dropout: ConfigFloat = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = ALL_LINEAR


class TrainConfig(BaseModel):
    """One stage's optimisation settings. Loss is on answer tokens only (prompt tokens masked).

    ``epochs`` bounds the stage unless ``max_steps`` is set, which then wins.
    """

    model_config = ConfigDict(extra="forbid")

    lr: ConfigFloat = Field(5e-5, gt=0)
    epochs: ConfigFloat = Field(3.0, gt=0)
    max_steps: ConfigInt | None = Field(None, ge=1)
    batch_size: ConfigInt = Field(8, ge=1)
    grad_accum: ConfigInt = Field(1, ge=1)
    scheduler: Scheduler = "constant"
    warmup_ratio: ConfigFloat = Field(0.0, ge=0, lt=1)
    weight_decay: ConfigFloat = Field(0.0, ge=0)
    max_grad_norm: ConfigFloat | None = Field(1.0, gt=0)
    add_eos: ConfigBool = True
    freeze_embeddings: ConfigBool = False
    seed: ConfigInt = 0
    lora: LoraSettings | None = None
    # ft-c (Zhu et al. 2020): after every optimizer step each weight is projected back into
    # [θ₀ − ε, θ₀ + ε]. None = unconstrained.
    linf_bound: ConfigFloat | None = Field(None, gt=0)
    # Regional torch.compile (inductor) of the repeated decoder block: faster steps after a one-off
    # compilation that later stages of the same process reuse; results differ from eager ones in the
    # last bits (fused kernels). See training.model_setup.compile_blocks and the README's Benchmarks.
    compile: ConfigBool = False
    # The prompt template the pairs are encoded with (``data.templates``): a run's setting, copied into
    # each of its stages so that training and the stage's accuracy checks encode as evaluation does.
    template: TemplateName = PLAIN
    # An optimizer step's grad_accum micro-batches as one forward and backward when they share a prompt
    # prefix (training.fused): the same gradient up to rounding, faster with a template's preamble, but
    # batch_size × grad_accum rows' activations at once. One process only (ignored otherwise).
    fused_accumulation: ConfigBool = False

    @model_serializer(mode="wrap")
    def _without_default_compile(self, handler) -> dict[str, Any]:
        # ``compile``, ``template`` and ``fused_accumulation`` came after checkpoints, work directories and
        # bench caches were keyed on this dump: left out at their defaults, a stage keeps the key it had
        # before they existed.
        data = handler(self)
        if not self.compile:
            data.pop("compile", None)
        if not self.fused_accumulation:
            data.pop("fused_accumulation", None)
        if self.template == PLAIN:
            data.pop("template", None)
        return data

    @model_validator(mode="after")
    def _lora_and_bound_exclusive(self) -> TrainConfig:
        if self.lora is not None and self.linf_bound is not None:
            raise ValueError("linf_bound (ft-c) applies to full fine-tuning, not to a LoRA stage")
        return self
