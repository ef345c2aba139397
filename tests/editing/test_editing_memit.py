"""MEMIT: the closed form against ROME's (Sherman–Morrison, λ → 0), the batched z optimisation against
one request at a time, the layer loop's order (keys and residuals after the lower layers' updates), and
the edits moving the residual stream towards z on a tiny Llama and a tiny GPT-2."""

from __future__ import annotations

import pytest
import torch
from editing_helpers import REQUESTS, SMALL_C, gpt2, llama, read_at_subject

from flearning.editing.architectures import architecture_of, math_weight
from flearning.editing.covariance import second_moment
from flearning.editing.deltas import apply_deltas
from flearning.editing.memit import mean_keys, memit_edit, memit_update
from flearning.editing.requests import CONTEXT_PREFIXES, as_requests
from flearning.editing.rome import rome_update
from flearning.editing.values import ValueSettings, length_groups, optimise_values
from flearning.errors import FlearnError
from flearning.models import model_fingerprint

LAMBDAS = (1e2, 1.0, 1e-2, 1e-4, 1e-6)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def test_one_key_tends_to_romes_closed_form_as_lambda_goes_to_zero():
    """R kᵀ (λC + k kᵀ)⁻¹ = R (C⁻¹k)ᵀ / (λ + kᵀC⁻¹k) (Sherman–Morrison): ROME's form at λ = 0, with a
    relative gap of λ / (λ + kᵀC⁻¹k)."""
    torch.manual_seed(0)
    a = torch.randn(12, 40, dtype=torch.float64)
    c = a @ a.T / 40  # a positive definite second moment
    w, k, v = torch.randn(5, 12, dtype=torch.float64), torch.randn(12, dtype=torch.float64), torch.randn(5)
    residual = v.double() - w @ k
    c_inv_k = torch.linalg.solve(c, k)
    rome = rome_update(residual, k, c_inv_k)
    gaps = []
    for lam in LAMBDAS:
        memit = memit_update(residual[None], k[None], c, lam)
        sherman_morrison = torch.outer(residual, c_inv_k) / (lam + k @ c_inv_k)
        assert _relative(memit, sherman_morrison) < 1e-7  # the solve nears a rank-one matrix as λ → 0
        gaps.append(_relative(memit, rome))
        assert gaps[-1] == pytest.approx(float(lam / (lam + k @ c_inv_k)), rel=1e-2)
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-7


def test_memit_on_one_layer_approaches_rome_on_its_own_key_and_residual(tok):
    """The driver: one request, one layer; ΔW(λ) → rome_update(R, k, C⁻¹k) for MEMIT's own k and R."""
    model = llama()
    arch = architecture_of(model)
    c = second_moment(model, tok, arch.rewrite_name(1), SMALL_C).double()
    gaps = []
    for lam in (10.0, 1e-1, 1e-3):
        result = memit_edit(model, tok, REQUESTS[:1], [1], mom2_update_weight=lam, covariance={1: c})
        k, r = result.keys[1][0], result.residuals[1][0]
        rome = rome_update(r, k, torch.linalg.solve(c, k.double()))
        gaps.append(_relative(result.deltas[arch.weight_name(1)].double(), rome))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3


def test_batched_z_equals_one_request_at_a_time(tok):
    """One forward per step for all requests gives each request's z alone, also when one request stops
    early (its δ frozen while the others go on)."""
    model = llama()
    requests = as_requests(REQUESTS)
    module = architecture_of(model).block_name(2)
    settings = ValueSettings(stop_loss=5.75)  # request 1 reaches it after a few steps, the others never
    alone = [
        optimise_values(model, tok, [r], module, prefixes=CONTEXT_PREFIXES, settings=settings)
        for r in requests
    ]
    batched = optimise_values(model, tok, requests, module, prefixes=CONTEXT_PREFIXES, settings=settings)
    steps = [a.steps[0] for a in alone]
    assert steps[1] < 20 and steps[0] == steps[2] == 24  # the early stop is exercised
    assert batched.steps == steps
    for i, a in enumerate(alone):
        assert torch.allclose(batched.init[i], a.init[0], rtol=1e-5, atol=1e-6)
        assert _relative(batched.target[i], a.target[0]) < 1e-4
        assert batched.losses[i] == pytest.approx(a.losses[0], rel=1e-4)


def test_passes_of_requests_sorted_by_length_come_back_in_order(tok):
    """Passes of two requests (formed shortest first) give each request's z alone, in the given order."""
    model = gpt2()
    requests = as_requests(REQUESTS)[::-1]  # the longest first: the passes reorder them
    module = architecture_of(model).block_name(1)
    settings = ValueSettings(requests_per_pass=2, steps=6)
    alone = [
        optimise_values(model, tok, [r], module, prefixes=CONTEXT_PREFIXES, settings=settings)
        for r in requests
    ]
    passes = optimise_values(model, tok, requests, module, prefixes=CONTEXT_PREFIXES, settings=settings)
    for i, a in enumerate(alone):
        assert torch.allclose(passes.init[i], a.init[0], rtol=1e-5, atol=1e-6)
        assert _relative(passes.target[i], a.target[0]) < 1e-4
        assert passes.losses[i] == pytest.approx(a.losses[0], rel=1e-4)
        assert passes.steps[i] == a.steps[0]


def test_length_groups_cut_where_lengths_spread():
    assert length_groups([9, 3, 4, 20, 8, 5], tolerance=2) == [[1, 2, 5], [4, 0], [3]]
    assert length_groups([5, 5, 5], tolerance=0) == [[0, 1, 2]]
    assert length_groups([7], tolerance=4) == [[0]]


def test_keys_average_the_prompt_alone_and_the_prefixed_prompts():
    keys = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(6, 2)  # 2 requests x (alone + 2 prefixes)
    expected = torch.stack([(keys[0] + (keys[1] + keys[2]) / 2) / 2, (keys[3] + (keys[4] + keys[5]) / 2) / 2])
    assert torch.equal(mean_keys(keys, 3), expected)


@pytest.mark.parametrize("build", [llama, gpt2], ids=["llama", "gpt2"])
def test_layers_are_updated_lowest_first_on_the_updated_model(build, tok):
    model = build()
    arch = architecture_of(model)
    before = model_fingerprint(model)
    requests = as_requests(REQUESTS)
    result = memit_edit(model, tok, REQUESTS, [2, 1], mom2_update_weight=1.0, covariance=SMALL_C)
    assert model_fingerprint(model) == before and result.layers == [1, 2]
    for layer in (1, 2):
        name = arch.weight_name(layer)
        assert result.deltas[name].shape == model.get_parameter(name).shape
    c2 = second_moment(model, tok, arch.rewrite_name(2), SMALL_C)  # of the model as given, as MEMIT's
    z_module = arch.block_name(2)
    outputs = torch.stack([read_at_subject(model, tok, r, z_module, "out") for r in requests])
    assert torch.allclose(result.residuals[1], result.targets - outputs, atol=1e-5)
    # layer 2's keys and residuals are read on the model holding layer 1's update
    apply_deltas(model, {arch.weight_name(1): result.deltas[arch.weight_name(1)]})
    outputs_1 = torch.stack([read_at_subject(model, tok, r, z_module, "out") for r in requests])
    assert torch.allclose(result.residuals[2], result.targets - outputs_1, atol=1e-5)
    assert not torch.allclose(result.residuals[2], result.residuals[1], atol=1e-3)
    # ΔW_2 = R Kᵀ(λC + KKᵀ)⁻¹ with R the residual over the one layer left
    expected = memit_update(result.residuals[2], result.keys[2], c2, 1.0)
    delta_2 = result.deltas[arch.weight_name(2)]
    assert torch.allclose((delta_2.T if arch.conv1d else delta_2).double(), expected, rtol=1e-4, atol=1e-6)
    # both updates together move the residual stream towards z
    apply_deltas(model, {arch.weight_name(2): delta_2})
    after = torch.stack([read_at_subject(model, tok, r, z_module, "out") for r in requests])
    assert torch.linalg.norm(result.targets - after) < 0.8 * torch.linalg.norm(result.targets - outputs)
    assert math_weight(model, arch, 1).shape == (32, 64)


def test_one_layer_writes_the_whole_residual(tok):
    """With one layer the whole residual is written: ΔW k ≈ R when λ is tiny (the key is nearly interpolated)."""
    model = llama()
    arch = architecture_of(model)
    result = memit_edit(model, tok, REQUESTS[:1], [1], mom2_update_weight=1e-6, covariance=SMALL_C)
    delta = result.deltas[arch.weight_name(1)].double()
    k, r = result.keys[1][0].double(), result.residuals[1][0].double()
    assert _relative(delta @ k, r) < 1e-4


def test_bad_value_settings_are_refused(tok):
    with pytest.raises(FlearnError, match="steps >= 1"):
        memit_edit(llama(), tok, REQUESTS[:1], [1], covariance=SMALL_C, values=ValueSettings(steps=0))
