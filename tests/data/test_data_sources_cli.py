"""The datasets sources from the command line: ``flearn data check FILE.parquet --field ...``, ``--split``,
``flearn update --field``, hub ids offline (in a fresh process, since huggingface_hub and datasets read
HF_HOME and the offline switches when imported), and ``datasets`` never imported at start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import datasets
import pytest
from data_helpers import (
    USER_COLUMNS,
    field_option,
    jsonl_record,
    user_record,
    write_csv,
    write_parquet,
)
from typer.testing import CliRunner

from flearning.cli import main
from flearning.cli.data import data_app
from flearning.config import UpdateConfig, load_config
from flearning.errors import ConfigError, InputError


def user_rows(n: int = 3, **extra) -> list[dict]:
    return [user_record(jsonl_record(i), **extra) for i in range(n)]


def test_data_check_of_a_parquet_file_with_fields(tmp_path, capsys):
    path = write_parquet(tmp_path / "facts.parquet", user_rows(source="wiki"))
    options = ["--field", "id=fact_id,prompt=question", "--field", "target_old=answer_before"]
    options += ["--field", "target_new=answer_after,subject=entity,rephrase_prompts=paraphrases"]
    options += ["--field", "locality=neighbours"]
    assert main(["-q", "data", "check", str(path), *options, "--model", "none", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["format"], summary["reader"], summary["split"]) == ("jsonl", "parquet", None)
    assert summary["fields"] == USER_COLUMNS
    assert summary["unused_columns"] == ["source"]
    assert (summary["n_raw"], summary["n_kept"]) == (3, 3)
    assert summary["coverage"] == {"subject": 3, "rephrase": 3, "locality": 3, "portability": 0}


def test_data_check_of_a_parquet_file_with_a_missing_column_exits_2(tmp_path, capsys):
    path = write_parquet(tmp_path / "facts.parquet", user_rows())
    mapping = field_option(USER_COLUMNS | {"target_new": "new_answer"})
    before = sorted(tmp_path.rglob("*"))
    assert main(["-q", "data", "check", str(path), "--field", mapping, "--model", "none"]) == 2
    out, err = capsys.readouterr()
    columns = ", ".join(user_rows()[0])
    assert err == (
        "error: invalid dataset: 1 problem\n"
        f"  {path}:new_answer: no such column (mapped to target_new by --field target_new=new_answer); "
        f"the columns are: {columns}\n"
    )
    assert out == ""
    assert sorted(tmp_path.rglob("*")) == before  # nothing written next to the data


def test_data_check_of_bad_records_exits_2_listing_each(tmp_path, capsys):
    rows = user_rows()
    rows[0]["answer_after"] = ""
    rows[2]["question"] = ""
    path = write_parquet(tmp_path / "facts.parquet", rows)
    code = main(["-q", "data", "check", str(path), "--field", field_option(), "--strict", "--model", "none"])
    assert code == 2
    assert capsys.readouterr().err == (
        "error: invalid dataset: 2 problems\n"
        f"  {path}:record 0:answer_after: the new target is empty (strict mode rejects it) (mapped to "
        "target_new)\n"
        f"  {path}:record 2:question: must not be empty (mapped to prompt)\n"
    )


def test_data_check_field_option_errors_exit_2(tmp_path, capsys):
    path = write_parquet(tmp_path / "facts.parquet", user_rows())
    assert main(["-q", "data", "check", str(path), "--field", "promt=question", "--model", "none"]) == 2
    assert capsys.readouterr().err == (
        "error: --field: 'promt' is not a field (fields: id, prompt, target_old, target_new, subject, "
        "rephrase_prompts, locality, portability)\n"
    )
    assert main(["-q", "data", "check", str(path), "--field", "prompt", "--model", "none"]) == 2
    assert capsys.readouterr().err == "error: --field: 'prompt' is not FIELD=COLUMN\n"


def test_data_check_of_a_csv_file_in_rich_tables(tmp_path):
    rows = [{k: v for k, v in r.items() if isinstance(v, str)} | {"topic": "x"} for r in user_rows()]
    path = write_csv(tmp_path / "facts.csv", rows)
    text_fields = {k: v for k, v in USER_COLUMNS.items() if k not in ("rephrase_prompts", "locality")}
    result = CliRunner().invoke(
        data_app, ["check", str(path), "--field", field_option(text_fields), "--model", "none"]
    )
    assert result.exit_code == 0, result.output
    assert "3 in the file, 3 kept" in result.output
    assert "csv" in result.output
    assert "prompt=question" in result.output
    assert "columns not read" in result.output and "topic" in result.output


def test_data_check_of_a_dataset_dict_directory_and_its_splits(tmp_path, capsys):
    directory = tmp_path / "facts-dd"
    rows = user_rows(5)
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:2]), "test": datasets.Dataset.from_list(rows[2:])}
    ).save_to_disk(str(directory))
    args = ["-q", "data", "check", str(directory), "--field", field_option(), "--model", "none"]
    assert main([*args, "--split", "test", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["reader"], summary["split"], summary["n_kept"]) == ("disk", "test", 3)
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"error: invalid dataset: 1 problem\n  {directory}: holds the splits train, test: choose one with "
        "--split NAME (split: NAME)\n"
    )
    result = CliRunner().invoke(
        data_app, ["check", str(directory), "--field", "prompt=question", "-m", "none"]
    )
    assert isinstance(result.exception, InputError)  # main turns it into exit code 2


def test_update_reads_fields_and_split_from_options_and_config(tmp_path):
    cfg = load_config(
        UpdateConfig,
        None,
        ["split=test"],
        {"data": tmp_path / "d.parquet", "fields": {"prompt": "question", "target_old": "was"}},
    )
    assert (cfg.fields, cfg.split) == ({"prompt": "question", "target_old": "was"}, "test")
    config = tmp_path / "run.yaml"
    config.write_text("data: hf:owner/name\nfields:\n  prompt: question\n  promt: query\n")
    with pytest.raises(ConfigError) as info:
        load_config(UpdateConfig, config, [], {})
    assert str(info.value) == (
        f"invalid configuration: 1 problem\n  {config}:fields: 'promt' is not a field (fields: id, "
        "prompt, target_old, target_new, subject, rephrase_prompts, locality, portability)"
    )
    config.write_text("data: hf:owner/name\nfields:\n  prompt: question\n")
    assert str(load_config(UpdateConfig, config, [], {}).data) == "hf:owner/name"  # not config-relative


def test_update_dry_run_with_a_parquet_file_and_fields(tiny_model_dir, tmp_path, capsys):
    rows = user_rows()
    path = write_parquet(tmp_path / "facts.parquet", rows)
    args = ["update", "--model", str(tiny_model_dir), "--data", str(path), "--dry-run"]
    assert main([*args, "--field", field_option()]) == 0
    assert "learn" in capsys.readouterr().out
    rows[1]["answer_before"] = None
    write_parquet(path, rows)
    assert main([*args, "--field", field_option()]) == 2
    assert f"{path}:record 1:answer_before: missing (mapped to target_old)" in capsys.readouterr().err


def test_eval_reads_a_dataset_dict_split_with_fields(tiny_model_dir, tmp_path, capsys):
    directory = tmp_path / "facts-dd"
    rows = user_rows(4)
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:2]), "test": datasets.Dataset.from_list(rows[2:])}
    ).save_to_disk(str(directory))
    out = tmp_path / "report"
    args = ["eval", "-m", str(tiny_model_dir), "-d", str(directory), "--no-generation", "--no-progress"]
    assert main([*args, "--field", field_option(), "--split", "test", "-o", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    (meta,) = summary["methods"]["tiny-model"]["meta"]
    assert (meta["data"], meta["format"], meta["split"]) == (str(directory), "jsonl", "test")
    assert meta["fields"] == USER_COLUMNS
    assert summary["methods"]["tiny-model"]["metrics"]["reliability"]["n"] == 2
    capsys.readouterr()
    assert main([*args, "--field", "prompt=query", "--split", "test", "-o", str(tmp_path / "r2")]) == 2
    assert f"{directory}[test]:query: no such column (mapped to prompt" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()  # refused before the output is touched


def test_bench_takes_fields_and_split_for_every_dataset(tmp_path, capsys):
    from flearning.config import BenchConfig

    path = write_parquet(tmp_path / "facts.parquet", user_rows())
    cli = {"data": {"mine": str(path)}, "fields": USER_COLUMNS, "split": None}
    cfg = load_config(BenchConfig, None, [], cli)
    assert (cfg.fields, cfg.split) == (USER_COLUMNS, None)
    assert (
        main(["bench", "--data", f"mine={path}", "--field", "promt=question", "--out", str(tmp_path / "b")])
        == 2
    )
    assert "--field: 'promt' is not a field" in capsys.readouterr().err


# --- fresh processes: hub ids offline, and no datasets at start-up --------------------------------


def _env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_DATASETS_", "HF_HUB_CACHE"))}
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return env


def _flearn(args: list[str], env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flearning.cli", "-q", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_an_offline_hub_id_not_in_the_cache_is_a_clear_error(tmp_path):
    env = _env(tmp_path)
    for given in ("hf:owner/name", "owner/name"):  # bare owner/name: nothing local is named owner
        start = time.monotonic()
        result = _flearn(["data", "check", given, "--model", "none"], env, tmp_path)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert result.stderr.startswith(
            f"error: hub dataset {given}: not in the local cache ({tmp_path / 'hf' / 'datasets'}) and "
            "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): load it once with network access, "
            "or give a local file"
        ), result.stderr
        assert time.monotonic() - start < 60  # refused at once, no network retries
    assert not (tmp_path / "hf" / "hub").exists()  # nothing was downloaded


CACHE_A_HUB_DATASET = """
import os, shutil, sys
import datasets
from datasets.packaged_modules.parquet.parquet import Parquet

# what loading owner/name once online leaves in the datasets cache: its splits prepared as Arrow files
# under owner___name/<config>/<version>/<hash>/ (built here from local Parquet files by datasets' own
# builder, whose namespace directory is then named as a hub download's is)
cache = datasets.config.HF_DATASETS_CACHE
files = {"train": os.path.abspath(sys.argv[1]), "test": os.path.abspath(sys.argv[2])}
builder = Parquet(cache_dir=cache, dataset_name="name", data_files=files, hash="0123abcd", config_id="default")
builder.download_and_prepare()
shutil.move(os.path.join(cache, "name"), os.path.join(cache, "owner___name"))
"""


def test_a_hub_dataset_in_the_users_cache_loads_offline(tmp_path):
    env = _env(tmp_path)
    rows = user_rows(5)
    train = write_parquet(tmp_path / "train.parquet", rows[:2])
    test = write_parquet(tmp_path / "test.parquet", rows[2:])
    made = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CACHE_A_HUB_DATASET), str(train), str(test)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    args = ["data", "check", "hf:owner/name", "--field", field_option(), "--model", "none", "--json"]
    result = _flearn([*args, "--split", "test"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["path"], summary["reader"], summary["split"]) == ("hf:owner/name", "hub", "test")
    assert (summary["n_kept"], summary["fields"]) == (3, USER_COLUMNS)
    result = _flearn(args, env, tmp_path)  # two splits, none chosen
    assert result.returncode == 2
    assert result.stderr.endswith(  # after datasets' own warning that it used its cache
        "error: invalid dataset: 1 problem\n  hf:owner/name: holds the splits train, test: choose one with "
        "--split NAME (split: NAME)\n"
    )


def test_datasets_is_not_imported_at_start_up():
    code = (
        "import sys, flearning, flearning.data, flearning.cli, flearning.config\n"
        "print(sorted(m for m in ('datasets', 'pyarrow', 'pandas') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
