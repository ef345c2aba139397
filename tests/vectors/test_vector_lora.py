"""LoRA knowledge vectors: Δ = B·A·scaling per layer, checked against peft itself.

What peft 0.21.2 does with ``add_weighted_adapter([a], [w], combination_type="linear")`` (read in
``peft/tuners/lora/model.py::_generalized_task_arithmetic_weighted_adapter`` and measured below):
the weight is NOT applied to both factors (that would give w²). With s = w·scaling,
A' = sign(s)·sqrt(|s|)·A and B' = sqrt(|s|)·B, and the new adapter gets r = lora_alpha = r, i.e. scaling 1,
so B'·A' = w·scaling·B·A: linear in w, negative weights allowed. Merging it therefore equals
θ + w·Δ_lora, equal to our ``apply_to(θ, w)`` up to float rounding (sqrt·sqrt ≠ 1 exactly).
Exception: with ``use_rslora=True`` the new adapter inherits use_rslora, so its scaling is
r/sqrt(r) = sqrt(r) and peft's result is sqrt(r) times too large (peft PR #3449 fixes this upstream).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from vector_helpers import params, randomize_lora

from flearning.models import model_fingerprint
from flearning.vectors import KnowledgeVector, Provenance, VectorError
from tiny import tiny_llama


def lora_model(base, **config):
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **config}
    model = get_peft_model(base, LoraConfig(**config))
    randomize_lora(model)
    return model


def peft_negative_merge(peft_model, lam: float):
    """peft's own way to subtract an adapter: a weighted adapter with weight −λ, merged."""
    peft_model.add_weighted_adapter(["default"], [-lam], adapter_name="neg", combination_type="linear")
    peft_model.set_adapter("neg")
    return peft_model.merge_and_unload()


def test_keys_are_base_parameter_names_and_values_are_peft_delta_weights():
    model = lora_model(tiny_llama(0))
    vector = KnowledgeVector.from_lora(model)
    assert vector.keys() == [
        f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    layers = dict(model.get_base_model().named_modules())
    for key, delta in vector.deltas.items():
        layer = layers[key.removesuffix(".weight")]
        b, a = layer.lora_B["default"].weight, layer.lora_A["default"].weight
        assert torch.equal(delta, (b @ a) * layer.scaling["default"])
        assert torch.equal(delta, layer.get_delta_weight("default"))
    meta = vector.metadata
    assert meta.kind == "lora" and meta.method == "lora"
    assert meta.hyperparameters["lora"]["r"] == 4 and meta.hyperparameters["lora"]["lora_alpha"] == 8


def test_base_fingerprint_seen_through_the_wrapper_equals_the_plain_model():
    base = tiny_llama(0)
    expected = model_fingerprint(base)
    model = lora_model(base)  # wraps base in place
    assert KnowledgeVector.from_lora(model).metadata.base_fingerprint == expected
    assert (
        KnowledgeVector.from_lora(
            model, provenance=Provenance(base_fingerprint="given")
        ).metadata.base_fingerprint
        == "given"
    )


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
@pytest.mark.parametrize("lam", [0.7, 3.0])
def test_equals_peft_negative_weighted_merge(tie, targets, lam):
    reference = tiny_llama(0, tie=tie)
    model = lora_model(tiny_llama(0, tie=tie), target_modules=targets)
    vector = KnowledgeVector.from_lora(model)
    merged = peft_negative_merge(model, lam)

    vector.apply_to(reference, -lam)
    got, want = params(reference), params(merged)
    assert list(got) == list(want)
    for key in got:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0, msg=key)
    changed = [k for k in got if not torch.equal(want[k], params(tiny_llama(0, tie=tie))[k])]
    assert sorted(changed) == sorted(vector.keys())  # peft changed exactly the layers the vector covers


def test_merge_with_weight_one_is_the_plain_merge():
    reference = tiny_llama(0)
    model = lora_model(tiny_llama(0), lora_alpha=16)
    vector = KnowledgeVector.from_lora(model)
    merged = model.merge_and_unload()
    vector.apply_to(reference, 1.0)
    for key, value in params(merged).items():
        torch.testing.assert_close(params(reference)[key], value, atol=1e-6, rtol=0)


def test_rslora_vector_uses_the_rslora_scaling_and_peft_weighted_merge_overscales():
    lam, r = 0.5, 4
    model = lora_model(tiny_llama(0), r=r, use_rslora=True)
    vector = KnowledgeVector.from_lora(model)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == 8 / math.sqrt(r)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(vector[key], layer.get_delta_weight("default"))

    base_weight = params(tiny_llama(0))[key]
    merged = peft_negative_merge(model, lam)
    peft_change = params(merged)[key] - base_weight
    ratio = float((peft_change * (-lam * vector[key])).sum() / (lam * vector[key]).pow(2).sum())
    # peft 0.21.2: sqrt(r); a peft with the upstream fix: 1. Either way our vector is the true B·A·scaling.
    assert math.isclose(ratio, math.sqrt(r), rel_tol=1e-5) or math.isclose(ratio, 1.0, rel_tol=1e-5)


def test_lm_head_on_a_tied_model_is_keyed_by_the_shared_embedding():
    reference = tiny_llama(0)
    model = lora_model(tiny_llama(0), target_modules=["lm_head", "q_proj"])
    vector = KnowledgeVector.from_lora(model)
    assert "model.embed_tokens.weight" in vector and "lm_head.weight" not in vector
    merged = model.merge_and_unload()  # merging changes the shared tensor: embedding and lm_head
    vector.apply_to(reference, 1.0)
    for key, value in params(merged).items():
        torch.testing.assert_close(params(reference)[key], value, atol=1e-6, rtol=0)


def test_fan_in_fan_out_conv1d_is_transposed():
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=257, n_positions=64, n_embd=32, n_layer=1, n_head=4)
        config.bos_token_id = config.eos_token_id = 256
        return GPT2LMHeadModel(config).eval()

    reference = gpt2()
    model = lora_model(gpt2(), target_modules=["c_attn"], fan_in_fan_out=True)
    vector = KnowledgeVector.from_lora(model)
    key = "transformer.h.0.attn.c_attn.weight"
    assert vector.keys() == [key] and tuple(vector[key].shape) == (32, 96)  # Conv1D stores (in, out)
    merged = peft_negative_merge(model, 0.7)
    vector.apply_to(reference, -0.7)
    torch.testing.assert_close(params(reference)[key], params(merged)[key], atol=1e-6, rtol=0)


def test_untrained_adapter_is_all_zero():
    model = get_peft_model(tiny_llama(0), LoraConfig(r=4, target_modules=["q_proj"]))  # B = 0
    with pytest.raises(VectorError, match="every delta is zero"):
        KnowledgeVector.from_lora(model)
    zeros = KnowledgeVector.from_lora(model, drop_zero=False)
    assert len(zeros) == 2 and zeros.norm() == 0.0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"target_modules": ["embed_tokens"]}, "embedding"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
        ({"lora_bias": True, "target_modules": ["q_proj"]}, "lora_bias"),
    ],
)
def test_unsupported_adapters_are_refused_with_the_reason(config, message):
    model = get_peft_model(tiny_llama(0), LoraConfig(**{"r": 4, "target_modules": ["q_proj"], **config}))
    with pytest.raises(VectorError, match=message):
        KnowledgeVector.from_lora(model)


def test_unknown_adapter_name():
    model = lora_model(tiny_llama(0))
    with pytest.raises(VectorError, match="no adapter named 'other'"):
        KnowledgeVector.from_lora(model, adapter_name="other")


def test_merged_adapter_is_refused():
    model = lora_model(tiny_llama(0))
    model.base_model.merge_adapter()
    with pytest.raises(VectorError, match="merged into the base weight"):
        KnowledgeVector.from_lora(model)


def test_lora_vector_refuses_another_base():
    model = lora_model(tiny_llama(0))
    vector = KnowledgeVector.from_lora(model)
    with pytest.raises(VectorError, match="another base model"):
        vector.apply_to(tiny_llama(1), -1.0)
    full_base = tiny_llama(0)
    full = KnowledgeVector.from_models(full_base, copy.deepcopy(full_base).requires_grad_(False).apply(_bump))
    with pytest.raises(VectorError, match="only in"):
        vector + full  # noqa: B018 - same base, different keys


def _bump(module):
    for p in module.parameters(recurse=False):
        p.data.add_(0.01)


def test_lora_model_and_injected_layers_give_the_same_vector():
    from peft import inject_adapter_in_model

    model = lora_model(tiny_llama(0))
    vector = KnowledgeVector.from_lora(model)
    from_tuner = KnowledgeVector.from_lora(model.base_model)  # the LoraModel inside the PeftModel
    assert from_tuner.keys() == vector.keys()
    assert all(torch.equal(from_tuner[k], vector[k]) for k in vector)

    injected = inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tiny_llama(0))
    randomize_lora(injected)
    plain = KnowledgeVector.from_lora(injected)  # no peft_config: the layer checks alone apply
    assert plain.keys() == vector.keys()
    assert plain.metadata.base_fingerprint == model_fingerprint(tiny_llama(0))


def test_applying_to_a_peft_wrapped_model_is_refused():
    model = lora_model(tiny_llama(0))
    vector = KnowledgeVector.from_lora(model)
    with pytest.raises(VectorError, match="carries peft adapters"):
        vector.apply_to(model, -1.0)
    with pytest.raises(VectorError, match="carries peft adapters"):
        vector.apply_to(model.get_base_model(), -1.0)
    vector.apply_to(model.unload(), -1.0)  # the plain model again: fine
