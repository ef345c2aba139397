"""ROME: the update is rank one and maps the prompt's key to v* exactly, u is C⁻¹k*, the model is left
unchanged, the edit lowers the target's NLL; on a tiny Llama and a tiny GPT-2 (Conv1D, transposed)."""

from __future__ import annotations

import pytest
import torch
from editing_helpers import REQUESTS, SMALL_C, gpt2, llama, read_at_subject, target_nll

from flearning.editing.architectures import architecture_of, math_weight
from flearning.editing.covariance import second_moment
from flearning.editing.deltas import apply_deltas
from flearning.editing.requests import as_request
from flearning.editing.rome import rome_edit, rome_edits, rome_update
from flearning.models import model_fingerprint

LAYER = 1
BUILDERS = {"llama": llama, "gpt2": gpt2}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def edited(request):
    """(model, tokenizer, request, result): one ROME edit of a tiny model, computed once per family."""
    from tiny import tiny_tokenizer

    model, tok = BUILDERS[request.param](), tiny_tokenizer()
    before = model_fingerprint(model)
    result = rome_edit(model, tok, REQUESTS[0], LAYER, covariance=SMALL_C)
    assert model_fingerprint(model) == before  # the model is left as it was
    return model, tok, as_request(REQUESTS[0]), result


def test_the_update_is_rank_one_in_the_parameters_layout(edited):
    model, _, _, result = edited
    arch = architecture_of(model)
    ((name, delta),) = result.deltas.items()
    assert name == arch.weight_name(LAYER)
    assert delta.shape == model.get_parameter(name).shape  # GPT-2: [in, out]
    s = torch.linalg.svdvals(delta.double())
    assert s[0] > 1e-3 and s[1] / s[0] < 1e-6


def test_the_edited_layer_maps_the_key_to_v_star(edited):
    """(W + ΔW) k + b = v* to float32 rounding (relative 1e-5), and in a forward of the edited model."""
    model, tok, request, result = edited
    arch = architecture_of(model)
    module = arch.rewrite_name(LAYER)
    w = math_weight(model, arch, LAYER).detach()
    delta = result.deltas[arch.weight_name(LAYER)]
    delta = delta.T if arch.conv1d else delta
    bias = model.get_submodule(module).bias
    bias = bias.detach() if bias is not None else 0
    mapped = (w + delta) @ result.key + bias
    assert torch.linalg.norm(mapped - result.value) <= 1e-5 * torch.linalg.norm(result.value)
    assert torch.allclose(w @ result.key + bias, result.output, rtol=1e-4, atol=1e-5)
    apply_deltas(model, result.deltas)
    try:
        out = read_at_subject(model, tok, request, module, "out")
        assert torch.linalg.norm(out - result.value) <= 1e-4 * torch.linalg.norm(result.value)
    finally:
        apply_deltas(model, result.deltas, scale=-1.0)


def test_u_is_the_inverse_second_moment_times_the_mean_key(edited):
    model, tok, _, result = edited
    c = second_moment(model, tok, architecture_of(model).rewrite_name(LAYER), SMALL_C).double()
    assert torch.allclose(c @ result.u.double(), result.key_mean.double(), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(result.key_mean, result.key)  # k* averages the prefixed prompts too


def test_the_edit_lowers_the_targets_nll(edited):
    model, tok, request, result = edited
    nll = result.values.nll[0]
    assert nll[-1] < nll[0] and result.values.steps[0] == 24  # 25 evaluations, no step after the last
    before = target_nll(model, tok, request)
    apply_deltas(model, result.deltas)
    try:
        after = target_nll(model, tok, request)
    finally:
        apply_deltas(model, result.deltas, scale=-1.0)
    assert after < before - 0.02


def test_the_closed_form_holds_for_any_key_and_u():
    """The paper's eq. 2 (k* in both places) and the code's form (the prompt's own key) are one function."""
    torch.manual_seed(0)
    w, k, v, u = torch.randn(6, 9), torch.randn(9), torch.randn(6), torch.randn(9)
    delta = rome_update(v - w @ k, k, u)
    assert torch.allclose((w.double() + delta) @ k.double(), v.double(), atol=1e-12)
    assert torch.linalg.matrix_rank(delta) == 1


def test_without_mom2_adjustment_u_is_the_mean_key(tok):
    model = llama()
    result = rome_edit(model, tok, REQUESTS[1], LAYER, mom2_adjustment=False)
    assert torch.allclose(result.u, result.key_mean)


def test_sequential_edits_sum_and_leave_the_model_unchanged(tok):
    model = llama()
    before = model_fingerprint(model)
    total, results = rome_edits(model, tok, REQUESTS[:2], LAYER, covariance=SMALL_C)
    assert model_fingerprint(model) == before and len(results) == 2
    (name,) = total
    assert torch.allclose(total[name], results[0].deltas[name] + results[1].deltas[name])
    # the second edit was computed on the model holding the first: its key still maps to its v*
    apply_deltas(model, total)
    out = read_at_subject(
        model, tok, as_request(REQUESTS[1]), architecture_of(model).rewrite_name(LAYER), "out"
    )
    assert torch.linalg.norm(out - results[1].value) <= 1e-4 * torch.linalg.norm(results[1].value)
