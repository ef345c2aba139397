"""A causal LM's shape, read from its config without its weights, and the activations a training batch
keeps for the backward pass: what the memory plan (``recipes.memory``) counts with.

The model is built on torch's ``meta`` device: shapes only, no memory, no weights read. How the activation
term was calibrated: docs/DISTRIBUTED.md, "Memory planning".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flearning.errors import FlearnError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from flearning.training.config import LoraSettings

FP32 = 4  # bytes: weights, gradients, activations and vectors are all fp32 in this project
ACTIVATION_FACTOR = 1.2  # saved tensors the per-layer count misses (calibrated: docs/DISTRIBUTED.md)


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a causal LM, read from its config and its meta-device parameters."""

    name: str
    params: int  # unique parameters (a tied embedding/lm_head counted once)
    embedding_params: int  # the input embedding (and the output one when not tied)
    layers: int
    hidden: int
    kv_hidden: int  # key/value projection width (GQA: heads_kv × head_dim)
    intermediate: int
    heads: int
    vocab: int
    # (module name, in_features, out_features) of every nn.Linear below the output layer: LoRA targets
    linears: tuple[tuple[str, int, int], ...] = ()

    def lora_shape(self, lora: LoraSettings) -> tuple[int, int]:
        """(adapter parameters, parameters of the adapted weight matrices) for LoRA settings."""
        adapter = dense = 0
        for name, fan_in, fan_out in self.linears:
            if is_lora_target(name, lora):
                adapter += lora.r * (fan_in + fan_out)
                dense += fan_in * fan_out
        if adapter == 0:
            raise FlearnError(
                f"LoRA target_modules {lora.target_modules!r} match no linear layer of {self.name}"
            )
        return adapter, dense


def model_shape(
    model_config_or_dir: PretrainedConfig | str | os.PathLike, *, trust_remote_code: bool = False
) -> ModelShape:
    """Read a causal LM's shape from its config (an object or a directory/hub id holding config.json).

    Parameters are counted on the ``meta`` device: shapes only, no memory, no weights read.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if isinstance(model_config_or_dir, PretrainedConfig):
        config = model_config_or_dir
    else:
        try:
            config = AutoConfig.from_pretrained(str(model_config_or_dir), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as ex:
            raise FlearnError(f"cannot read the model config of '{model_config_or_dir}': {ex}") from ex
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as ex:
        raise FlearnError(f"'{model_config_or_dir}' is not a causal language model: {ex}") from ex
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    embeddings = {
        id(m.weight): m.weight.numel()
        for m in (model.get_input_embeddings(), model.get_output_embeddings())
        if m is not None
    }
    output = model.get_output_embeddings()
    linears = tuple(
        (name, module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not output
    )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _attr(text, "hidden_size", "n_embd", "d_model")
    heads = _attr(text, "num_attention_heads", "n_head")
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return ModelShape(
        name=getattr(config, "_name_or_path", "") or type(config).__name__,
        params=params,
        embedding_params=sum(embeddings.values()),
        layers=_attr(text, "num_hidden_layers", "n_layer"),
        hidden=hidden,
        kv_hidden=kv_heads * head_dim,
        intermediate=getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden,
        heads=heads,
        vocab=_attr(text, "vocab_size"),
        linears=linears,
    )


def _attr(config: Any, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise FlearnError(f"{type(config).__name__} has none of {', '.join(names)}: cannot estimate its memory")


def activation_bytes(shape: ModelShape, batch_size: int, seq_len: int, lora_rank_width: int = 0) -> int:
    """Activations kept for the backward pass of one micro-batch (the count is explained in
    docs/DISTRIBUTED.md, "Memory planning")."""
    per_layer = 7 * shape.hidden + 3 * shape.kv_hidden + 4 * shape.intermediate + shape.heads * seq_len
    per_token = (
        ACTIVATION_FACTOR * shape.layers * per_layer + 4 * shape.vocab + 2 * shape.hidden + lora_rank_width
    )
    return int(batch_size * seq_len * per_token * FP32)


def is_lora_target(name: str, lora: LoraSettings) -> bool:
    """peft's matching of a module name against target_modules (a list matches the last name part)."""
    from flearning.training.config import ALL_LINEAR

    leaf = name.rsplit(".", 1)[-1]
    targets = lora.target_modules
    if isinstance(targets, str):
        return targets == ALL_LINEAR or leaf == targets
    return leaf in targets
