"""Hyper-parameters of one training stage (prime, forget or learn)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ALL_LINEAR = "all-linear"


class LoraSettings(BaseModel):
    """LoRA adapter shape. ``target_modules`` is a list of module names or ``"all-linear"``."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = ALL_LINEAR


class TrainConfig(BaseModel):
    """One stage's optimisation settings. Loss is on answer tokens only (prompt tokens masked).

    ``epochs`` bounds the stage unless ``max_steps`` is set, which then wins.
    """

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(5e-5, gt=0, allow_inf_nan=False)
    epochs: float = Field(3.0, gt=0, allow_inf_nan=False)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    scheduler: Literal["linear", "constant"] = "constant"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    add_eos: bool = True
    freeze_embeddings: bool = False
    seed: int = 0
    lora: LoraSettings | None = None
    # ft-c (Zhu et al. 2020): after every optimizer step each weight is projected back into
    # [θ₀ − ε, θ₀ + ε]. None = unconstrained.
    linf_bound: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _lora_and_bound_exclusive(self) -> TrainConfig:
        if self.lora is not None and self.linf_bound is not None:
            raise ValueError("linf_bound (ft-c) applies to full fine-tuning, not to a LoRA stage")
        return self
