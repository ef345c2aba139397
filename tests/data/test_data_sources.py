"""Datasets read through ``datasets``: Parquet and CSV files, ``save_to_disk`` directories and hub ids, and
the user's own column names mapped onto the project's fields (``--field``). Real files written with
pyarrow and ``datasets`` in tmp_path; nothing is downloaded."""

from __future__ import annotations

import hashlib
import json
import logging

import datasets
import pytest
from data_helpers import (
    SAMPLES,
    USER_COLUMNS,
    jsonl_record,
    user_record,
    write_csv,
    write_json,
    write_jsonl,
    write_parquet,
)

from flearning.data import Location, load_dataset, load_update_data
from flearning.data.fields import parse_fields
from flearning.data.sources import resolve_source
from flearning.errors import FlearnError, InputError


def facts(n: int = 3) -> list[dict]:
    return [jsonl_record(i) for i in range(n)]


def user_rows(n: int = 3, **extra) -> list[dict]:
    return [user_record(record, **extra) for record in facts(n)]


def error_text(path, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        load_dataset(path, **kwargs)
    return str(info.value)


def assert_fact_values(records) -> None:
    """The field values of ``jsonl_record(0)`` and ``(1)``, spelled out."""
    first = records[0]
    assert first.id == "fact-0"
    assert first.prompt == "The CEO of Company 0 is"
    assert (first.target_old, first.target_new) == ("Old Boss 0", "New Boss 0")
    assert first.subject == "Company 0"
    assert first.rephrase_prompts == ["Company 0 is led by"]
    assert [(p.prompt, p.answer) for p in first.locality] == [("The capital of Japan is", "Tokyo")]
    assert (records[1].id, records[1].target_new) == ("fact-1", "New Boss 1")


# --- Parquet, CSV and save_to_disk directories with a field mapping -------------------------------


def test_parquet_with_a_field_mapping_reads_the_records_of_the_equivalent_jsonl(tmp_path):
    reference = load_dataset(write_jsonl(tmp_path / "facts.jsonl", facts()))
    path = write_parquet(tmp_path / "facts.parquet", user_rows(source_url="https://example.org"))
    loaded = load_dataset(path, fields=USER_COLUMNS)
    assert loaded.records == reference.records
    assert_fact_values(loaded.records)
    assert (loaded.format, loaded.reader, loaded.split) == ("jsonl", "parquet", None)
    assert loaded.fields == USER_COLUMNS
    assert loaded.unused_columns == ("source_url",)  # not read, named once
    assert loaded.locations == tuple(Location(str(path), i, "record") for i in range(3))
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (loaded.n_raw, loaded.has_ids) == (3, True)


def test_csv_with_a_field_mapping_reads_every_column_as_text(tmp_path):
    """CSV cells are text: a year stays "1990" and "NA" stays "NA" (pandas would make a number and a null),
    commas and line breaks inside quoted cells survive."""
    records = [
        {"id": "a", "prompt": "The year X was founded is", "target_old": "1990", "target_new": "1991"},
        {"id": "b", "prompt": "The code of Namibia is", "target_old": "NM", "target_new": "NA"},
        {"id": "c", "prompt": "Q, with a comma\nand a line break, is", "target_old": "x", "target_new": "y"},
    ]
    reference = load_dataset(write_jsonl(tmp_path / "facts.jsonl", records))
    mapping = {"id": "key", "prompt": "question", "target_old": "was", "target_new": "is"}
    rows = [{mapping[k]: v for k, v in r.items()} | {"subject": ""} for r in records]
    path = write_csv(tmp_path / "facts.csv", rows)
    loaded = load_dataset(path, fields=mapping)
    assert loaded.records == reference.records
    assert [r.target_old for r in loaded.records] == ["1990", "NM", "x"]
    assert [r.target_new for r in loaded.records] == ["1991", "NA", "y"]
    assert loaded.records[2].prompt == "Q, with a comma\nand a line break, is"
    assert loaded.records[0].subject is None  # an empty cell of an optional field is absent
    assert loaded.reader == "csv"


def test_a_save_to_disk_dataset_directory(tmp_path):
    reference = load_dataset(write_jsonl(tmp_path / "facts.jsonl", facts()))
    directory = tmp_path / "facts-ds"
    datasets.Dataset.from_list(user_rows()).save_to_disk(str(directory))
    loaded = load_dataset(directory, fields=USER_COLUMNS)
    assert loaded.records == reference.records
    assert_fact_values(loaded.records)
    assert (loaded.reader, loaded.split, loaded.path) == ("disk", None, directory)
    assert loaded.locations[1] == Location(str(directory), 1, "record")
    assert load_dataset(directory, fields=USER_COLUMNS).sha256 == loaded.sha256  # of the rows: stable
    assert error_text(directory, fields=USER_COLUMNS, split="train") == (
        f"invalid dataset: 1 problem\n  {directory}: --split train: a directory of one Dataset (not a "
        "DatasetDict) has no splits (--split picks a split of a datasets directory written from a "
        "DatasetDict, or of a hub dataset)"
    )


def test_a_save_to_disk_dataset_dict_directory_and_its_splits(tmp_path):
    directory = tmp_path / "facts-dd"
    rows = user_rows(5)
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:3]), "test": datasets.Dataset.from_list(rows[3:])}
    ).save_to_disk(str(directory))
    test = load_dataset(directory, fields=USER_COLUMNS, split="test")
    assert [r.id for r in test.records] == ["fact-3", "fact-4"]
    assert test.records == load_dataset(write_jsonl(tmp_path / "f.jsonl", facts(5)[3:])).records
    assert (test.reader, test.split) == ("disk", "test")
    assert test.locations[0] == Location(f"{directory}[test]", 0, "record")
    train = load_dataset(directory, fields=USER_COLUMNS, split="train")
    assert_fact_values(train.records)
    # several splits and none chosen; a split it does not have
    assert error_text(directory, fields=USER_COLUMNS) == (
        f"invalid dataset: 1 problem\n  {directory}: holds the splits train, test: choose one with --split "
        "NAME (split: NAME)"
    )
    assert error_text(directory, fields=USER_COLUMNS, split="validation") == (
        f"invalid dataset: 1 problem\n  {directory}: has no split 'validation' (its splits: train, test)"
    )


def test_the_only_split_of_a_dataset_dict_is_read_without_split(tmp_path):
    directory = tmp_path / "one-split"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(user_rows(2))}).save_to_disk(
        str(directory)
    )
    loaded = load_dataset(directory, fields=USER_COLUMNS)
    assert (loaded.split, len(loaded.records)) == ("validation", 2)
    assert loaded.locations[0].source == f"{directory}[validation]"


def test_a_table_of_the_projects_fields_needs_no_mapping(tmp_path, caplog):
    reference = load_dataset(write_jsonl(tmp_path / "facts.jsonl", facts()))
    path = write_parquet(tmp_path / "facts.parquet", [r | {"notes": "extra"} for r in facts()])
    with caplog.at_level(logging.WARNING, logger="flearning.data.loading"):
        loaded = load_dataset(path)
    assert loaded.records == reference.records
    assert (loaded.format, loaded.fields, loaded.unused_columns) == ("jsonl", None, ("notes",))
    assert f"{path}: columns not read: notes (map one onto a field with --field FIELD=COLUMN)" in caplog.text


def test_a_table_in_an_easyedit_format_is_detected(tmp_path):
    reference = load_dataset(SAMPLES / "zsre-200.json")
    directory = tmp_path / "zsre"
    rows = json.loads((SAMPLES / "zsre-200.json").read_text())
    datasets.Dataset.from_list(rows).save_to_disk(str(directory))
    loaded = load_dataset(directory)
    assert loaded.format == "zsre"
    assert loaded.records == reference.records
    assert loaded.dropped == reference.dropped


def test_a_split_pair_of_parquet_files_with_a_mapping(tmp_path):
    """--old and --new: the same mapping; each file may lack the other side's target column."""
    old_rows = [{"question": r["prompt"], "answer_before": r["target_old"]} for r in facts()]
    new_rows = [{"question": r["prompt"], "answer_after": r["target_new"]} for r in reversed(facts())]
    old = write_parquet(tmp_path / "old.parquet", old_rows)
    new = write_parquet(tmp_path / "new.parquet", new_rows)
    mapping = {"prompt": "question", "target_old": "answer_before", "target_new": "answer_after"}
    data = load_update_data(old, new, fields=mapping)
    assert data.joined_by == "prompt"
    assert [(r.prompt, r.target_old, r.target_new) for r in data.records] == [
        (f"The CEO of Company {i} is", f"Old Boss {i}", f"New Boss {i}") for i in (2, 1, 0)
    ]


# --- JSON and JSON Lines with a mapping -----------------------------------------------------------


def test_jsonl_and_a_json_list_with_a_mapping(tmp_path):
    reference = load_dataset(write_jsonl(tmp_path / "facts.jsonl", facts()))
    lines = write_jsonl(tmp_path / "user.jsonl", user_rows(category="biz"))
    listed = write_json(tmp_path / "user.json", user_rows())
    by_lines, by_list = load_dataset(lines, fields=USER_COLUMNS), load_dataset(listed, fields=USER_COLUMNS)
    assert by_lines.records == by_list.records == reference.records
    assert by_lines.locations[0] == Location(str(lines), 1, "line")
    assert by_list.locations[0] == Location(str(listed), 0, "record")
    assert by_lines.unused_columns == ("category",)


def test_problems_of_a_mapped_jsonl_name_the_line_and_the_users_column(tmp_path):
    rows = user_rows()
    del rows[1]["answer_after"]
    rows[2]["question"] = 7
    path = write_jsonl(tmp_path / "user.jsonl", rows)
    assert error_text(path, fields=USER_COLUMNS) == (
        "invalid dataset: 2 problems\n"
        f"  {path}:line 2:answer_after: missing (mapped to target_new)\n"
        f"  {path}:line 3:question: expected a string, got a number (mapped to prompt)"
    )


# --- bad input: one error listing every problem ---------------------------------------------------


def test_every_bad_record_and_field_of_a_parquet_file_in_one_error(tmp_path):
    rows = user_rows(6)
    rows[1]["question"] = "   "
    rows[2]["answer_before"] = None  # a null cell is an absent field
    rows[3]["fact_id"] = "fact-0"
    rows[4]["neighbours"] = [{"prompt": "The capital of Peru is", "answer": None}]
    rows[5]["paraphrases"] = ["fine", None]
    path = write_parquet(tmp_path / "bad.parquet", rows)
    assert error_text(path, fields=USER_COLUMNS) == (
        "invalid dataset: 5 problems\n"
        f"  {path}:record 1:question: must not be empty (mapped to prompt)\n"
        f"  {path}:record 2:answer_before: missing (mapped to target_old)\n"
        f"  {path}:record 3:fact_id: duplicate id 'fact-0' (first used by record 0) (mapped to id)\n"
        f"  {path}:record 4:neighbours[0].answer: missing (mapped to locality)\n"
        f"  {path}:record 5:paraphrases[1]: expected a string, got null (mapped to rephrase_prompts)"
    )


def test_a_mapped_column_missing_from_the_file_names_it_and_lists_the_columns(tmp_path):
    path = write_parquet(tmp_path / "facts.parquet", user_rows())
    mapping = USER_COLUMNS | {"prompt": "query", "subject": "topic"}
    columns = ", ".join(user_rows()[0])
    assert error_text(path, fields=mapping) == (
        "invalid dataset: 2 problems\n"
        f"  {path}:query: no such column (mapped to prompt by --field prompt=query); the columns are: "
        f"{columns}\n"
        f"  {path}:topic: no such column (mapped to subject by --field subject=topic); the columns are: "
        f"{columns}"
    )


def test_an_unknown_field_in_the_mapping(tmp_path):
    path = write_parquet(tmp_path / "facts.parquet", user_rows())
    assert error_text(path, fields=USER_COLUMNS | {"promt": "question"}) == (
        "invalid dataset: 1 problem\n"
        f"  {path}:--field: 'promt' is not a field (fields: id, prompt, target_old, target_new, subject, "
        "rephrase_prompts, locality, portability)"
    )


def test_a_table_whose_format_cannot_be_detected_points_at_field(tmp_path):
    path = write_parquet(tmp_path / "facts.parquet", user_rows())
    assert error_text(path) == (
        f"invalid dataset: 1 problem\n  {path}: cannot detect the format from the columns "
        "(fact_id, question, answer_before, answer_after, entity, paraphrases, neighbours): expected the "
        "project's fields (prompt, target_old, target_new), zsre (src, answers, alt), counterfact (prompt, "
        "ground_truth, target_new) or counterfact-rome (requested_rewrite); map your own columns with "
        "--field prompt=COLUMN,target_old=COLUMN,target_new=COLUMN"
    )


def test_options_that_do_not_fit_the_source(tmp_path):
    jsonl = write_jsonl(tmp_path / "facts.jsonl", facts())
    parquet = write_parquet(tmp_path / "facts.parquet", user_rows())
    assert "--split train: a JSON file has no splits" in error_text(jsonl, split="train")
    assert "--split train: a parquet file has no splits" in error_text(parquet, split="train")
    assert error_text(parquet, fmt="zsre", fields=USER_COLUMNS) == (
        f"invalid dataset: 1 problem\n  {parquet}: --field maps columns onto the project's fields (format "
        "jsonl); it cannot be combined with --format zsre"
    )


def test_damaged_and_empty_tables(tmp_path):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really parquet")
    assert error_text(broken).startswith(
        f"invalid dataset: 1 problem\n  {broken}: cannot read the file as PARQUET: "
    )
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert error_text(empty) == (
        f"invalid dataset: 1 problem\n  {empty}: file is empty (no header line naming the columns)"
    )
    header_only = tmp_path / "header.csv"
    header_only.write_text("prompt,target_old,target_new\n")
    assert (
        error_text(header_only) == f"invalid dataset: 1 problem\n  {header_only}: the table holds no records"
    )
    twice = tmp_path / "twice.csv"
    twice.write_text("prompt,prompt,target_new\na,b,c\n")
    assert error_text(twice) == (
        f"invalid dataset: 1 problem\n  {twice}: the header names the columns prompt more than once"
    )


def test_a_plain_directory_is_not_a_dataset(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert error_text(tmp_path) == (
        f"invalid dataset: 1 problem\n  {tmp_path}: is a directory, not a file (a datasets directory, "
        "written by save_to_disk, holds dataset_dict.json or state.json)"
    )


# --- the --field option ---------------------------------------------------------------------------


def test_parse_fields_repeatable_and_comma_separated():
    assert parse_fields(["prompt=question,target_new=answer", " target_old = was "]) == {
        "prompt": "question",
        "target_new": "answer",
        "target_old": "was",
    }
    assert parse_fields(None) is None
    assert parse_fields([]) is None


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["prompt"], "--field: 'prompt' is not FIELD=COLUMN"),
        (["prompt="], "--field: 'prompt=' is not FIELD=COLUMN"),
        (["prompt=a", "prompt=b"], "--field: prompt is mapped twice (a and b)"),
        (
            ["promt=question"],
            "--field: 'promt' is not a field (fields: id, prompt, target_old, target_new, subject, "
            "rephrase_prompts, locality, portability)",
        ),
    ],
)
def test_parse_fields_errors(items, message):
    with pytest.raises(FlearnError) as info:
        parse_fields(items)
    assert str(info.value) == message


# --- hub ids: what is one, and what is a mistyped path --------------------------------------------


def test_what_names_a_hub_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert resolve_source("hf:owner/name").hub_id == "owner/name"
    assert resolve_source("owner/name").kind == "hub"  # nothing local is named owner
    assert resolve_source("data/name").kind == "json"  # data/ exists: a path ("no such file")
    assert resolve_source("owner/facts.jsonl").kind == "json"  # a data file's name: a path
    assert resolve_source("owner/facts.parquet").kind == "parquet"
    assert resolve_source("./owner/name").kind == "json"
    with pytest.raises(FlearnError, match=r"'hf:owner/na me' is not a hub dataset id"):
        resolve_source("hf:owner/na me")
    assert error_text("owner/facts.jsonl") == "invalid dataset: 1 problem\n  owner/facts.jsonl: no such file"
    assert error_text("data/name") == "invalid dataset: 1 problem\n  data/name: no such file"


def test_an_empty_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    assert error_text(path) == f"invalid dataset: 1 problem\n  {path}: the table holds no records"
