"""Locality and portability by category (KnowEdit): the data layer keeps each probe's category, and the
metrics average within a category, then over categories, as EasyEdit's KnowEdit summary does."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
from eval_helpers import assert_same_records, sharp_llama

from flearning.data import load_dataset, save_jsonl
from flearning.data.records import KnowledgeRecord, PromptAnswer
from flearning.data.store import records_hash
from flearning.evaluation import EvalResult, evaluate_oracle, write_report
from flearning.evaluation.evaluate import evaluate, pair_scores
from flearning.evaluation.metrics import NO_CATEGORY, category_means
from flearning.evaluation.results import aggregate_categories


def _knowedit_record(i: int) -> dict:
    return {
        "case_id": i,
        "prompt": f"The mother tongue of person {i} is",
        "subject": f"person {i}",
        "ground_truth": "French",
        "target_new": "English",
        "rephrase_prompt": f"Person {i} speaks natively",
        "locality": {
            "Relation_Specificity": [
                {"prompt": f"The father of person {i} is", "ground_truth": [["Paul", "Paulo"]]},
                {"prompt": f"The sister of person {i} is", "ground_truth": ["Anne"]},
            ],
            "Forgetfulness": [{"prompt": f"Person {i} was born in", "ground_truth": "Lyon"}],
        },
        "portability": {
            "Reasoning": [{"prompt": f"The language person {i} writes in is", "ground_truth": "English"}],
            "Subject_Aliasing": {"prompt": f"P{i}'s mother tongue is", "ground_truth": "English"},
        },
    }


def test_knowedit_categories_are_kept(tmp_path):
    path = tmp_path / "knowedit.json"
    path.write_text(json.dumps([_knowedit_record(0), _knowedit_record(1)]))
    records = load_dataset(path).records
    pa = PromptAnswer
    assert records[0].locality == [
        pa(prompt="The father of person 0 is", answer="Paul", category="Relation_Specificity"),
        pa(prompt="The sister of person 0 is", answer="Anne", category="Relation_Specificity"),
        pa(prompt="Person 0 was born in", answer="Lyon", category="Forgetfulness"),
    ]
    assert [p.category for p in records[1].portability] == ["Reasoning", "Subject_Aliasing"]
    # the project's own format keeps them through a save and a load
    saved = save_jsonl(records, tmp_path / "facts.jsonl")
    first = json.loads(saved.read_text().splitlines()[0])
    assert first["locality"][2] == {
        "prompt": "Person 0 was born in",
        "answer": "Lyon",
        "category": "Forgetfulness",
    }
    assert load_dataset(saved).records == records


def test_records_without_categories_serialise_and_hash_as_before():
    record = KnowledgeRecord(
        id="x",
        prompt="p",
        target_old="o",
        target_new="n",
        locality=[PromptAnswer(prompt="lp", answer="la")],
        portability=[PromptAnswer(prompt="pp", answer="pa")],
    )
    dumped = record.model_dump(mode="json")
    assert dumped["locality"] == [{"prompt": "lp", "answer": "la"}]  # no "category": null
    # the hash scheme of flearning.data.store, spelled out: unchanged for records without categories
    legacy = {
        "id": "x",
        "prompt": "p",
        "target_old": "o",
        "target_new": "n",
        "subject": None,
        "rephrase_prompts": [],
        "locality": [{"prompt": "lp", "answer": "la"}],
        "portability": [{"prompt": "pp", "answer": "pa"}],
    }
    h = hashlib.sha256(b"flearning.records/v1\n")
    h.update(
        json.dumps(legacy, sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"
    )
    assert records_hash([record]) == h.hexdigest()


# ---------------------------------------------------------------------------------------------- metrics


def test_category_means_within_then_over_categories():
    # A: 1, 0 -> 0.5; B: 1 -> 1.0; the record's value is (0.5 + 1.0) / 2 = 0.75, not the plain 2/3
    assert category_means([1.0, 0.0, 1.0], ["A", "A", "B"]) == (0.75, {"A": 0.5, "B": 1.0})
    # no categories: the plain mean over the probes, as before categories existed
    assert category_means([1.0, 0.0, 1.0], [None, None, None]) == (pytest.approx(2 / 3), {})
    assert category_means([], []) == (None, {})
    # uncategorised probes beside categorised ones are a category of their own
    assert category_means([0.0, 1.0], [None, "A"]) == (0.5, {NO_CATEGORY: 0.0, "A": 1.0})


def _categorised_records(n: int = 6) -> list[KnowledgeRecord]:
    pa = PromptAnswer
    records = []
    for i in range(n):
        locality = [pa(prompt=f"The father of {i} is", answer="Paul Martin", category="Relation_Specificity")]
        locality += [pa(prompt=f"Sister of {i}:", answer="Anne", category="Relation_Specificity")] * (i % 2)
        if i % 3:
            locality.append(pa(prompt=f"{i} was born in", answer="Lyon", category="Forgetfulness"))
        portability = [pa(prompt=f"{i} writes in", answer="English", category="Reasoning")] if i % 2 else []
        portability += [pa(prompt=f"P{i} speaks", answer="Englis", category="Subject_Aliasing")]
        portability += [pa(prompt=f"Q{i} speaks", answer="Eng", category="Subject_Aliasing")] * (i % 3 == 0)
        records.append(
            KnowledgeRecord(
                id=f"k{i}",
                prompt=f"The mother tongue of {i} is",
                target_old="French",
                target_new="English",
                locality=locality,
                portability=portability,
            )
        )
    return records


def test_categories_batched_equal_one_at_a_time_and_hand_values(tokenizer):
    model, before = sharp_llama(0), sharp_llama(3)
    records = _categorised_records()
    batched = evaluate(
        model, tokenizer, records, reference=before, batch_size=3, generation=False, progress=False
    )
    single = evaluate_oracle(model, tokenizer, records, reference_model=before, generation=False)
    assert_same_records(batched.records, single.records, tol=1e-9)
    # by hand: per-probe values from pair_scores, mean within category, then over categories
    for record, row in zip(records, batched.records, strict=True):
        pairs = [(p.prompt, p.answer) for p in record.locality]
        now = pair_scores(model, tokenizer, pairs)
        ref = pair_scores(before, tokenizer, pairs)
        agree = [np.mean(np.equal(a.argmax, b.argmax)) for a, b in zip(now, ref, strict=True)]
        groups: dict[str, list[float]] = {}
        for p, value in zip(record.locality, agree, strict=True):
            groups.setdefault(p.category, []).append(value)
        want = {name: float(np.mean(v)) for name, v in groups.items()}
        assert row["locality_by_category"] == pytest.approx(want, abs=1e-12)
        assert row["locality"] == pytest.approx(np.mean(list(want.values())), abs=1e-12)
        accuracy = [
            s.accuracy
            for s in pair_scores(model, tokenizer, [(p.prompt, p.answer) for p in record.portability])
        ]
        groups = {}
        for p, value in zip(record.portability, accuracy, strict=True):
            groups.setdefault(p.category, []).append(value)
        want = {name: float(np.mean(v)) for name, v in groups.items()}
        assert row["portability_by_category"] == pytest.approx(want, abs=1e-12)
        assert row["portability"] == pytest.approx(np.mean(list(want.values())), abs=1e-12)


def _easyedit_summary(rows: list[dict], key: str) -> tuple[dict[str, float], float]:
    """EasyEdit's KnowEdit numbers restated from per-record category values: per category, the mean over
    the records that have it (``summary_metrics``); overall, the mean over records of the mean over the
    record's categories (``Overall_locality`` / ``Overall_portability``)."""
    names = {name for r in rows for name in r.get(f"{key}_by_category", {})}
    per_category = {
        name: float(
            np.mean([r[f"{key}_by_category"][name] for r in rows if name in r.get(f"{key}_by_category", {})])
        )
        for name in names
    }
    overall = float(
        np.mean(
            [np.mean(list(r[f"{key}_by_category"].values())) for r in rows if r.get(f"{key}_by_category")]
        )
    )
    return per_category, overall


def test_category_summary_equals_easyedit_rule(tokenizer):
    result = evaluate(
        sharp_llama(1),
        tokenizer,
        _categorised_records(),
        reference=sharp_llama(2),
        generation=False,
        progress=False,
    )
    summary, by_category = result.summary(), result.category_summary()
    for key in ("locality", "portability"):
        per_category, overall = _easyedit_summary(result.records, key)
        assert {name: e["mean"] for name, e in by_category[key].items()} == pytest.approx(
            {name: 100 * v for name, v in per_category.items()}, abs=1e-9
        )
        assert summary[key]["mean"] == pytest.approx(100 * overall, abs=1e-9)
    assert by_category["locality"]["Forgetfulness"]["n"] == 4  # records 1, 2, 4, 5
    assert list(by_category["portability"]) == ["Subject_Aliasing", "Reasoning"]  # first seen first


def test_aggregate_categories_over_seeds():
    def run(seed, a, b):
        rows = [{"id": "1", "locality": None, "locality_by_category": {"A": a, "B": b}}]
        return EvalResult(records=rows, seed=seed)

    agg = aggregate_categories([run(0, 1.0, 0.0), run(1, 0.5, 0.0)])
    assert agg["locality"]["A"]["mean"] == pytest.approx(75.0)
    assert agg["locality"]["A"]["std_seeds"] == pytest.approx(math.sqrt(2 * 25.0**2))
    assert agg["locality"]["B"]["seed_means"] == [0.0, 0.0]
    assert "portability" not in agg
    assert aggregate_categories([EvalResult(records=[{"id": "1", "locality": 1.0}])]) == {}


def test_report_carries_categories_only_when_there_are_some(tmp_path, tokenizer):
    model = sharp_llama(0)
    with_cats = evaluate(
        model, tokenizer, _categorised_records(3), reference=model, generation=False, progress=False
    )
    write_report({"m": [with_cats]}, tmp_path / "a")
    doc = json.loads((tmp_path / "a" / "summary.json").read_text())
    cats = doc["methods"]["m"]["categories"]
    assert cats["locality"]["Relation_Specificity"]["mean"] == pytest.approx(100.0)  # against itself
    assert set(cats["portability"]) == {"Subject_Aliasing", "Reasoning"}
    md = (tmp_path / "a" / "summary.md").read_text()
    assert "## Locality and Portability by category" in md and "Portability: Reasoning" in md
    plain = [
        r.model_copy(
            update={
                "locality": [p.model_copy(update={"category": None}) for p in r.locality],
                "portability": [],
            }
        )
        for r in _categorised_records(3)
    ]
    without = evaluate(model, tokenizer, plain, reference=model, generation=False, progress=False)
    assert all("locality_by_category" not in r for r in without.records)
    write_report({"m": [without]}, tmp_path / "b")
    doc = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert "categories" not in doc["methods"]["m"]
    assert "by category" not in (tmp_path / "b" / "summary.md").read_text()
