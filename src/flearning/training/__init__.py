"""Supervised fine-tuning stages (full or LoRA) on prompt→answer pairs."""

from flearning.training.config import LoraSettings, TrainConfig
from flearning.training.trainer import TrainingDivergedError, TrainResult, attach_lora, train

__all__ = ["LoraSettings", "TrainConfig", "TrainResult", "TrainingDivergedError", "attach_lora", "train"]
