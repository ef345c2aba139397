"""What a training stage does to the model before its first step: a LoRA adapter (``attach_lora``),
frozen embeddings, regional ``torch.compile`` of the repeated decoder block."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flearning.errors import FlearnError
from flearning.training.config import ALL_LINEAR, LoraSettings

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


def attach_lora(model: PreTrainedModel, lora: LoraSettings, adapter_name: str = "default"):
    """Wrap ``model`` in a fresh peft LoRA adapter (B starts at zero, so the model is unchanged)."""
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules if lora.target_modules != ALL_LINEAR else "all-linear"
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config, adapter_name=adapter_name)
    except ValueError as ex:  # e.g. target modules the model does not have
        raise FlearnError(
            f"cannot attach a LoRA adapter (target_modules {lora.target_modules!r}): {ex}"
        ) from ex


def freeze_embeddings(model: torch.nn.Module) -> None:
    """Freeze input and output embeddings (one tensor when tied, as in SmolLM2)."""
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            module.weight.requires_grad_(False)


def compile_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its repeated blocks (the decoder layers) and its other leaf modules compiled by
    ``torch.compile`` (inductor, dynamic shapes): accelerate's regional compilation. The block's code is
    compiled once and serves every layer, and every later stage of the process (new weights, same code),
    so the one-off cost is that of one layer, not of the model. The parameters are shared, not copied;
    ``accelerator.unwrap_model(..., keep_torch_compile=False)`` gives the original module back.
    """
    from accelerate.utils import compile_regions

    return compile_regions(model, dynamic=True)
