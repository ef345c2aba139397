"""Several files read as one dataset (``data.load_combined``; the bench's ``--data zsre=A --data zsre=B``):
the records file after file with ids made unique, locations naming each file, one file unchanged, and
files that would read ZsRE's old answers from different fields refused."""

from __future__ import annotations

import json

import pytest

from flearning.cli.bench import _parse_data
from flearning.config import BenchConfig, load_config
from flearning.data import load_combined, load_dataset
from flearning.errors import FlearnError
from flearning.resources import sample_path


@pytest.fixture
def halves(tmp_path):
    """The shipped ZsRE sample's first 30 and next 20 records as two files (both number from 0)."""
    raw = json.loads(sample_path("zsre-200.json").read_text())
    first, second = tmp_path / "dev.json", tmp_path / "train.json"
    first.write_text(json.dumps(raw[:30]))
    second.write_text(json.dumps(raw[30:50]))
    return first, second


def test_files_are_read_in_order_with_unique_ids(halves):
    first, second = halves
    a, b = load_dataset(first), load_dataset(second)
    assert a.records[0].id == b.records[0].id == "0"  # the clash the combined ids avoid
    combined = load_combined([first, second])
    assert len(combined.records) == len(a.records) + len(b.records)
    assert [r.id for r in combined.records] == [f"0/{r.id}" for r in a.records] + [
        f"1/{r.id}" for r in b.records
    ]
    assert len({r.id for r in combined.records}) == len(combined.records)
    # everything but the id is the file's record
    assert combined.records[len(a.records)].model_dump(exclude={"id"}) == b.records[0].model_dump(
        exclude={"id"}
    )
    assert combined.locations[len(a.records)].source == str(second)
    assert combined.locations[0].source == str(first)
    assert combined.zsre_old == "pred"


def test_one_file_is_read_as_it_is(halves):
    first, _ = halves
    assert load_combined([first]).records == load_dataset(first).records


def test_files_reading_old_answers_from_different_fields_are_refused(halves, tmp_path):
    first, second = halves
    raw = json.loads(second.read_text())
    del raw[0]["pred"]  # this file now reads answers[0] by default, the other pred
    second.write_text(json.dumps(raw))
    with pytest.raises(FlearnError, match="different fields") as err:
        load_combined([first, second])
    assert str(first) in str(err.value) and str(second) in str(err.value)
    both = load_combined([first, second], zsre_old="answers")  # an explicit choice reads both alike
    assert both.zsre_old == "answers"


def test_a_name_given_twice_on_the_command_line_is_one_dataset_of_both_files():
    assert _parse_data(["zsre=a.json", "counterfact=c.json", "zsre=b.json"]) == {
        "zsre": ["a.json", "b.json"],
        "counterfact": "c.json",
    }
    cfg = load_config(BenchConfig, None, [], {"data": {"zsre": ["a.json", "b.json"], "cf": ["c.json"]}})
    assert {k: [str(p) for p in v] if isinstance(v, list) else str(v) for k, v in cfg.data.items()} == {
        "zsre": ["a.json", "b.json"],
        "cf": "c.json",  # one file in a list is that file: the same runs and cache as before
    }


def test_the_bench_evaluates_the_records_of_both_files(halves, tiny_model_dir, tmp_path):
    from flearning.recipes.bench import Bench

    first, second = halves
    n = len(load_dataset(first).records) + 5  # past the first file's end
    cfg = load_config(
        BenchConfig,
        None,
        [],
        {"model": str(tiny_model_dir), "data": {"zsre": [first, second]}, "n": n, "out": tmp_path / "b"},
    )
    bench = Bench(cfg, progress=False)
    bench.setup()
    evaluated, _ = bench.datasets["zsre"]
    assert len(evaluated) == n
    assert evaluated[-1].id.startswith("1/") and evaluated[0].id.startswith("0/")
    too_many = load_config(BenchConfig, None, [], {**cfg.model_dump(), "n": 200})
    with pytest.raises(FlearnError, match=r"dev.json \+ .*train.json: \d+ usable records"):
        Bench(too_many, progress=False).setup()


def test_summary_records_each_file_relative_to_the_working_directory(tmp_path, monkeypatch):
    from flearning.recipes.bench_report import portable_config

    monkeypatch.chdir(tmp_path)
    config = portable_config(
        {"data": {"zsre": [str(tmp_path / "d" / "a.json"), "b.json"], "cf": str(tmp_path / "c.json")}}
    )
    assert config["data"] == {"zsre": ["d/a.json", "b.json"], "cf": "c.json"}
