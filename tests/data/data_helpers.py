"""Small builders shared by the data tests (valid records of each format, file writers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flearning.resources import samples_dir

REPO = Path(__file__).resolve().parents[2]
SAMPLES = samples_dir()
SHARED_DATA = REPO.parent / "shared" / "data"


def zsre_record(i: int = 0, **overrides: Any) -> dict[str, Any]:
    rec = {
        "subject": f"Subject {i}",
        "src": f"Which river contains Creek {i}?",
        "pred": "Old River",
        "rephrase": f"What river is Creek {i} in?",
        "alt": f"New River {i}",
        "answers": [f"Old River {i}"],
        "loc": "nq question: who wrote hamlet",
        "loc_ans": "William Shakespeare",
        "cond": "ignored",
    }
    rec.update(overrides)
    return rec


def counterfact_record(i: int = 0, **overrides: Any) -> dict[str, Any]:
    rec = {
        "case_id": i,
        "prompt": f"Entity {i} is located in",
        "target_new": f"Country {i}",
        "subject": f"Entity {i}",
        "ground_truth": f"Homeland {i}",
        "rephrase_prompt": f"The location of Entity {i} is",
        "locality_prompt": "The capital of France is",
        "locality_ground_truth": "Paris",
    }
    rec.update(overrides)
    return rec


def rome_record(i: int = 0, **overrides: Any) -> dict[str, Any]:
    rec = {
        "case_id": i,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "subject": f"Person {i}",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
        },
        "paraphrase_prompts": [f"Person {i} speaks the language"],
        "neighborhood_prompts": ["The mother tongue of Jean Moulin is", "Claude Monet's mother tongue is"],
        "generation_prompts": ["ignored"],
    }
    rec.update(overrides)
    return rec


def jsonl_record(i: int = 0, **overrides: Any) -> dict[str, Any]:
    rec = {
        "id": f"fact-{i}",
        "prompt": f"The CEO of Company {i} is",
        "target_old": f"Old Boss {i}",
        "target_new": f"New Boss {i}",
        "subject": f"Company {i}",
        "rephrase_prompts": [f"Company {i} is led by"],
        "locality": [{"prompt": "The capital of Japan is", "answer": "Tokyo"}],
    }
    rec.update(overrides)
    return rec


def write_json(path: Path, value: Any) -> Path:
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, values: list[Any]) -> Path:
    path.write_text("".join(json.dumps(v, ensure_ascii=False) + "\n" for v in values), encoding="utf-8")
    return path


# A user's own column names for the project's fields (``--field FIELD=COLUMN``).
USER_COLUMNS = {
    "id": "fact_id",
    "prompt": "question",
    "target_old": "answer_before",
    "target_new": "answer_after",
    "subject": "entity",
    "rephrase_prompts": "paraphrases",
    "locality": "neighbours",
}


def field_option(mapping: dict[str, str] = USER_COLUMNS) -> str:
    """``--field``'s value for ``mapping``: ``prompt=question,target_old=answer_before,...``."""
    return ",".join(f"{field}={column}" for field, column in mapping.items())


def user_record(record: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """``record`` (the project's fields) under the user's column names, with ``extra`` columns."""
    return {USER_COLUMNS.get(key, key): value for key, value in record.items()} | extra


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    """A real Parquet file written by pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """A real CSV file written by pyarrow (every value quoted text)."""
    import pyarrow as pa
    import pyarrow.csv as pc

    pc.write_csv(pa.Table.from_pylist(rows), path)
    return path
