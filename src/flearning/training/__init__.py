"""Supervised fine-tuning stages (full or LoRA) on prompt→answer pairs: priming, forgetting's
fine-tune on the old facts and learning the new ones all run ``train``.

The loss covers the answer tokens only; a stage can be checkpointed and resumed bit for bit.
"""

from flearning.training.config import LoraSettings, TrainConfig
from flearning.training.model_setup import attach_lora
from flearning.training.trainer import EpochCheck, TrainingDivergedError, TrainResult, train

__all__ = [
    "EpochCheck",
    "LoraSettings",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "attach_lora",
    "train",
]
