"""Locality and portability by category (KnowEdit): the data layer keeps each probe's category, and the
metrics average within a category, then over categories, as EasyEdit's KnowEdit summary does."""

from __future__ import annotations

import json

from flearning.data import load_dataset, save_jsonl
from flearning.data.records import KnowledgeRecord, PromptAnswer
from flearning.data.store import records_hash


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
    assert first["locality"][2] == {"prompt": "Person 0 was born in", "answer": "Lyon", "category": "Forgetfulness"}
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
    import hashlib

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
    h.update(json.dumps(legacy, sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n")
    assert records_hash([record]) == h.hexdigest()
