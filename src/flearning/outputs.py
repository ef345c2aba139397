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
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from flearning.errors import FlearnError


def check_output_dir(
    out: Path, *, overwrite: bool, protected: list[Path] | None = None, replaced_whole: bool = True
) -> Path:
    """Refuse outputs that would destroy something: a file, a protected input, a non-empty directory
    (unless ``overwrite``), a directory holding the current one (when ``replaced_whole``: it is swapped
    for a new one), or a place we cannot write to (a parent that is a file or not writable)."""
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
    if replaced_whole:
        refuse_current_directory(out)
    parent = out.parent
    parent_existing = parent
    while not parent_existing.exists():
        parent_existing = parent_existing.parent
    if not parent_existing.is_dir() or not os.access(parent_existing, os.W_OK | os.X_OK):
        raise FlearnError(f"{out}: cannot write here ({parent_existing} is not a writable directory)")
    try:  # os.access says yes to root everywhere, and knows nothing of /proc or /sys: try it
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent_existing))
    except OSError as ex:
        reason = (ex.strerror or str(ex)).lower()
        raise FlearnError(f"{out}: cannot write here ({parent_existing}: {reason})") from ex
    return out


def refuse_current_directory(out: Path) -> None:
    """An output directory is replaced as a whole: refuse one that is (or holds) the current directory,
    which would leave the shell in a deleted directory."""
    out = Path(out).expanduser().resolve()
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the current directory was deleted
        return
    if cwd == out or out in cwd.parents:
        raise FlearnError(
            f"{out}: is the current directory (or holds it); an output directory is replaced as a whole, "
            "so write it into a new subdirectory instead"
        )


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
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


# errno → what the user reads. These are the write failures a user can fix by freeing space or choosing
# another place; any other OSError on the output path is reported with the system's reason.
WRITE_ERRORS = {
    errno.ENOSPC: "no space left on device (disk full)",
    errno.EDQUOT: "disk quota exceeded (disk full for this user)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
_HINT = "choose a location you can write to"
_HINTS = {
    errno.ENOSPC: "free some space or write to another disk",
    errno.EDQUOT: "free some space or write to another disk",
    errno.EROFS: "choose a writable location",
}
_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)")
# The temporary names the atomic writers use: ``.NAME.tmp-XXXXXXXX`` (atomic_directory, atomic_write, the
# vector writer), ``.tmp-NAME-XXXXXXXX`` (training checkpoints) and ``.tmp-XXXXXXXX`` (atomic_entries).
_TEMP_NAME = re.compile(r"^\.(?:(?P<a>.+)\.tmp-|tmp-(?:(?P<b>.+)-)?)[a-z0-9_]{8}$")


def final_path(path: Path | str) -> Path:
    """The path a file being written in a temporary directory will have once it is in place:
    ``/runs/.out.tmp-4f2dbdsi/model.safetensors`` → ``/runs/out/model.safetensors``."""
    parts = []
    for part in Path(path).parts:
        match = _TEMP_NAME.match(part)
        if match is None:
            parts.append(part)
        elif match.group("a") or match.group("b"):
            parts.append(match.group("a") or match.group("b"))
    return Path(*parts) if parts else Path(path)


def write_error_code(ex: BaseException) -> int | None:
    """The errno of a write failure we explain, from an ``OSError`` or from a writer that wraps one in
    its own exception (safetensors raises ``SafetensorError("... (os error 28) ...")``)."""
    code = ex.errno if isinstance(ex, OSError) else None
    if code is None and type(ex).__name__ == "SafetensorError":
        match = _OS_ERROR_IN_TEXT.search(str(ex))
        code = int(match.group(1)) if match else None
    return code if code in WRITE_ERRORS else None


def _on_output_path(path: Path, where: Path) -> bool:
    """Whether ``path`` (already mapped by ``final_path``) is ``where``, inside it or one of its parents."""
    return path == where or where in path.parents or path in where.parents


def write_error_message(ex: BaseException, where: Path | str, *, what: str = "the output") -> str | None:
    """What to tell the user about ``ex`` raised while writing ``where``, or None when ``ex`` is not a
    write failure of that output (a bug, or a failure to read something else, keeps its traceback).

    Explained: the failures of ``WRITE_ERRORS`` (wherever they happened), and any ``OSError`` naming a
    path on the output path (``where``, a file inside it, one of its parents or their temporary
    directories), with the system's reason. The path shown is the final one, never a temporary name.
    """
    where_abs = Path(os.path.abspath(Path(where).expanduser()))
    filename = getattr(ex, "filename", None) if isinstance(ex, OSError) else None
    if not isinstance(filename, (str, bytes, os.PathLike)) or not filename:
        filename = None  # none, or a file descriptor
    path = final_path(os.path.abspath(os.fsdecode(filename))) if filename else None
    code = write_error_code(ex)
    if code is not None:
        return f"cannot write {what} at {path or where}: {WRITE_ERRORS[code]}; {_HINTS.get(code, _HINT)}."
    if path is None or not _on_output_path(path, where_abs):
        return None
    if ex.errno in (errno.EEXIST, errno.ENOTDIR):  # a part of the path is a file
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            return f"cannot write {what} at {where_abs}: {blocker} is a file, not a directory; {_HINT}."
    reason = (ex.strerror or str(ex)).lower()
    shown = where_abs if path in where_abs.parents else path
    detail = f" ({path})" if shown != path else ""
    return f"cannot write {what} at {shown}: {reason}{detail}; {_HINT}."


@contextmanager
def write_errors_as_flearn(where: Path | str, *, what: str = "the output", note: str = "") -> Iterator[None]:
    """Turn a failure to write ``where`` (disk full, read-only, no permission, a file in the way, a path
    the system refuses) into a ``FlearnError`` that names the output, says why, and (``note``) what state
    was left behind. See ``write_error_message`` for what is recognised."""
    try:
        yield
    except FlearnError:
        raise
    except Exception as ex:
        message = write_error_message(ex, where, what=what)
        if message is None:
            raise
        if note:
            message += f" {note}"
        raise FlearnError(message) from ex


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` to ``dst`` (instant, no extra space), or copy it where links are not possible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def carry_over(previous: Path, new: Path, *, skip: Collection[str] = ()) -> None:
    """Put into ``new`` the entries of ``previous`` it lacks, but those named in ``skip`` and temporary
    ones: files and directories an atomically replaced output held beside the files it writes survive the
    replacement. Files are hard-linked where possible (they are never modified in place)."""
    previous, new = Path(previous), Path(new)
    if not previous.is_dir():
        return
    for entry in sorted(previous.iterdir()):
        target = new / entry.name
        if entry.name in skip or _TEMP_NAME.match(entry.name) or target.exists() or target.is_symlink():
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(target))


@contextmanager
def atomic_entries(parent: Path) -> Iterator[Path]:
    """Yield a staging directory to fill with files and directories; when the block succeeds each of them
    replaces the entry of the same name in ``parent`` (other entries of ``parent`` are left alone).

    Nothing is renamed before everything is written, and if a rename fails the entries already swapped
    are swapped back: ``parent`` shows the previous set or the new one, never a mix (a hard kill can only
    land in the few microseconds of the renames). On any error the staging directory vanishes.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
    try:
        yield staging
        normalise_permissions(staging)
        aside = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
        placed: list[str] = []
        try:
            for entry in sorted(staging.iterdir()):
                target = parent / entry.name
                if target.exists() or target.is_symlink():
                    os.replace(target, aside / entry.name)
                os.replace(entry, target)
                placed.append(entry.name)
        except BaseException:
            for name in reversed(placed):  # the new entries out, then the previous ones back
                os.replace(parent / name, staging / name)
            for previous in aside.iterdir():
                os.replace(previous, parent / previous.name)
            raise
        finally:
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
