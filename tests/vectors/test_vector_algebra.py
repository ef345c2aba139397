"""KnowledgeVector: construction, algebra and applying it to tiny Llamas."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from vector_helpers import finetuned_copy, params

from flearning.errors import FlearnError
from flearning.models import model_fingerprint
from flearning.vectors import KnowledgeVector, Provenance, VectorError, forget
from tiny import tiny_llama

EMBED = "model.embed_tokens.weight"


# -- construction ------------------------------------------------------------------------------------


def test_delta_is_exactly_the_parameter_difference(base, finetuned):
    vector = KnowledgeVector.from_models(base, finetuned, drop_zero=False)
    b, f = params(base), params(finetuned)
    assert vector.keys() == list(b)
    for key in b:
        expected = f[key] - b[key]  # computed independently, same fp32 operation
        assert vector[key].dtype == torch.float32
        assert torch.equal(vector[key], expected), key


def test_tied_embedding_appears_once(base, finetuned):
    vector = KnowledgeVector.from_models(base, finetuned)
    assert EMBED in vector
    assert "lm_head.weight" not in vector


def test_untied_model_has_a_separate_lm_head():
    base = tiny_llama(0, tie=False)
    vector = KnowledgeVector.from_models(base, finetuned_copy(base))
    assert EMBED in vector and "lm_head.weight" in vector


def test_zero_deltas_are_dropped_by_default_and_recorded(base, finetuned):
    full = KnowledgeVector.from_models(base, finetuned, drop_zero=False)
    sparse = KnowledgeVector.from_models(base, finetuned)
    dropped = set(full.keys()) - set(sparse.keys())
    assert dropped and all("norm" in k for k in dropped)  # the helper leaves norms untouched
    assert set(sparse.metadata.dropped_zero) == dropped
    assert all(torch.count_nonzero(full[k]) == 0 for k in dropped)
    # Lossless: both give the same model.
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    full.apply_to(a, 0.5)
    sparse.apply_to(b, 0.5)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_identical_models_are_refused(base):
    with pytest.raises(VectorError, match="every delta is zero"):
        KnowledgeVector.from_models(base, copy.deepcopy(base))


def test_metadata_records_the_base(base, finetuned):
    vector = KnowledgeVector.from_models(
        base,
        finetuned,
        Provenance(base_model="tiny", data_hash="abc", hyperparameters={"lr": 5e-5, "epochs": 3}),
    )
    meta = vector.metadata
    assert meta.kind == "full" and meta.method == "ft" and meta.base_model == "tiny"
    assert meta.base_fingerprint == model_fingerprint(base)
    assert meta.hyperparameters == {"lr": 5e-5, "epochs": 3}
    assert meta.flearning_version and meta.created
    given = KnowledgeVector.from_models(base, finetuned, Provenance(base_fingerprint="given"))
    assert given.metadata.base_fingerprint == "given"


def test_hyperparameters_must_be_json(base, finetuned):
    with pytest.raises(VectorError, match="metadata"):
        KnowledgeVector.from_models(base, finetuned, Provenance(hyperparameters={"x": object()}))


def test_layout_mismatch_between_models_is_refused(base):
    other = tiny_llama(0, hidden=48)
    with pytest.raises(VectorError, match="shape"):
        KnowledgeVector.from_models(base, other)
    with pytest.raises(VectorError, match="only in"):
        KnowledgeVector.from_models(base, tiny_llama(0, tie=False))


def test_from_state_dicts_matches_from_models_and_dedupes_tied_names(base, finetuned):
    sd_base, sd_ft = base.state_dict(), finetuned.state_dict()
    assert "lm_head.weight" in sd_base  # a live state_dict lists the tied tensor twice
    vector = KnowledgeVector.from_state_dicts(sd_base, sd_ft, Provenance(base_fingerprint="fp"))
    reference = KnowledgeVector.from_models(base, finetuned)
    assert vector.keys() == reference.keys()
    assert all(torch.equal(vector[k], reference[k]) for k in vector)
    # A file saved by transformers omits the tied name: same result.
    sd_saved = {k: v for k, v in sd_ft.items() if k != "lm_head.weight"}
    assert KnowledgeVector.from_state_dicts(sd_base, sd_saved).keys() == vector.keys()


def test_from_state_dicts_refuses_a_tie_on_one_side_only():
    tied, untied = tiny_llama(0), tiny_llama(0, tie=False)
    with pytest.raises(VectorError, match="tied in one"):
        KnowledgeVector.from_state_dicts(tied.state_dict(), untied.state_dict())


# -- applying ------------------------------------------------------------------------------------------


def test_lambda_zero_leaves_the_model_bit_for_bit(base, finetuned):
    vector = KnowledgeVector.from_models(base, finetuned)
    before = copy.deepcopy(base.state_dict())
    vector.apply_to(base, 0.0)
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_plus_then_minus_restores(base, finetuned):
    vector = KnowledgeVector.from_models(base, finetuned)
    before = params(base)
    vector.apply_to(base, 0.8)
    # After the first apply the model is no longer the vector's base, so the check must be waived.
    with pytest.raises(VectorError, match="another base model"):
        vector.apply_to(base, -0.8)
    vector.apply_to(base, -0.8, check_base=False)
    for key, value in params(base).items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0)


def test_lambda_one_gives_the_finetuned_model(base, finetuned):
    KnowledgeVector.from_models(base, finetuned).apply_to(base, 1.0)
    for (name, a), b in zip(base.named_parameters(), finetuned.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("lam", [0.7, -1.5])
def test_tied_embedding_is_updated_exactly_once(base, finetuned, lam):
    vector = KnowledgeVector.from_models(base, finetuned)
    embed_before = base.model.embed_tokens.weight.detach().clone()
    vector.apply_to(base, lam)
    expected = embed_before + lam * vector[EMBED]  # once; twice would be embed + 2·lam·Δ
    assert torch.equal(base.model.embed_tokens.weight, expected)
    assert base.lm_head.weight is base.model.embed_tokens.weight  # still tied


def test_untied_embedding_and_lm_head_are_updated_separately():
    base = tiny_llama(0, tie=False)
    tuned = finetuned_copy(base)
    before = params(base)
    KnowledgeVector.from_models(base, tuned).apply_to(base, 1.0)
    for name in (EMBED, "lm_head.weight"):
        torch.testing.assert_close(dict(base.named_parameters())[name], dict(tuned.named_parameters())[name])
        assert not torch.equal(dict(base.named_parameters())[name], before[name])


def test_forget_subtracts(base, finetuned):
    vector = KnowledgeVector.from_models(base, finetuned)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    forget(a, vector, 0.3)
    vector.apply_to(b, -0.3)
    (-vector).apply_to(base, 0.3)
    for x, y, z in zip(a.parameters(), b.parameters(), base.parameters(), strict=True):
        assert torch.equal(x, y)
        assert torch.equal(x, z)


def test_a_vector_may_cover_a_subset(base, finetuned):
    vector = KnowledgeVector.from_models(base, finetuned)
    key = "model.layers.1.mlp.up_proj.weight"
    subset = KnowledgeVector({key: vector[key]}, vector.metadata)
    before = params(base)
    subset.apply_to(base, 1.0)
    for name, value in params(base).items():
        assert (
            torch.equal(value, before[name] + vector[key])
            if name == key
            else torch.equal(value, before[name])
        )


def test_bf16_model_arithmetic_happens_in_fp32(base, finetuned):
    lam = -0.7
    vector = KnowledgeVector.from_models(base, finetuned)
    model = copy.deepcopy(base).to(torch.bfloat16)
    before = params(model)
    # The vector's base is the fp32 model; the bf16 copy has another fingerprint (dtype is hashed).
    vector.apply_to(model, lam, check_base=False)
    differs_from_naive = False
    for key, delta in vector.deltas.items():
        got = dict(model.named_parameters())[key]
        assert got.dtype == torch.bfloat16
        reference = (before[key].float() + lam * delta).to(torch.bfloat16)
        assert torch.equal(got, reference), key
        naive = before[key] + (lam * delta).to(torch.bfloat16)  # bf16 + bf16: double rounding
        differs_from_naive |= not torch.equal(got, naive)
    assert differs_from_naive  # the fp32 path is not a no-op refinement


# -- refusals --------------------------------------------------------------------------------------------


def test_other_base_model_is_refused(base, finetuned):
    vector = KnowledgeVector.from_models(base, finetuned)
    other = tiny_llama(5)
    before = params(other)
    with pytest.raises(VectorError, match="another base model") as err:
        vector.apply_to(other, -0.5)
    assert vector.metadata.base_fingerprint in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in params(other).items())
    vector.apply_to(other, -0.5, check_base=False)  # allowed when asked for


def test_shape_mismatch_is_refused_and_named(base, finetuned):
    vector = KnowledgeVector.from_models(base, finetuned)
    other = tiny_llama(0, vocab_size=300)
    with pytest.raises(VectorError, match=r"model\.embed_tokens\.weight: shape \(257, 32\) in the vector"):
        vector.apply_to(other, 1.0, check_base=False)


def test_missing_key_is_refused_and_named(base, finetuned):
    vector = KnowledgeVector.from_models(base, finetuned)
    bad = KnowledgeVector(
        {**vector.deltas, "model.layers.7.mlp.up_proj.weight": torch.zeros(64, 32)}, vector.metadata
    )
    with pytest.raises(VectorError, match=r"model\.layers\.7\.mlp\.up_proj\.weight: no such parameter"):
        bad.apply_to(base, 1.0)


def test_a_second_name_of_a_tied_weight_is_refused(base):
    untied = tiny_llama(0, tie=False)
    vector = KnowledgeVector.from_models(untied, finetuned_copy(untied))
    with pytest.raises(VectorError, match=r"lm_head\.weight: tied to model\.embed_tokens\.weight"):
        vector.apply_to(base, 1.0, check_base=False)


@pytest.mark.parametrize("lam", [float("nan"), float("inf"), "0.5", True])
def test_lambda_must_be_a_finite_number(base, finetuned, lam):
    vector = KnowledgeVector.from_models(base, finetuned)
    with pytest.raises(VectorError, match="lambda"):
        vector.apply_to(base, lam)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_delta_leaves_the_model_untouched(base, finetuned, bad):
    vector = KnowledgeVector.from_models(base, finetuned)
    key = "model.layers.1.self_attn.o_proj.weight"
    vector.deltas[key][3, 4] = bad
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(VectorError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight: 1 of 1024 values"):
        vector.apply_to(base, -0.5)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_overflow_is_caught_before_writing(base, finetuned):
    vector = KnowledgeVector.from_models(base, finetuned)
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(VectorError, match="not finite"):
        vector.apply_to(base, 1e300)  # a finite float64 λ, but λ·Δ overflows fp32
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_errors_are_user_errors():
    assert issubclass(VectorError, FlearnError)


# -- algebra ---------------------------------------------------------------------------------------------


def test_negation_scaling_addition(base, finetuned):
    v = KnowledgeVector.from_models(base, finetuned)
    w = KnowledgeVector.from_models(base, finetuned_copy(base, seed=2))
    for key in v:
        assert torch.equal((-v)[key], -v[key])
        assert torch.equal((v * 0.5)[key], v[key] * 0.5)
        assert torch.equal((2 * v)[key], v[key] * 2)
        assert torch.equal((v / 4)[key], v[key] / 4)
        assert torch.equal((v + w)[key], v[key] + w[key])
        assert torch.equal((v - w)[key], v[key] - w[key])
        assert torch.equal(sum([v, w])[key], v[key] + w[key])
    assert (-v).metadata.history == ["negate"]
    assert (v * 0.5).metadata.history == ["scale 0.5"]
    assert v.metadata.history == []  # the operands are not changed


def test_algebra_refuses_mismatches(base, finetuned):
    v = KnowledgeVector.from_models(base, finetuned)
    other_base = tiny_llama(7)
    w = KnowledgeVector.from_models(other_base, finetuned_copy(other_base))
    with pytest.raises(VectorError, match="different base models"):
        v + w  # noqa: B018
    subset = KnowledgeVector({k: v[k] for k in v.keys()[:3]}, v.metadata)
    with pytest.raises(VectorError, match="only in the first vector"):
        v - subset  # noqa: B018
    with pytest.raises(TypeError):
        v * "2"  # noqa: B018
    with pytest.raises(VectorError, match="finite"):
        v * float("nan")  # noqa: B018
    with pytest.raises(VectorError, match="zero"):
        v / 0  # noqa: B018


def test_norm_and_stats(base, finetuned):
    v = KnowledgeVector.from_models(base, finetuned)
    flat = torch.cat([t.flatten().double() for t in v.deltas.values()])
    stats = v.stats()
    assert stats.num_tensors == len(v) and stats.num_params == flat.numel() == v.num_params
    assert math.isclose(v.norm(), float(flat.norm()), rel_tol=1e-9)
    assert math.isclose(stats.max_abs, float(flat.abs().max()), rel_tol=1e-6)
    assert math.isclose(stats.rms, float(flat.pow(2).mean().sqrt()), rel_tol=1e-9)
    assert math.isclose((v * -3).norm(), 3 * v.norm(), rel_tol=1e-6)
    norms = v.tensor_norms()
    assert math.isclose(math.sqrt(sum(n * n for n in norms.values())), v.norm(), rel_tol=1e-9)


def test_constructor_validates_tensors(base, finetuned):
    meta = KnowledgeVector.from_models(base, finetuned).metadata
    with pytest.raises(VectorError, match="at least one"):
        KnowledgeVector({}, meta)
    with pytest.raises(VectorError, match="floating point"):
        KnowledgeVector({"x": torch.ones(2, dtype=torch.int64)}, meta)
    v = KnowledgeVector({"x": torch.ones(2, dtype=torch.float16)}, meta)
    assert v["x"].dtype == torch.float32


def test_from_deltas_wraps_precomputed_deltas(base, finetuned):
    reference = KnowledgeVector.from_models(base, finetuned)
    deltas = {
        k: p.detach().float() - q.detach().float()
        for (k, p), q in zip(finetuned.named_parameters(), base.parameters(), strict=True)
    }
    vector = KnowledgeVector.from_deltas(
        deltas, Provenance(base_fingerprint="fp", method="update:ft"), kind="full"
    )
    assert vector.keys() == reference.keys()  # zero deltas dropped the same way
    assert all(torch.equal(vector[k], reference[k]) for k in vector)
    assert vector.metadata.method == "update:ft" and vector.metadata.base_fingerprint == "fp"
