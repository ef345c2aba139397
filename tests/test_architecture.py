"""The import contract of pyproject.toml ([tool.importlinter]): imports only point down the layers of
docs/DESIGN.md. One test runs it on the package; the other proves it fails on an upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(project: Path, src: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on ``project``'s pyproject.toml, importing ``flearning`` from ``src`` only."""
    env = {**os.environ, "PYTHONPATH": str(src), "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(project / "pyproject.toml"), "--no-cache"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_package_keeps_its_layers():
    result = _lint_imports(REPO, REPO / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def _copy_package(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(
        REPO / "src" / "flearning", src / "flearning", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return src


def test_an_upward_import_breaks_the_contract(tmp_path):
    src = _copy_package(tmp_path)
    errors = src / "flearning" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _upward():\n    import flearning.cli  # noqa: F401\n")
    result = _lint_imports(tmp_path, src)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "0 kept, 1 broken" in result.stdout
    assert "flearning.errors -> flearning.cli" in result.stdout


def test_a_module_outside_the_layers_breaks_the_contract(tmp_path):
    src = _copy_package(tmp_path)
    (src / "flearning" / "helpers.py").write_text('"""A new top-level module nobody placed."""\n')
    result = _lint_imports(tmp_path, src)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "flearning.helpers" in result.stdout
