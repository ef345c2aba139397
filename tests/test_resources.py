"""Shipped samples and configs are found through the package (flearning.resources), by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from flearning.config import UpdateConfig, load_config, stage_plan
from flearning.errors import ConfigError, FlearnError
from flearning.resources import (
    config_names,
    config_path,
    configs_dir,
    resolve_config,
    resolve_sample,
    sample_names,
    sample_path,
    samples_dir,
)

REPO = Path(__file__).resolve().parents[1]
METHOD_CONFIGS = [
    "alphaedit",
    "flearning-alphaedit",
    "flearning-ft",
    "flearning-lora",
    "flearning-lora-ft",
    "flearning-memit",
    "ft",
    "ft-c",
    "lora",
    "memit",
    "rome",
]


def test_shipped_files_are_inside_the_package():
    package = REPO / "src" / "flearning" / "resources"
    assert samples_dir() == package / "samples" and configs_dir() == package / "configs"
    assert sample_names() == [
        "counterfact-200.json",
        "counterfact-rome-sample.json",
        "facts.jsonl",
        "locality-probes.jsonl",
        "wikitext-2-valid-200.txt",
        "zsre-200.json",
    ]
    assert config_names() == sorted(["demo", *METHOD_CONFIGS])
    assert (samples_dir() / "README.md").is_file()  # the attribution travels with the data
    assert sorted(p.name for p in (configs_dir() / "accelerate").glob("*.yaml")) == [
        "ddp-cpu.yaml",
        "ddp.yaml",
        "deepspeed-zero2.yaml",
        "deepspeed-zero3.yaml",
        "fsdp2-cpu.yaml",
        "fsdp2.yaml",
        "multi-node.yaml",
    ]


def test_checkout_paths_are_links_to_the_package():
    assert (REPO / "data" / "samples" / "facts.jsonl").samefile(sample_path("facts.jsonl"))
    assert (REPO / "configs" / "demo.yaml").samefile(config_path("demo"))
    assert (REPO / "data" / "README.md").samefile(samples_dir() / "README.md")


def test_names_resolve_and_unknown_names_are_named():
    assert config_path("demo") == config_path("demo.yaml") == configs_dir() / "demo.yaml"
    assert resolve_sample("sample:zsre-200.json") == samples_dir() / "zsre-200.json"
    assert resolve_sample("data/x.json") == Path("data/x.json")
    with pytest.raises(FlearnError, match=r"no shipped sample 'nope.json'; shipped samples: counterfact-200"):
        sample_path("nope.json")
    for bad in ("../configs/demo.yaml", "README.md", ""):
        with pytest.raises(FlearnError, match="no shipped sample"):
            sample_path(bad)
    with pytest.raises(
        FlearnError, match=r"no shipped config 'nope'; shipped configs: alphaedit, demo, flearning-alphaedit"
    ):
        config_path("nope")


def test_resolve_config_prefers_an_existing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config("demo") == config_path("demo")
    assert resolve_config(Path("ft.yaml")) == config_path("ft")
    (tmp_path / "demo").write_text("method: ft\n")
    assert resolve_config("demo") == Path("demo")  # a file of that name wins
    assert resolve_config("sub/demo") == Path("sub/demo")  # a path is never a shipped name
    assert resolve_config("missing") == Path("missing")  # left for the reader to report


@pytest.mark.parametrize("name", ["demo", *METHOD_CONFIGS])
def test_every_shipped_config_is_valid_and_its_data_is_shipped(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing relative to the checkout
    path = resolve_config(name)
    cfg = load_config(UpdateConfig, path, [])
    stage_plan(cfg, source=str(path))
    old, new = cfg.data_files()
    assert old == new and old.parent == samples_dir() and old.is_file()


def test_a_missing_sample_is_a_config_problem_naming_the_file():
    with pytest.raises(ConfigError, match=r"data: .*no shipped sample 'facts.json'; shipped samples"):
        load_config(UpdateConfig, None, ["data=sample:facts.json"])
