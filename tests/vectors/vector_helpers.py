"""Helpers shared by the knowledge-vector tests."""

from __future__ import annotations

import copy

import torch


def finetuned_copy(
    model: torch.nn.Module, seed: int = 1, scale: float = 1e-2, skip: str = "norm"
) -> torch.nn.Module:
    """A stand-in for FT(θ): a deep copy with small random changes to every parameter except those whose
    name contains ``skip`` (frozen, so their delta is exactly zero)."""
    tuned = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if skip and skip in name:
                continue
            param.add_(torch.randn(param.shape, generator=gen) * scale)
    return tuned


def randomize_lora(peft_model: torch.nn.Module, seed: int = 3, std: float = 0.1) -> None:
    """peft initialises B to zero (the adapter starts as a no-op); give A and B random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of named_parameters()."""
    return {k: v.detach().clone() for k, v in model.named_parameters()}
