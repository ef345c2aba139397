"""Bad input: one InputError listing every problem, with the exact text a user sees."""

from __future__ import annotations

import json

import pytest
from data_helpers import (
    SAMPLES,
    counterfact_record,
    jsonl_record,
    rome_record,
    write_json,
    write_jsonl,
    zsre_record,
)

from flearning.data import load_dataset
from flearning.errors import InputError, Problem


def error_text(path, fmt=None, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        load_dataset(path, fmt, **kwargs)
    return str(info.value)


def one(path, message: str) -> str:
    return f"invalid dataset: 1 problem\n  {path}: {message}"


def test_problem_kind_formats_line_numbers():
    assert str(Problem("f.jsonl", 3, "prompt", "missing", kind="line")) == "f.jsonl:line 3:prompt: missing"
    assert str(Problem("f.json", 0, None, "bad")) == "f.json:record 0: bad"


# --- whole-file problems --------------------------------------------------------------------------


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"src": "a",}\n]')
    assert error_text(path) == one(
        path, "malformed JSON at line 2, column 15: Expecting property name enclosed in double quotes"
    )


def test_truncated_json(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text('[{"src": "a"}')
    assert error_text(path) == one(path, "malformed JSON at line 1, column 14: Expecting ',' delimiter")


def test_json_lines_in_a_json_file_gets_a_hint(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [counterfact_record(0), counterfact_record(1)])
    assert error_text(path) == one(
        path,
        "malformed JSON at line 2, column 1: Extra data (the file holds one JSON object per line: the "
        "project's own records belong in a .jsonl file; other formats need the records wrapped in one JSON list)",
    )


@pytest.mark.parametrize("content", ["", "  \n\n\t "])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.json"
    path.write_text(content)
    assert error_text(path) == one(path, "file is empty")


def test_empty_list(tmp_path):
    path = write_json(tmp_path / "e.json", [])
    assert error_text(path) == one(path, "the JSON list holds no records")


def test_unknown_format(tmp_path):
    path = write_json(tmp_path / "d.json", [zsre_record(0)])
    assert error_text(path, "wikidata") == one(
        path, "unknown format 'wikidata' (known: zsre, counterfact, counterfact-rome, jsonl)"
    )


def test_undetectable_format(tmp_path):
    path = write_json(tmp_path / "d.json", [{"question": "q", "answer": "a"}])
    assert error_text(path) == one(
        path,
        "cannot detect the format from the fields of record 0 (answer, question): expected zsre (src, "
        "answers, alt), counterfact (prompt, ground_truth, target_new) or counterfact-rome (requested_rewrite)",
    )


def test_own_records_in_a_json_list_get_a_hint(tmp_path):
    path = write_json(tmp_path / "d.json", [jsonl_record(0)])
    assert error_text(path).endswith(
        "; records with prompt/target_old/target_new go one per line in a .jsonl file"
    )


def test_no_object_to_detect_from(tmp_path):
    path = write_json(tmp_path / "d.json", [1, "two"])
    assert error_text(path) == one(path, "cannot detect the format: no record is a JSON object")


@pytest.mark.parametrize(
    ("value", "kind"), [({"data": []}, "an object"), ("text", "a string"), (3, "a number"), (None, "null")]
)
def test_top_level_not_a_list(tmp_path, value, kind):
    path = write_json(tmp_path / "d.json", value)
    assert error_text(path, "zsre") == one(
        path, f"expected a JSON list of records at the top level, got {kind}"
    )


def test_jsonl_format_on_a_json_list(tmp_path):
    path = write_json(tmp_path / "d.json", [jsonl_record(0)])
    assert error_text(path, "jsonl") == one(
        path,
        "expected JSON Lines (one object per line) but the file is a JSON list; use one of the formats "
        "zsre, counterfact, counterfact-rome",
    )


def test_missing_file_and_directory(tmp_path):
    assert error_text(tmp_path / "nope.json") == one(tmp_path / "nope.json", "no such file")
    assert error_text(tmp_path) == one(
        tmp_path,
        "is a directory, not a file (a datasets directory, written by save_to_disk, holds "
        "dataset_dict.json or state.json)",
    )


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[{"src": "caf\xe9"}]')
    assert error_text(path) == one(path, "not UTF-8 text (invalid byte at offset 13)")


def test_deep_nesting(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000)
    assert error_text(path) == one(path, "malformed JSON: nested too deeply")


# --- record problems ------------------------------------------------------------------------------


def test_missing_and_wrong_typed_fields_all_reported(tmp_path):
    recs = [counterfact_record(0), counterfact_record(1), counterfact_record(2, target_new=5)]
    del recs[1]["ground_truth"]
    path = write_json(tmp_path / "cf.json", recs)
    assert error_text(path) == (
        "invalid dataset: 2 problems\n"
        f"  {path}:record 1:ground_truth: missing\n"
        f"  {path}:record 2:target_new: expected a string, got a number"
    )


def test_every_problem_of_a_record(tmp_path):
    rec = {
        "case_id": True,
        "prompt": "  ",
        "ground_truth": None,
        "target_new": "x",
        "rephrase_prompt": 5,
        "locality_prompt": "lp",
    }
    path = write_json(tmp_path / "cf.json", [rec])
    assert error_text(path) == (
        "invalid dataset: 5 problems\n"
        f"  {path}:record 0:prompt: must not be empty\n"
        f"  {path}:record 0:ground_truth: expected a string, got null\n"
        f"  {path}:record 0:case_id: expected a string or an integer, got a boolean\n"
        f"  {path}:record 0:rephrase_prompt: expected a string or a list of strings, got a number\n"
        f"  {path}:record 0:locality_ground_truth: missing, but locality_prompt is given"
    )


def test_non_object_record(tmp_path):
    path = write_json(tmp_path / "z.json", [zsre_record(0), ["not", "a", "record"]])
    assert (
        error_text(path) == f"invalid dataset: 1 problem\n  {path}:record 1: expected an object, got a list"
    )


def test_zsre_field_types(tmp_path):
    recs = [zsre_record(0, answers={"a": 1}), zsre_record(1, answers=[3]), zsre_record(2, portability=7)]
    path = write_json(tmp_path / "z.json", recs)
    assert error_text(path, zsre_old="answers") == (
        "invalid dataset: 3 problems\n"
        f"  {path}:record 0:answers: expected a list of strings, got an object\n"
        f"  {path}:record 1:answers[0]: expected a string, got a number\n"
        f"  {path}:record 2:portability: expected a probe object, a list of them or an object of such "
        "lists, got a number"
    )


def test_portability_problems_have_paths(tmp_path):
    recs = [
        zsre_record(0, portability={"Reasoning": [{"prompt": "p", "ground_truth": {"x": 1}}]}),
        zsre_record(1, portability=[{"New Question": "q"}]),
    ]
    path = write_json(tmp_path / "z.json", recs)
    assert error_text(path) == (
        "invalid dataset: 2 problems\n"
        f"  {path}:record 0:portability.Reasoning[0].ground_truth: expected a string, got an object\n"
        f"  {path}:record 1:portability[0]: missing the answer ('answer', 'ground_truth' or 'New Answer')"
    )


def test_rome_problems(tmp_path):
    bad_template = rome_record(0)
    bad_template["requested_rewrite"]["prompt"] = "no place for the subject"
    bad_template["requested_rewrite"]["target_new"] = "English"
    no_rewrite = rome_record(1)
    del no_rewrite["requested_rewrite"]
    path = write_json(tmp_path / "r.json", [bad_template, no_rewrite])
    assert error_text(path, "counterfact-rome") == (
        "invalid dataset: 3 problems\n"
        f"  {path}:record 0:requested_rewrite.prompt: must contain '{{}}' exactly once, where the subject "
        "goes (found 0)\n"
        f"  {path}:record 0:requested_rewrite.target_new: expected an object, got a string\n"
        f"  {path}:record 1:requested_rewrite: missing"
    )


def test_unpaired_surrogate(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('[{"src": "q\\ud800", "answers": ["a"], "alt": "b"}]')
    assert error_text(path) == (
        f"invalid dataset: 1 problem\n  {path}:record 0:src: contains an unpaired surrogate (an invalid \\u escape)"
    )


def test_duplicate_ids(tmp_path):
    path = write_json(
        tmp_path / "c.json", [counterfact_record(7), counterfact_record(8), counterfact_record(7)]
    )
    assert error_text(path) == (
        f"invalid dataset: 1 problem\n  {path}:record 2:case_id: duplicate id '7' (first used by record 0)"
    )


def test_jsonl_problems_use_line_numbers(tmp_path):
    path = tmp_path / "f.jsonl"
    lines = [
        json.dumps(jsonl_record(0)),
        '{"prompt": "p2", "target_old": "a",',
        "",
        "[1]",
        json.dumps(
            {
                "prompt": 3,
                "target_old": "a",
                "target_new": "b",
                "rephrase_prompt": ["x"],
                "locality": [{"prompt": "q"}],
            }
        ),
    ]
    path.write_text("\n".join(lines) + "\n")
    assert error_text(path) == (
        "invalid dataset: 5 problems\n"
        f"  {path}:line 2: malformed JSON at column 36: Expecting property name enclosed in double quotes\n"
        f"  {path}:line 4: expected an object, got a list\n"
        f"  {path}:line 5:rephrase_prompt: unknown field (known: id, prompt, target_old, target_new, subject, "
        "rephrase_prompts, locality, portability)\n"
        f"  {path}:line 5:prompt: expected a string, got a number\n"
        f"  {path}:line 5:locality[0].answer: missing"
    )


def test_jsonl_duplicate_id_names_first_line(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [jsonl_record(0), jsonl_record(1), jsonl_record(2, id="fact-0")])
    assert error_text(path) == (
        f"invalid dataset: 1 problem\n  {path}:line 3:id: duplicate id 'fact-0' (first used by line 1)"
    )


def test_more_than_twenty_problems(tmp_path):
    recs = [counterfact_record(i) for i in range(25)]
    for rec in recs:
        del rec["prompt"]
    path = write_json(tmp_path / "cf.json", recs)
    text = error_text(path)
    lines = text.splitlines()
    assert lines[0] == "invalid dataset: 25 problems"
    assert lines[1] == f"  {path}:record 0:prompt: missing"
    assert lines[20] == f"  {path}:record 19:prompt: missing"
    assert lines[21] == "  ... and 5 more"
    assert len(lines) == 22


# --- strict mode ----------------------------------------------------------------------------------


def test_strict_reports_drops_as_errors():
    path = SAMPLES / "zsre-200.json"
    lines = error_text(path, strict=True, zsre_old="answers").splitlines()
    assert lines[0] == "invalid dataset: 8 problems"
    assert lines[1] == f"  {path}:record 2:alt: the new target equals the old one (strict mode rejects it)"
    assert [line.split(":")[1] for line in lines[1:]] == [
        f"record {i}" for i in (2, 8, 50, 87, 125, 129, 134, 194)
    ]


def test_strict_names_the_source_field(tmp_path):
    path = write_jsonl(
        tmp_path / "f.jsonl", [jsonl_record(0, target_old=" "), jsonl_record(1, target_new="Old Boss 1")]
    )
    assert error_text(path, strict=True) == (
        "invalid dataset: 2 problems\n"
        f"  {path}:line 1:target_old: the old target is empty (strict mode rejects it)\n"
        f"  {path}:line 2:target_new: the new target equals the old one (strict mode rejects it)"
    )
