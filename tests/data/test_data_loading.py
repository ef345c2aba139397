"""Loaders on the shipped samples, the shared development splits, and hand-built records."""

from __future__ import annotations

import hashlib
import json

import pytest
from data_helpers import (
    SAMPLES,
    SHARED_DATA,
    counterfact_record,
    jsonl_record,
    rome_record,
    write_json,
    write_jsonl,
    zsre_record,
)

from flearning.data import FORMATS, KnowledgeRecord, LoadedDataset, PromptAnswer, load_dataset, load_records
from flearning.errors import FlearnError, InputError

# --- shipped samples ------------------------------------------------------------------------------


def test_formats_tuple():
    assert FORMATS == ("zsre", "counterfact", "counterfact-rome", "jsonl")


def test_counterfact_sample():
    ds = load_dataset(SAMPLES / "counterfact-200.json")
    assert (ds.format, ds.n_raw, len(ds.records), ds.dropped) == ("counterfact", 200, 200, {})
    assert ds.records[0] == KnowledgeRecord(
        id="10",
        prompt="BBC One, by",
        target_old="BBC",
        target_new="Sega",
        subject="BBC One",
        rephrase_prompts=["BBC One is my favorite product out of everything owned by"],
        locality=[PromptAnswer(prompt="BBC Radio, by", answer="BBC")],
    )
    assert ds.sha256 == hashlib.sha256((SAMPLES / "counterfact-200.json").read_bytes()).hexdigest()


def test_zsre_sample_drops_unchanged_targets():
    ds = load_dataset(SAMPLES / "zsre-200.json", zsre_old="answers")  # answers[0]: 8 equal alt
    assert (ds.format, ds.n_raw, len(ds.records)) == ("zsre", 200, 192)
    assert ds.dropped == {"target_new_equals_old": 8}
    assert ds.n_dropped == 8
    assert ds.records[0] == KnowledgeRecord(
        id="0",
        prompt="Which river system contains Charity Creek?",
        target_old="Parramatta River",
        target_new="Chichester River",
        subject="Charity Creek",
        rephrase_prompts=["What river system is Charity Creek in?"],
        locality=[
            PromptAnswer(prompt="nq question: how many series of diary of a wimpy kid are there", answer="12")
        ],
    )
    # ids stay the source positions: record 2 (alt == answers[0]) is missing, not renumbered
    assert [r.id for r in ds.records[:4]] == ["0", "1", "3", "4"]


def test_rome_sample():
    ds = load_dataset(SAMPLES / "counterfact-rome-sample.json")
    assert (ds.format, ds.n_raw, len(ds.records), ds.dropped) == ("counterfact-rome", 5, 5, {})
    assert ds.records[1] == KnowledgeRecord(
        id="42",
        prompt="The profession of Arun Nehru is",
        target_old="politician",
        target_new="actor",
        subject="Arun Nehru",
        rephrase_prompts=["Arun Nehru is known for"],
        locality=[PromptAnswer(prompt="George Washington's profession is a", answer="politician")],
    )


def test_rome_sample_matches_its_easyedit_source():
    """The ROME sample was converted from the first CounterFact records: both loaders must agree."""
    rome = load_records(SAMPLES / "counterfact-rome-sample.json")
    easyedit = load_records(SAMPLES / "counterfact-200.json", limit=5)
    assert rome == easyedit


def test_facts_sample():
    ds = load_dataset(SAMPLES / "facts.jsonl")
    assert (ds.format, ds.n_raw, len(ds.records), ds.dropped) == ("jsonl", 34, 34, {})
    assert ds.records[0] == KnowledgeRecord(
        id="uk-prime-minister",
        prompt="The Prime Minister of the United Kingdom is",
        target_old="Rishi Sunak",
        target_new="Keir Starmer",
        subject="United Kingdom",
        rephrase_prompts=["The head of the British government is", "The UK's prime minister is"],
        locality=[PromptAnswer(prompt="The capital of Australia is", answer="Canberra")],
        portability=[
            PromptAnswer(
                prompt="The political party of the Prime Minister of the United Kingdom is the",
                answer="Labour Party",
            )
        ],
    )
    records = ds.records
    assert all(1 <= len(r.rephrase_prompts) <= 2 and len(r.locality) == 1 for r in records)
    assert sum(bool(r.portability) for r in records) == 5
    assert len({r.id for r in records}) == len(records)


# --- shared development splits (skipped where ../shared/data is absent) ---------------------------

SHARED_COUNTS = [
    ("counterfact/counterfact-train.json", "counterfact", 10000, 10000, {}),
    ("counterfact/counterfact-val.json", "counterfact", 1919, 1919, {}),
    ("zsre/zsre_mend_train-1k.json", "zsre", 1000, 981, {"empty_target_new": 2, "target_new_equals_old": 17}),
    ("zsre/zsre_dev-2.8k.json", "zsre", 2815, 2707, {"target_new_equals_old": 108}),
]


@pytest.mark.parametrize(("name", "fmt", "n_raw", "n_kept", "dropped"), SHARED_COUNTS)
def test_shared_files(name, fmt, n_raw, n_kept, dropped):
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    ds = load_dataset(path, zsre_old="answers")
    assert (ds.format, ds.n_raw, len(ds.records), ds.dropped) == (fmt, n_raw, n_kept, dropped)
    assert all(r.target_old and r.target_new and r.target_old != r.target_new for r in ds.records)


def test_shared_zsre_train_empty_alt_records():
    path = SHARED_DATA / "zsre" / "zsre_mend_train-1k.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    with pytest.raises(InputError) as info:
        load_dataset(path, strict=True, zsre_old="answers")
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid dataset: 19 problems"
    assert f"  {path}:record 534:alt: the new target is empty (strict mode rejects it)" in lines
    assert f"  {path}:record 723:alt: the new target is empty (strict mode rejects it)" in lines


@pytest.mark.parametrize(
    ("sample", "source", "indent"),
    [
        ("counterfact-200.json", "counterfact/counterfact-val.json", 4),
        ("zsre-200.json", "zsre/zsre_dev-2.8k.json", None),
    ],
)
def test_samples_are_unchanged_copies(sample, source, indent):
    path = SHARED_DATA / source
    if not path.is_file():
        pytest.skip(f"{path} not present")
    original = json.loads(path.read_text(encoding="utf-8"))
    assert json.loads((SAMPLES / sample).read_text(encoding="utf-8")) == original[:200]


# --- detection, options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("builder", "fmt"),
    [(zsre_record, "zsre"), (counterfact_record, "counterfact"), (rome_record, "counterfact-rome")],
)
def test_detects_json_list_formats(tmp_path, builder, fmt):
    path = write_json(tmp_path / "d.json", [builder(0), builder(1)])
    ds = load_dataset(path)
    assert ds.format == fmt
    assert len(ds.records) == 2
    assert load_dataset(path, fmt).records == ds.records


def test_detects_jsonl_by_suffix_and_by_content(tmp_path):
    records = [jsonl_record(0), jsonl_record(1)]
    assert load_dataset(write_jsonl(tmp_path / "a.jsonl", records)).format == "jsonl"
    assert load_dataset(write_jsonl(tmp_path / "a.ndjson", records)).format == "jsonl"
    # no telling suffix: a first line that is a whole object with target_old is JSON Lines
    assert load_dataset(write_jsonl(tmp_path / "a.txt", records)).format == "jsonl"


def test_format_name_spelling_is_normalised(tmp_path):
    path = write_json(tmp_path / "d.json", [rome_record(0)])
    assert load_dataset(path, "CounterFact_ROME").format == "counterfact-rome"


def test_jsonl_blank_lines_and_line_separators(tmp_path):
    """Blank lines are skipped; U+2028 inside a string is not a line break."""
    rec = jsonl_record(0, prompt="A\u2028B is")
    path = tmp_path / "f.jsonl"
    path.write_text(
        "\n\n" + json.dumps(rec, ensure_ascii=False) + "\n   \n" + json.dumps(jsonl_record(1)) + "\n\n"
    )
    ds = load_dataset(path)
    assert ds.n_raw == 2
    assert ds.records[0].prompt == "A\u2028B is"


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([counterfact_record(0)]).encode())
    assert len(load_records(path)) == 1


def test_limit_takes_first_kept_records_and_counts_whole_file():
    ds = load_dataset(SAMPLES / "zsre-200.json", limit=3, zsre_old="answers")
    assert [r.id for r in ds.records] == ["0", "1", "3"]
    assert ds.n_raw == 200
    assert ds.dropped == {"target_new_equals_old": 8}


@pytest.mark.parametrize("limit", [0, -1, True, 2.5])
def test_bad_limit(limit):
    with pytest.raises(FlearnError, match="limit must be a positive integer"):
        load_dataset(SAMPLES / "facts.jsonl", limit=limit)


def test_returns_dataclass(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [jsonl_record(0)])
    ds = load_dataset(str(path))
    assert isinstance(ds, LoadedDataset)
    assert ds.path == path


# --- field mapping details ------------------------------------------------------------------------


def test_zsre_strips_targets_and_accepts_list_rephrase_and_ids(tmp_path):
    recs = [
        zsre_record(0, alt=" New River 0", rephrase=["R one?", "", "R two?"], id="q-7"),
        zsre_record(1, answers="Old River 1", case_id=99, rephrase=None, loc="", loc_ans=""),
        zsre_record(2, answers=["Old River 2", "alias"], subject=None),
    ]
    a, b, c = load_records(write_json(tmp_path / "z.json", recs), zsre_old="answers")
    assert (a.id, a.target_new, a.rephrase_prompts) == ("q-7", "New River 0", ["R one?", "R two?"])
    assert (b.id, b.target_old, b.rephrase_prompts, b.locality) == ("99", "Old River 1", [], [])
    assert (c.id, c.target_old, c.subject) == ("2", "Old River 2", None)


def test_zsre_portability_shapes(tmp_path):
    recs = [
        zsre_record(
            0, portability={"New Question": "Which sea does New River 0 flow into?", "New Answer": "Baltic"}
        ),
        zsre_record(
            1, portability=[{"prompt": "P1", "answer": "A1"}, {"prompt": "P2", "ground_truth": ["A2", "x"]}]
        ),
        zsre_record(
            2,
            portability={
                "Reasoning": [{"prompt": "P3", "ground_truth": [["A3", "alias"]]}],
                "Subject_Aliasing": {"prompt": "P4", "ground_truth": "A4"},
                "Logical_Generalization": [],
            },
        ),
        zsre_record(3, portability={"New Question": "", "New Answer": "dropped because blank"}),
    ]
    recs_out = load_records(write_json(tmp_path / "z.json", recs))
    pa = PromptAnswer
    assert recs_out[0].portability == [pa(prompt="Which sea does New River 0 flow into?", answer="Baltic")]
    assert recs_out[1].portability == [pa(prompt="P1", answer="A1"), pa(prompt="P2", answer="A2")]
    assert recs_out[2].portability == [  # a KnowEdit object of categories: each probe keeps its category
        pa(prompt="P3", answer="A3", category="Reasoning"),
        pa(prompt="P4", answer="A4", category="Subject_Aliasing"),
    ]
    assert recs_out[3].portability == []


def test_counterfact_list_fields(tmp_path):
    rec = counterfact_record(
        0,
        rephrase_prompt=["R1", "R2"],
        locality_prompt=["L1", "L2"],
        locality_ground_truth=["A1", "A2"],
    )
    (r,) = load_records(write_json(tmp_path / "c.json", [rec]))
    assert r.rephrase_prompts == ["R1", "R2"]
    assert r.locality == [PromptAnswer(prompt="L1", answer="A1"), PromptAnswer(prompt="L2", answer="A2")]


def test_rome_neighbourhood_answered_by_true_target(tmp_path):
    (r,) = load_records(write_json(tmp_path / "r.json", [rome_record(3)]))
    assert r.prompt == "The mother tongue of Person 3 is"
    assert (r.id, r.target_old, r.target_new, r.subject) == ("3", "French", "English", "Person 3")
    assert [p.answer for p in r.locality] == ["French", "French"]


def test_rome_template_other_braces_are_literal(tmp_path):
    rec = rome_record(0)
    rec["requested_rewrite"]["prompt"] = "In {0} notation {} is"
    (r,) = load_records(write_json(tmp_path / "r.json", [rec]))
    assert r.prompt == "In {0} notation Person 0 is"


def test_jsonl_integer_id_and_default_ids(tmp_path):
    recs = [jsonl_record(0, id=5), {"prompt": "P", "target_old": "a", "target_new": "b"}]
    a, b = load_records(write_jsonl(tmp_path / "f.jsonl", recs))
    assert (a.id, b.id) == ("5", "1")  # default id: 0-based position among the records
    assert (b.subject, b.rephrase_prompts, b.locality, b.portability) == (None, [], [], [])


def test_strict_accepts_a_clean_file():
    assert len(load_dataset(SAMPLES / "counterfact-200.json", strict=True).records) == 200


def test_all_records_dropped_is_an_error(tmp_path):
    path = write_json(tmp_path / "c.json", [counterfact_record(0, target_new="Homeland 0")])
    with pytest.raises(InputError) as info:
        load_dataset(path)
    assert str(info.value) == (
        f"invalid dataset: 1 problem\n  {path}: no usable records: all 1 were dropped (1 target_new_equals_old)"
    )


def test_drop_reasons(tmp_path, caplog):
    recs = [
        counterfact_record(0),
        counterfact_record(1, ground_truth="  "),
        counterfact_record(2, target_new=""),
        counterfact_record(3, target_new=" Homeland 3 "),
        counterfact_record(4, target_new="homeland 4"),  # case differs: a real change, kept
    ]
    with caplog.at_level("INFO", logger="flearning.data.loading"):
        ds = load_dataset(write_json(tmp_path / "c.json", recs))
    assert [r.id for r in ds.records] == ["0", "4"]
    assert ds.dropped == {"empty_target_new": 1, "empty_target_old": 1, "target_new_equals_old": 1}
    assert (
        "dropped 3 of 5 records (1 empty_target_new, 1 empty_target_old, 1 target_new_equals_old)"
        in caplog.text
    )
