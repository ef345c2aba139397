"""Where the locate-then-edit methods find things in a model: one row per supported architecture.

ROME, MEMIT and AlphaEdit rewrite the MLP's output projection of a decoder block, read as a linear
associative memory ``v = W k``: the *key* ``k`` is the projection's input (the MLP's hidden activation,
``intermediate`` wide), the *value* ``v`` its output (``hidden`` wide). The module names follow the
reference hyper-parameters (kmeng01/rome ``hparams/ROME/gpt2-xl.json``; EasyEdit
``hparams/ROME/llama-7b.yaml``: ``model.layers.{}.mlp.down_proj``).

Every algorithm works on ``W`` in the *math layout* ``[out, in]`` (``v = W k``). Llama, Mistral and
Qwen2 store ``nn.Linear`` weights in that layout; GPT-2's ``Conv1D`` stores ``[in, out]``, so its weight
is transposed on the way in (``math_weight``) and an update on the way out (``to_parameter_layout``), as
ROME's ``upd_matrix_match_shape`` does by shape (here by the architecture, so a square matrix is never
ambiguous).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flearning.errors import FlearnError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Architecture:
    """Module names of one architecture family; ``{}`` stands for the layer index."""

    family: str
    model_types: tuple[str, ...]
    layers: str  # the ModuleList of decoder blocks
    block: str  # one decoder block: its output is the residual stream (MEMIT's z)
    mlp: str
    rewrite: str  # the MLP's output projection: the edited weight
    embedding: str
    final_norm: str
    lm_head: str
    conv1d: bool  # weight stored [in, out] (transformers' Conv1D) instead of nn.Linear's [out, in]

    def block_name(self, layer: int) -> str:
        return self.block.format(layer)

    def mlp_name(self, layer: int) -> str:
        return self.mlp.format(layer)

    def rewrite_name(self, layer: int) -> str:
        """The edited module of ``layer`` (``model.layers.5.mlp.down_proj``)."""
        return self.rewrite.format(layer)

    def weight_name(self, layer: int) -> str:
        """The edited parameter of ``layer`` (``model.layers.5.mlp.down_proj.weight``)."""
        return f"{self.rewrite_name(layer)}.weight"


_LLAMA_LIKE = dict(
    layers="model.layers",
    block="model.layers.{}",
    mlp="model.layers.{}.mlp",
    rewrite="model.layers.{}.mlp.down_proj",
    embedding="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    conv1d=False,
)

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(family="llama", model_types=("llama", "mistral", "qwen2"), **_LLAMA_LIKE),
    Architecture(
        family="gpt2",
        model_types=("gpt2",),
        layers="transformer.h",
        block="transformer.h.{}",
        mlp="transformer.h.{}.mlp",
        rewrite="transformer.h.{}.mlp.c_proj",
        embedding="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        conv1d=True,
    ),
)


def supported_model_types() -> list[str]:
    return sorted(t for arch in ARCHITECTURES for t in arch.model_types)


def architecture_of(model: torch.nn.Module) -> Architecture:
    """The row of ``model.config.model_type``.

    Raises:
        FlearnError: the architecture is not in the table (the message lists the supported ones).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise FlearnError(
        f"ROME/MEMIT/AlphaEdit cannot edit a model of type '{model_type}': they need to know which "
        f"module is the MLP's output projection; supported model types: {', '.join(supported_model_types())}"
    )


def num_layers(model: torch.nn.Module, arch: Architecture | None = None) -> int:
    arch = arch or architecture_of(model)
    return len(model.get_submodule(arch.layers))


def check_layers(
    model: torch.nn.Module, layers: list[int] | tuple[int, ...], arch: Architecture
) -> list[int]:
    """``layers`` sorted, lowest first (as MEMIT edits them); an empty list, a repeat or an index outside the
    model is a FlearnError naming the valid range."""
    n = num_layers(model, arch)
    layers = [int(layer) for layer in layers]
    if not layers:
        raise FlearnError("no layer to edit: give at least one layer index")
    bad = [layer for layer in layers if not 0 <= layer < n]
    if bad:
        raise FlearnError(f"layer {bad[0]} does not exist: this model has layers 0 to {n - 1}")
    if len(set(layers)) != len(layers):
        raise FlearnError(f"layers {layers}: each layer may be given once")
    return sorted(layers)


def math_weight(model: torch.nn.Module, arch: Architecture, layer: int) -> torch.Tensor:
    """The edited weight of ``layer`` as ``[out, in]`` (a view of the parameter, not a copy)."""
    weight = model.get_parameter(arch.weight_name(layer))
    return weight.T if arch.conv1d else weight


def to_parameter_layout(delta: torch.Tensor, arch: Architecture) -> torch.Tensor:
    """An update computed as ``[out, in]`` in the layout of the architecture's parameter."""
    return delta.T.contiguous() if arch.conv1d else delta
