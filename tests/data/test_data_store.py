"""save_jsonl (atomic, round-trips) and records_hash (stable content hash)."""

from __future__ import annotations

import json
import os

import pytest
from data_helpers import SAMPLES

from flearning.data import KnowledgeRecord, PromptAnswer, load_dataset, load_records, records_hash, save_jsonl

RECORD = KnowledgeRecord(
    id="a",
    prompt="P is",
    target_old="x",
    target_new="y",
    subject="P",
    rephrase_prompts=["Q is"],
    locality=[PromptAnswer(prompt="L", answer="M")],
)


@pytest.mark.parametrize("sample", ["zsre-200.json", "counterfact-200.json", "counterfact-rome-sample.json"])
def test_round_trip_through_jsonl(tmp_path, sample):
    records = load_records(SAMPLES / sample)
    out = save_jsonl(records, tmp_path / "sub" / "out.jsonl")
    assert out == tmp_path / "sub" / "out.jsonl"
    again = load_dataset(out)
    assert again.format == "jsonl"
    assert again.records == records
    assert records_hash(again.records) == records_hash(records)


def test_written_format(tmp_path):
    minimal = KnowledgeRecord(id="b", prompt="Ünïcode\u2028 is", target_old="é", target_new="ü")
    path = save_jsonl([RECORD, minimal], tmp_path / "out.jsonl")
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""  # final newline
    assert json.loads(lines[0]) == {
        "id": "a",
        "prompt": "P is",
        "target_old": "x",
        "target_new": "y",
        "subject": "P",
        "rephrase_prompts": ["Q is"],
        "locality": [{"prompt": "L", "answer": "M"}],
    }
    # empty optional fields are left out; non-ASCII text is written as UTF-8, not escaped
    assert lines[1] == '{"id": "b", "prompt": "Ünïcode\u2028 is", "target_old": "é", "target_new": "ü"}'
    assert load_records(path) == [RECORD, minimal]
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_save_is_atomic(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("old content\n")

    def records():
        yield RECORD
        raise RuntimeError("disk full")  # a failure mid-way must leave the old file untouched

    with pytest.raises(RuntimeError):
        save_jsonl(records(), path)
    assert path.read_text() == "old content\n"
    assert os.listdir(tmp_path) == ["out.jsonl"]  # no temporary file left behind


def test_save_failure_during_write_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"

    def broken_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        save_jsonl([RECORD], path)
    assert os.listdir(tmp_path) == []


def test_records_hash_is_pinned():
    """Caches are keyed by this value: changing it silently invalidates every cache (bump the scheme)."""
    assert records_hash([RECORD]) == "1d406384fb5f320f6f7c5b7a87e9cd0c1e25860fe0aef1ab3fc4eb2c15487e3f"
    assert records_hash([]) == "70d514ad855e0a9770c53eeb2b257e041dc0921ca631ae7c67244c9d92af2e53"


def test_records_hash_depends_on_content_and_order():
    other = RECORD.model_copy(update={"target_new": "z"})
    assert records_hash([RECORD, other]) != records_hash([other, RECORD])
    assert records_hash([RECORD]) != records_hash([other])
    assert records_hash(iter([RECORD])) == records_hash([RECORD])
