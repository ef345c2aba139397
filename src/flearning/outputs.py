"""Atomic output directories: a result appears complete or not at all.

Everything is written into a hidden temporary directory beside the target and renamed into place at
the end. An existing target (with ``overwrite``) is first moved aside and removed only after the new
one is in place, so a failure at any point leaves the previous good output untouched.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flearning.errors import FlearnError


def check_output_dir(out: Path, *, overwrite: bool, protected: list[Path] | None = None) -> Path:
    """Refuse outputs that would destroy something: a file, a protected input, a non-empty directory
    (unless ``overwrite``), or a parent we cannot write to."""
    out = Path(out).expanduser().resolve()
    for path in protected or []:
        try:
            p = Path(path).expanduser().resolve()
        except OSError:
            continue
        if out == p or p.is_relative_to(out):
            raise FlearnError(f"{out}: refusing to write into the input model's directory ({p})")
    if out.exists() and not out.is_dir():
        raise FlearnError(f"{out}: output path exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FlearnError(f"{out}: output directory is not empty (pass --overwrite to replace it)")
    parent = out.parent
    parent_existing = parent
    while not parent_existing.exists():
        parent_existing = parent_existing.parent
    if not parent_existing.is_dir() or not os.access(parent_existing, os.W_OK | os.X_OK):
        raise FlearnError(f"{out}: cannot write here ({parent_existing} is not a writable directory)")
    return out


@contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``out``, on any error it vanishes."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        normalise_permissions(tmp)
        if out.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, aside / "previous")
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(aside / "previous", out)  # put the previous output back
                shutil.rmtree(aside, ignore_errors=True)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normalise_permissions(root: Path) -> None:
    """Give a finished output the permissions of ordinary files: ``mkdtemp`` makes the directory 0700
    and safetensors writes 0600, which would hide a shared model from its other users."""
    mask = umask()
    os.chmod(root, 0o777 & ~mask)
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o111
        os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a temporary sibling of ``path``, flush it to disk, give it the permissions a
    plain new file would get, and rename it into place: ``path`` is the old file or the new one, never
    half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a UTF-8 text file atomically (``atomic_write``)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# errno → what the user reads. These are the write failures a user can fix (free space, permissions,
# another disk); anything else is left alone and keeps its traceback.
WRITE_ERRORS = {
    errno.ENOSPC: "no space left on device (disk full)",
    errno.EDQUOT: "disk quota exceeded (disk full for this user)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)")


def write_error_code(ex: BaseException) -> int | None:
    """The errno of a write failure we explain, from an ``OSError`` or from a writer that wraps one in
    its own exception (safetensors raises ``SafetensorError("... (os error 28) ...")``)."""
    code = ex.errno if isinstance(ex, OSError) else None
    if code is None and type(ex).__name__ == "SafetensorError":
        match = _OS_ERROR_IN_TEXT.search(str(ex))
        code = int(match.group(1)) if match else None
    return code if code in WRITE_ERRORS else None


@contextmanager
def write_errors_as_flearn(where: Path | str, *, what: str = "the output", note: str = "") -> Iterator[None]:
    """Turn a disk-full, read-only or permission failure while writing into a ``FlearnError`` that says
    what could not be written, why, and (``note``) what state was left behind."""
    from flearning.errors import FlearnError

    try:
        yield
    except FlearnError:
        raise
    except Exception as ex:
        code = write_error_code(ex)
        if code is None:
            raise
        path = getattr(ex, "filename", None) or where
        hint = {
            errno.ENOSPC: "free some space or write to another disk",
            errno.EDQUOT: "free some space or write to another disk",
            errno.EROFS: "choose a writable location",
        }.get(code, "choose a location you can write to")
        message = f"cannot write {what} at {path}: {WRITE_ERRORS[code]}; {hint}."
        if note:
            message += f" {note}"
        raise FlearnError(message) from ex
