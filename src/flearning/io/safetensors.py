"""Safetensors files, and the refusal of everything else.

f-learning reads weights, vectors and adapters from safetensors only: a pickle file (``.bin``, ``.pt``,
...) can run arbitrary code when it is loaded, so it is refused, never opened. This module knows
nothing of models or knowledge vectors; it raises ``SafetensorsError``.
"""

from __future__ import annotations

import os
from pathlib import Path

from flearning.errors import FlearnError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class SafetensorsError(FlearnError):
    """A weights file that is missing, a pickle, or not valid safetensors."""


def pickle_files(directory: str | os.PathLike) -> list[str]:
    """The names of the pickle files in ``directory`` (sorted; empty if it is not a directory)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)


def refuse_pickles(
    path: str | os.PathLike, what: str, *, error: type[FlearnError] = SafetensorsError, hint: str = ""
) -> None:
    """Raise ``error`` if ``path`` is a pickle file or a directory holding pickle files.

    Call it where the safetensors file that is needed is missing, so the message names the pickles
    instead of only "not found". ``what`` starts the sentence ("weights are", "the adapter is"); ``hint``
    is appended (e.g. how to convert).
    """
    path = Path(path)
    names = [path.name] if path.is_file() and path.suffix in PICKLE_SUFFIXES else pickle_files(path)
    if names:
        raise error(
            f"{path}: {what} only in pickle format ({', '.join(names)}), refused: f-learning reads "
            f"safetensors only, because unpickling can run arbitrary code{hint}"
        )
