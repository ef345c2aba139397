"""evaluate(): batched equals one-at-a-time, reference predictions and their caches, summaries."""

from __future__ import annotations

import json
import math

import pytest
from eval_helpers import assert_same_records, crafted_records, sharp_llama

from flearning.data.records import KnowledgeRecord, PromptAnswer
from flearning.errors import FlearnError
from flearning.evaluation import (
    METRIC_DEFINITIONS,
    METRICS,
    EvalResult,
    ReferencePredictions,
    aggregate,
    evaluate_oracle,
    reference_predictions,
)
from flearning.evaluation import reference as reference_module
from flearning.evaluation.evaluate import evaluate, teacher_forced_accuracy
from flearning.evaluation.probes import record_probes


@pytest.fixture(autouse=True)
def _fresh_memory_cache():
    reference_module.clear_memory_cache()
    yield
    reference_module.clear_memory_cache()


def test_every_metric_has_a_definition():
    assert set(METRIC_DEFINITIONS) == set(METRICS)
    assert all(d.strip() for d in METRIC_DEFINITIONS.values())


@pytest.mark.parametrize("pack", [True, False])
def test_batched_evaluate_equals_one_at_a_time(tokenizer, pack):
    model, before = sharp_llama(0), sharp_llama(5)
    records = crafted_records()
    batched = evaluate(
        model,
        tokenizer,
        records,
        reference=before,
        batch_size=4,
        fluency=True,
        fluency_tokens=10,
        progress=False,
        pack=pack,
    )
    single = evaluate_oracle(
        model, tokenizer, records, reference_model=before, fluency=True, fluency_tokens=10
    )
    assert_same_records(batched.records, single.records, tol=1e-6)
    summary = batched.summary()
    # Missing metrics are excluded, with counts.
    assert summary["reliability"]["n"] == len(records)
    assert summary["generality"]["n"] == sum(1 for r in records if r.rephrase_prompts)
    assert summary["portability"]["n"] == sum(1 for r in records if r.portability)
    assert summary["locality"]["n"] == sum(1 for r in records if r.locality)
    # Two different random models disagree somewhere: locality is not trivially 100.
    assert summary["locality"]["mean"] < 100


def test_locality_is_none_without_reference(tokenizer):
    result = evaluate(sharp_llama(0), tokenizer, crafted_records(4), generation=False, progress=False)
    assert all(r["locality"] is None for r in result.records)
    assert result.summary()["locality"] == {"mean": None, "std": None, "n": 0}
    assert all(r["gen_exact_match"] is None and "generated" not in r for r in result.records)
    assert all(r["fluency"] is None for r in result.records)


def test_reference_against_itself_is_full_locality(tokenizer):
    model = sharp_llama(0)
    result = evaluate(model, tokenizer, crafted_records(), reference=model, generation=False, progress=False)
    assert {r["locality"] for r in result.records if r["locality"] is not None} == {1.0}


def test_model_and_precomputed_reference_agree(tokenizer):
    model, before = sharp_llama(0), sharp_llama(5)
    records = crafted_records()
    ref = reference_predictions(before, tokenizer, records, batch_size=3)
    a = evaluate(model, tokenizer, records, reference=ref, generation=False, progress=False)
    b = evaluate(model, tokenizer, records, reference=before, generation=False, progress=False)
    assert [r["locality"] for r in a.records] == [r["locality"] for r in b.records]


def test_reference_cached_in_memory(tokenizer, monkeypatch):
    before = sharp_llama(5)
    records = crafted_records()
    calls = []
    real = reference_module.score_probes
    monkeypatch.setattr(reference_module, "score_probes", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = reference_predictions(before, tokenizer, records)
    second = reference_predictions(before, tokenizer, records)
    assert second is first and len(calls) == 1
    reference_predictions(before, tokenizer, records, use_cache=False)
    assert len(calls) == 2
    # Other weights: other fingerprint, recomputed.
    reference_predictions(sharp_llama(6), tokenizer, records)
    assert len(calls) == 3


def test_reference_cached_on_disk_as_json(tokenizer, tmp_path, monkeypatch):
    before = sharp_llama(5)
    records = crafted_records()
    first = reference_predictions(before, tokenizer, records, cache_dir=tmp_path)
    files = list(tmp_path.glob("reference-*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    assert doc["format"] == "flearning.reference-predictions"
    assert doc["model_fingerprint"] == first.model_fingerprint
    reference_module.clear_memory_cache()
    monkeypatch.setattr(reference_module, "score_probes", lambda *a, **k: pytest.fail("recomputed"))
    again = reference_predictions(before, tokenizer, records, cache_dir=tmp_path)
    assert again == first
    assert ReferencePredictions.load(files[0]) == first


def test_corrupt_disk_cache_is_ignored(tokenizer, tmp_path):
    before = sharp_llama(5)
    records = crafted_records(4)
    first = reference_predictions(before, tokenizer, records, cache_dir=tmp_path)
    path = next(tmp_path.glob("reference-*.json"))
    path.write_text("{not json")
    reference_module.clear_memory_cache()
    assert reference_predictions(before, tokenizer, records, cache_dir=tmp_path) == first
    json.loads(path.read_text())  # rewritten


def test_reference_for_other_records_is_refused(tokenizer):
    before = sharp_llama(5)
    records = crafted_records()
    ref = reference_predictions(before, tokenizer, records[:2])
    with pytest.raises(FlearnError, match="do not cover"):
        evaluate(sharp_llama(0), tokenizer, records, reference=ref, generation=False, progress=False)


def test_subset_of_reference_records_is_fine(tokenizer):
    before = sharp_llama(5)
    records = crafted_records()
    ref = reference_predictions(before, tokenizer, records)
    result = evaluate(
        sharp_llama(0), tokenizer, records[3:7], reference=ref, generation=False, progress=False
    )
    assert len(result.records) == 4


def test_training_mode_is_restored(tokenizer):
    model = sharp_llama(0)
    model.train()
    evaluate(model, tokenizer, crafted_records(3), generation=False, progress=False)
    assert model.training


def test_teacher_forced_accuracy_matches_reliability(tokenizer):
    model = sharp_llama(0)
    records = crafted_records()
    result = evaluate(model, tokenizer, records, generation=False, progress=False)
    accs = teacher_forced_accuracy(
        model, tokenizer, [(r.prompt, r.target_new) for r in records], batch_size=3
    )
    assert accs == pytest.approx([r["reliability"] for r in result.records], abs=1e-9)


def test_probes_use_encode_pair(tokenizer):
    from flearning.data.encoding import encode_pair

    record = crafted_records(2)[1]
    probes = record_probes(tokenizer, record)
    pair = encode_pair(tokenizer, record.prompt, record.target_new)
    assert list(probes.new.prompt_ids + probes.new.target_ids) == pair.input_ids
    assert len(probes.new.prompt_ids) == pair.prompt_len


def test_efficacy_and_exact_match_on_a_memorised_fact(tokenizer):
    """A tiny model trained a few steps on 'AB C<eos>': reliability, efficacy and exact match are all 1
    (the EOS makes it stop after the answer: ' CCCC' would not match 'C' on a word boundary)."""
    import torch

    from tiny import tiny_llama

    model = tiny_llama(0)
    record = KnowledgeRecord(id="x", prompt="AB", target_old="Z", target_new="C")
    ids = torch.tensor(
        [
            tokenizer("AB")["input_ids"]
            + tokenizer(" C", add_special_tokens=False)["input_ids"]
            + [tokenizer.eos_token_id]
        ]
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    row = evaluate(model, tokenizer, [record], progress=False).records[0]
    assert row["reliability"] == 1.0
    assert row["old_retention"] == 0.5  # byte tokens " ", "Z": the shared space is still predicted
    assert row["efficacy"] == 1.0
    assert row["gen_exact_match"] == 1.0 and row["generated"] == " C"


def test_summary_hand_computed():
    rows = [
        {"id": "a", **dict.fromkeys(METRICS), "reliability": 1.0, "generality": 0.5},
        {"id": "b", **dict.fromkeys(METRICS), "reliability": 0.0, "generality": None},
        {"id": "c", **dict.fromkeys(METRICS), "reliability": 0.5, "generality": 1.0},
    ]
    summary = EvalResult(rows).summary()
    assert summary["reliability"]["mean"] == pytest.approx(50.0)
    assert summary["reliability"]["std"] == pytest.approx(50.0)  # sample std of 1, 0, 0.5
    assert summary["reliability"]["n"] == 3
    assert summary["generality"] == pytest.approx({"mean": 75.0, "std": math.sqrt(0.125) * 100, "n": 2})
    assert summary["locality"] == {"mean": None, "std": None, "n": 0}
    with pytest.raises(KeyError):
        EvalResult(rows).values("accuracy")


def test_aggregate_over_seeds_hand_computed():
    def run(values, seed):
        return EvalResult(
            [{"id": str(i), **dict.fromkeys(METRICS), "reliability": v} for i, v in enumerate(values)],
            seed=seed,
        )

    agg = aggregate([run([1.0, 0.0], 0), run([1.0, 1.0], 1), run([0.5, 0.5], 2)])
    rel = agg["reliability"]
    assert rel["seed_means"] == pytest.approx([50.0, 100.0, 50.0])
    assert rel["mean"] == pytest.approx(200 / 3)
    assert rel["std_seeds"] == pytest.approx(math.sqrt(((50 - 200 / 3) ** 2 * 2 + (100 - 200 / 3) ** 2) / 2))
    assert rel["std"] == pytest.approx((math.sqrt(0.5) * 100 + 0 + 0) / 3)  # mean of per-seed record stds
    assert rel["n"] == 6 and rel["n_seeds"] == 3
    assert agg["generality"]["mean"] is None and agg["generality"]["n_seeds"] == 0
    single = aggregate([run([1.0, 0.0], 0)])["reliability"]
    assert single["std_seeds"] is None and single["mean"] == pytest.approx(50.0)


def test_bad_arguments(tokenizer):
    with pytest.raises(FlearnError):
        evaluate(sharp_llama(0), tokenizer, crafted_records(2), batch_size=0, progress=False)
    with pytest.raises(TypeError):
        evaluate(sharp_llama(0), tokenizer, crafted_records(2), reference="θ", progress=False)


def test_record_with_only_locality(tokenizer):
    rec = KnowledgeRecord(
        id="l", prompt="P", target_old="a", target_new="b", locality=[PromptAnswer(prompt="Q", answer="zz")]
    )
    model = sharp_llama(0)
    row = evaluate(
        model, tokenizer, [rec], reference=sharp_llama(1), generation=False, progress=False
    ).records[0]
    assert row["generality"] is None and row["paraphrase"] is None and row["portability"] is None
    assert row["locality"] in (0.0, 0.5, 1.0)
