"""The architecture table: module names, the Conv1D layout, layer checks and the unsupported-model error."""

from __future__ import annotations

import pytest
import torch
from editing_helpers import REQUESTS, gpt2, llama
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from flearning.editing.architectures import (
    architecture_of,
    check_layers,
    math_weight,
    supported_model_types,
    to_parameter_layout,
)
from flearning.editing.memit import memit_edit
from flearning.editing.rome import rome_edit
from flearning.errors import FlearnError


def test_llama_names_point_at_down_proj():
    model = llama(layers=2)
    arch = architecture_of(model)
    assert arch.rewrite_name(1) == "model.layers.1.mlp.down_proj"
    assert arch.weight_name(1) == "model.layers.1.mlp.down_proj.weight"
    assert isinstance(model.get_submodule(arch.rewrite_name(1)), torch.nn.Linear)
    for name in (arch.embedding, arch.final_norm, arch.lm_head, arch.block_name(1), arch.mlp_name(1)):
        model.get_submodule(name)
    weight = model.get_parameter(arch.weight_name(0))
    assert tuple(weight.shape) == (32, 64)  # [out = hidden, in = intermediate]
    assert math_weight(model, arch, 0).data_ptr() == weight.data_ptr()


@pytest.mark.parametrize(
    "config_class, model_class", [(MistralConfig, MistralForCausalLM), (Qwen2Config, Qwen2ForCausalLM)]
)
def test_mistral_and_qwen2_share_llamas_names(config_class, model_class):
    config = config_class(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = model_class(config)
    arch = architecture_of(model)
    assert arch.family == "llama"
    assert tuple(model.get_parameter(arch.weight_name(1)).shape) == (16, 32)
    for name in (arch.embedding, arch.final_norm, arch.lm_head):
        model.get_submodule(name)


def test_gpt2_conv1d_is_transposed_both_ways():
    model = gpt2(layers=2)
    arch = architecture_of(model)
    assert arch.conv1d and arch.rewrite_name(1) == "transformer.h.1.mlp.c_proj"
    weight = model.get_parameter(arch.weight_name(1))
    assert tuple(weight.shape) == (64, 32)  # Conv1D: [in, out]
    w = math_weight(model, arch, 1)
    assert tuple(w.shape) == (32, 64)
    # v = W k + b in the math layout is what the module computes
    k = torch.randn(3, 64)
    module = model.get_submodule(arch.rewrite_name(1))
    with torch.no_grad():
        assert torch.allclose(module(k), k @ w.T + module.bias, atol=1e-5)
    delta = torch.randn(32, 64)
    assert torch.equal(to_parameter_layout(delta, arch), delta.T)
    for name in (arch.embedding, arch.final_norm, arch.lm_head):
        model.get_submodule(name)


def test_an_unsupported_architecture_is_a_clear_error(tok):
    class Other(torch.nn.Module):
        class config:  # noqa: N801 - stands in for a transformers config
            model_type = "bert"

    with pytest.raises(FlearnError) as err:
        architecture_of(Other())
    message = str(err.value)
    assert "'bert'" in message
    assert "gpt2, llama, mistral, qwen2" in message
    assert supported_model_types() == ["gpt2", "llama", "mistral", "qwen2"]
    with pytest.raises(FlearnError, match="supported model types"):
        rome_edit(Other(), tok, REQUESTS[0], 0)


def test_layers_are_checked_and_sorted(tok):
    model = llama(layers=3)
    arch = architecture_of(model)
    assert check_layers(model, [2, 0], arch) == [0, 2]
    with pytest.raises(FlearnError, match="layers 0 to 2"):
        check_layers(model, [3], arch)
    with pytest.raises(FlearnError, match="once"):
        check_layers(model, [1, 1], arch)
    with pytest.raises(FlearnError, match="at least one"):
        memit_edit(model, tok, REQUESTS, [])
