"""Failure injection shared by the reliability tests: writers that die half-way through a file.

A disk that fills up while a file is written leaves the first part of the file on disk and raises
``ENOSPC``. These helpers reproduce that exactly: the real bytes are produced, half of them are written to
the real destination path, then ``OSError(ENOSPC)`` is raised naming that path (as ``open``/``write`` do).
Safetensors itself reports a real full disk as ``SafetensorError("... (os error 28)")``, without a path:
``half_write_safetensors(..., safetensors_error=True)`` raises that instead.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from flearning.io.output import MARKER

SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def write_half_then_fail(path: Path, data: bytes, *, error: BaseException | None = None) -> NoReturn:
    """Write the first half of ``data`` to ``path`` (flushed to the file), then raise ``error`` (default:
    ``OSError(ENOSPC)`` naming ``path``)."""
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
    raise error or OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@dataclass
class HalfWrites:
    """What a patched writer cut short (the destination paths and the bytes that reached them, in order);
    ``stop()`` lets every later write through (``monkeypatch.undo()`` would also undo other fixtures)."""

    cut: list[Path] = field(default_factory=list)
    written: list[int] = field(default_factory=list)
    active: bool = True

    def stop(self) -> None:
        self.active = False

    def fail(self, path: Path, data: bytes, *, error: BaseException | None = None) -> NoReturn:
        self.cut.append(path)
        self.written.append(len(data) // 2)
        write_half_then_fail(path, data, error=error)


def always(path: Path) -> bool:
    return True


def in_temp_dir_of(target: Path) -> Callable[[Path], bool]:
    """A ``when`` that matches files written in the temporary directory of an atomic write of ``target``
    (``<parent>/.<name>.tmp-XXXXXXXX/...``), at any depth."""
    target = Path(target).absolute()

    def when(path: Path) -> bool:
        path = Path(path).absolute()
        return any(
            p.parent == target.parent and p.name.startswith(f".{target.name}.tmp-") for p in path.parents
        )

    return when


def named(name: str) -> Callable[[Path], bool]:
    """A ``when`` that matches files called ``name``."""
    return lambda path: Path(path).name == name


def half_write_safetensors(
    monkeypatch, when: Callable[[Path], bool] = always, *, safetensors_error: bool = False
) -> HalfWrites:
    """Make every safetensors file for which ``when(path)`` holds fail half-way; others are written.

    Patched where the code looks the writer up: ``safetensors.torch.save_file`` (imported at call time by
    the vector and checkpoint writers), ``transformers.modeling_utils.safe_save_file`` (bound at import,
    used by ``save_pretrained``) and ``peft.peft_model.safe_save_file`` (adapters).
    """
    import peft.peft_model
    import safetensors.torch
    import transformers.modeling_utils

    real = safetensors.torch.save_file
    record = HalfWrites()

    def save_file(tensors, filename, metadata=None):
        path = Path(filename)
        if not record.active or not when(path):
            return real(tensors, filename, metadata=metadata)
        data = safetensors.torch.save(tensors, metadata=metadata)
        if safetensors_error:
            from safetensors import SafetensorError

            record.fail(path, data, error=SafetensorError(SAFETENSORS_FULL))
        record.fail(path, data)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", save_file)
    return record


def half_write_png(monkeypatch, when: Callable[[Path], bool] = always) -> HalfWrites:
    """Make matplotlib's ``Figure.savefig`` to a path for which ``when(path)`` holds fail half-way."""
    from matplotlib.figure import Figure

    real = Figure.savefig
    record = HalfWrites()

    def savefig(self, fname, *args, **kwargs):
        if not record.active or not isinstance(fname, (str, os.PathLike)) or not when(Path(fname)):
            return real(self, fname, *args, **kwargs)
        buffer = io.BytesIO()
        real(self, buffer, *args, **kwargs)
        record.fail(Path(fname), buffer.getvalue())

    monkeypatch.setattr(Figure, "savefig", savefig)
    return record


def half_write_text(monkeypatch, when: Callable[[Path], bool]) -> HalfWrites:
    """Make ``Path.write_text`` to a path for which ``when(path)`` holds fail half-way."""
    real = Path.write_text
    record = HalfWrites()

    def write_text(self, data, encoding=None, errors=None, newline=None):
        if not record.active or not when(self):
            return real(self, data, encoding=encoding, errors=errors, newline=newline)
        record.fail(self, data.encode(encoding or "utf-8", errors or "strict"))

    monkeypatch.setattr(Path, "write_text", write_text)
    return record


def half_write_streamed_shards(monkeypatch) -> HalfWrites:
    """Make the streaming writer (``flearn vector apply --stream``) fail half-way through its first block
    of tensor bytes, as ``write(2)`` does on a full disk: ``OSError(ENOSPC)`` without a file name."""
    from flearning.io import safetensors

    real = safetensors.write_all
    record = HalfWrites()

    def write_all(fh, data) -> None:
        if not record.active:
            return real(fh, data)
        view = memoryview(data).cast("B")
        real(fh, view[: len(view) // 2])
        record.cut.append(Path(fh.name))
        record.written.append(len(view) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors, "write_all", write_all)
    return record


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path → bytes): compare before and after a failure."""
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    """Hidden entries of ``parent`` (temporary directories and files of the atomic writers), but for the
    marker of an flearn output (``.flearn-output.json``), which belongs to the output."""
    return sorted(p.name for p in Path(parent).iterdir() if p.name.startswith(".") and p.name != MARKER)
