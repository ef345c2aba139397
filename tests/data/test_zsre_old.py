"""Where a ZsRE record's old answer comes from (issue #11): ``pred`` (the F-Learning paper's choice, the
default when every record has one) or ``answers[0]``; a clear error when ``pred`` is asked for and missing."""

from __future__ import annotations

import pytest
from data_helpers import SAMPLES, SHARED_DATA, counterfact_record, write_json, zsre_record

from flearning.config import BenchConfig, UpdateConfig, load_config
from flearning.data import load_dataset
from flearning.errors import ConfigError, FlearnError, InputError


def test_sample_defaults_to_pred_and_keeps_every_record():
    """zsre-200 has ``pred`` on every record: it is the default, and no record's alt equals its pred."""
    ds = load_dataset(SAMPLES / "zsre-200.json")
    assert (ds.zsre_old, ds.n_raw, len(ds.records), ds.dropped) == ("pred", 200, 200, {})
    # record 1: pred 'Viking Press', answers ['Sega']; record 2: pred 'Manchester', answers and alt 'Liverpool'
    assert [(r.id, r.target_old, r.target_new) for r in ds.records[1:3]] == [
        ("1", "Viking Press", "Cinematronics"),
        ("2", "Manchester", "Liverpool"),
    ]


def test_sample_with_answers_drops_the_records_whose_alt_is_the_gold_answer():
    ds = load_dataset(SAMPLES / "zsre-200.json", zsre_old="answers")
    assert (ds.zsre_old, len(ds.records), ds.dropped) == ("answers", 192, {"target_new_equals_old": 8})
    assert [(r.id, r.target_old) for r in ds.records[1:3]] == [("1", "Sega"), ("3", "saint")]


def test_pred_asked_for_but_missing_names_file_record_and_field(tmp_path):
    recs = [zsre_record(0), {k: v for k, v in zsre_record(1).items() if k != "pred"}, zsre_record(2, pred=7)]
    path = write_json(tmp_path / "z.json", recs)
    with pytest.raises(InputError) as info:
        load_dataset(path, zsre_old="pred")
    assert str(info.value) == (
        "invalid dataset: 2 problems\n"
        f"  {path}:record 1:pred: missing (the old answer is read from pred: zsre_old pred; zsre_old answers "
        "reads answers)\n"
        f"  {path}:record 2:pred: expected a string, got a number"
    )


def test_default_is_answers_when_a_record_has_no_pred(tmp_path):
    recs = [zsre_record(0), {k: v for k, v in zsre_record(1).items() if k != "pred"}]
    ds = load_dataset(write_json(tmp_path / "z.json", recs))
    assert ds.zsre_old == "answers"
    assert [r.target_old for r in ds.records] == ["Old River 0", "Old River 1"]


def test_pred_read_from_every_record(tmp_path):
    recs = [zsre_record(0, pred=" Old Pred 0 "), zsre_record(1, pred=["Old Pred 1", "x"])]
    ds = load_dataset(write_json(tmp_path / "z.json", recs), zsre_old="pred")
    assert [r.target_old for r in ds.records] == ["Old Pred 0", "Old Pred 1"]


def test_other_formats_ignore_the_setting(tmp_path):
    ds = load_dataset(write_json(tmp_path / "c.json", [counterfact_record(0)]), zsre_old="pred")
    assert (ds.format, ds.zsre_old, ds.records[0].target_old) == ("counterfact", None, "Homeland 0")


def test_unknown_choice_is_refused():
    with pytest.raises(FlearnError, match="zsre_old must be one of pred, answers, not 'gold'"):
        load_dataset(SAMPLES / "zsre-200.json", zsre_old="gold")


@pytest.mark.parametrize(
    ("name", "old", "n_kept", "dropped"),
    [
        ("zsre/zsre_dev-2.8k.json", "pred", 2815, {}),
        ("zsre/zsre_dev-2.8k.json", "answers", 2707, {"target_new_equals_old": 108}),
        ("zsre/zsre_mend_train-1k.json", "pred", 998, {"empty_target_new": 2}),
        (
            "zsre/zsre_mend_train-1k.json",
            "answers",
            981,
            {"empty_target_new": 2, "target_new_equals_old": 17},
        ),
    ],
)
def test_shared_zsre_files_have_pred(name, old, n_kept, dropped):
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    assert load_dataset(path).zsre_old == "pred"  # every record has one
    ds = load_dataset(path, zsre_old=old)
    assert (len(ds.records), ds.dropped) == (n_kept, dropped)


def test_config_setting_is_checked():
    assert UpdateConfig().zsre_old is None and BenchConfig(data="samples").zsre_old is None
    assert UpdateConfig(zsre_old="pred").zsre_old == "pred"
    with pytest.raises(ConfigError) as info:
        load_config(UpdateConfig, None, ["zsre_old=gold"], {})
    assert "zsre_old: Input should be 'pred' or 'answers'" in str(info.value)


def test_paper_profile_keeps_answers_and_paper_v2_reads_pred():
    """The published 200-edit results were made with answers[0]; the paper's protocol reads pred."""
    assert load_config(BenchConfig, None, [], {"data": "samples"}, profile="paper").zsre_old == "answers"
    assert load_config(BenchConfig, None, [], {"data": "samples"}, profile="paper-v2").zsre_old == "pred"
