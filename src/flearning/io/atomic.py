"""Writing outputs atomically: a result appears complete or not at all.

Writers that stage everything in a hidden temporary sibling and rename it into place
(``atomic_directory``, ``atomic_write``, the ``staged_directory`` + ``replace_directory`` pair), so a
failure leaves the previous output untouched; ``atomic_entries`` for a set of entries inside a directory
that stays (a report, a bench's results beside its cache); and the translation of write failures (disk
full, read-only, no permission) into a ``FlearnError`` naming the output (``write_errors_as_flearn``).
What may be written where, and what ``--overwrite`` may replace, is ``io.output``'s rule.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePath

from flearning.errors import FlearnError


def probe_writable(directory: Path, out: Path) -> None:
    """Refuse (``FlearnError`` naming ``out``) a ``directory`` that is not one we can create entries in:
    not a directory, not writable, or refusing a new entry when tried."""
    if not directory.is_dir() or not os.access(directory, os.W_OK | os.X_OK):
        raise FlearnError(f"{out}: cannot write here ({directory} is not a writable directory)")
    try:  # os.access says yes to root everywhere, and knows nothing of /proc or /sys: try it
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=directory))
    except OSError as ex:
        reason = (ex.strerror or str(ex)).lower()
        raise FlearnError(f"{out}: cannot write here ({directory}: {reason})") from ex


@contextmanager
def atomic_directory(
    out: str | os.PathLike,
    *,
    overwrite: bool = True,
    kind: str | None = None,
    error: type[FlearnError] = FlearnError,
) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``out`` (``replace_directory``) with the
    permissions of ordinary files, on any error it vanishes.

    ``kind``: ``out`` is a command's output of that kind: it gets the marker that makes it recognisable
    (``io.output.write_marker``), and may replace only what ``io.output.check_replaceable`` allows (an
    absent or empty directory, or with ``overwrite`` an earlier output of ``kind``; never a symlink).
    Without ``kind`` (a cache entry, an internal directory), a file is refused and so is a non-empty
    directory unless ``overwrite``. ``out`` is checked before writing and again just before the swap (it
    may have changed meanwhile), raising ``error``.
    """
    from flearning.io import output  # the rule (io.output uses this module's writers)

    out = Path(out).expanduser().absolute()

    def check() -> None:
        if kind is not None:
            output.check_replaceable(out, kind=kind, overwrite=overwrite, error=error)
        elif out.exists() and not out.is_dir():
            raise error(f"{out}: exists and is not a directory")
        elif out.is_dir() and any(out.iterdir()) and not overwrite:
            raise error(f"{out}: directory exists and is not empty; {output.OVERWRITE_HINT} to replace it")

    check()
    with staged_directory(out) as tmp:
        yield tmp
        if kind is not None and kind not in output.SELF_DESCRIBED:
            output.write_marker(tmp, kind)
        normalise_permissions(tmp)
        check()
        replace_directory(tmp, out)


@contextmanager
def staged_directory(target: Path, *, prefix: str | None = None) -> Iterator[Path]:
    """Yield a new hidden directory beside ``target`` in which to write its new content, removed if the
    block fails. Named ``.NAME.tmp-XXXXXXXX``, or ``prefix`` + 8 random characters (``prefix`` should be
    one ``final_path`` maps back to ``target``, such as ``.tmp-NAME-``)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(new: Path, target: Path, *, aside: Path | None = None) -> None:
    """Rename the finished directory ``new`` to ``target``, its sibling. An existing ``target`` is first
    moved aside, put back if the rename of ``new`` fails, and removed once ``new`` is in place: a failure
    leaves the previous ``target``, and a kill between the two renames leaves it in the aside place.

    ``aside``: where the previous ``target`` waits, a name the caller recognises (a leftover there is
    removed first); by default inside a fresh hidden ``.NAME.old-XXXXXXXX`` directory.
    """
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
        return
    if aside is None:
        holder = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        aside = holder / "previous"
    else:
        holder = aside
        if aside.exists():  # left by an earlier replacement whose new directory is in place
            shutil.rmtree(aside)
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)  # put the previous one back
        shutil.rmtree(holder, ignore_errors=True)
        raise
    shutil.rmtree(holder, ignore_errors=True)


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
# The temporary names the atomic writers use: ``.NAME.tmp-XXXXXXXX`` (staged_directory, so atomic_directory,
# and atomic_write), ``.tmp-NAME-XXXXXXXX`` (training checkpoints) and ``.tmp-XXXXXXXX`` (atomic_entries).
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
    """Whether ``path`` (already mapped by ``final_path``) is ``where``, inside it, one of its parents, or
    a hidden sibling named after it (``.NAME.lock``, ``.NAME.old-…``) or inside one."""
    if path == where or where in path.parents or path in where.parents:
        return True
    return any(
        p.parent == where.parent and p.name.startswith(f".{where.name}.") for p in (path, *path.parents)
    )


OutputPaths = Path | str | Sequence[Path | str]


def _output_paths(where: OutputPaths) -> list[Path]:
    if isinstance(where, (str, os.PathLike)):
        return [Path(where)]
    return [Path(w) for w in where]


def write_error_message(ex: BaseException, where: OutputPaths, *, what: str = "the output") -> str | None:
    """What to tell the user about ``ex`` raised while writing ``where`` (one path, or the list of paths
    the writing covers: the output first, then e.g. a work directory), or None when ``ex`` is not a write
    failure of those (a bug, or a failure to read an input, keeps its traceback).

    Explained: any ``OSError`` naming a path on an output path (a path of ``where``, a file inside it,
    one of its parents or their temporary directories), with the system's reason (the failures of
    ``WRITE_ERRORS`` with a hint); and a full disk or quota (ENOSPC, EDQUOT) reported without a path (a
    plain write, safetensors), which is put on the first path of ``where``. The path shown is the final
    one, never a temporary name.
    """
    wheres = [Path(os.path.abspath(w.expanduser())) for w in _output_paths(where)]
    if not wheres:
        return None
    filename = getattr(ex, "filename", None) if isinstance(ex, OSError) else None
    if not isinstance(filename, (str, bytes, os.PathLike)) or not filename:
        filename = None  # none, or a file descriptor
    code = write_error_code(ex)
    if filename is None:  # which file failed is unknown: only a full disk is surely the writing's
        if code not in (errno.ENOSPC, errno.EDQUOT):
            return None
        return f"cannot write {what} at {_output_paths(where)[0]}: {WRITE_ERRORS[code]}; {_HINTS[code]}."
    path = final_path(os.path.abspath(os.fsdecode(filename)))
    where_abs = next((w for w in wheres if _on_output_path(path, w)), None)
    if where_abs is None:
        return None
    if code is not None:
        return f"cannot write {what} at {path}: {WRITE_ERRORS[code]}; {_HINTS.get(code, _HINT)}."
    if ex.errno in (errno.EEXIST, errno.ENOTDIR):  # a part of the path is a file
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            return f"cannot write {what} at {where_abs}: {blocker} is a file, not a directory; {_HINT}."
    reason = (ex.strerror or str(ex)).lower()
    shown = where_abs if path in where_abs.parents else path
    detail = f" ({path})" if shown != path else ""
    return f"cannot write {what} at {shown}: {reason}{detail}; {_HINT}."


@contextmanager
def write_errors_as_flearn(where: OutputPaths, *, what: str = "the output", note: str = "") -> Iterator[None]:
    """Turn a failure to write ``where`` (one path, or every path the block writes: the output first)
    into a ``FlearnError`` that names the output, says why, and (``note``) what state was left behind:
    disk full, read-only, no permission, a file in the way, a path the system refuses. An error naming
    any other path (reading an input) is not reworded. See ``write_error_message``."""
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


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _entries_to_swap(staging: Path, parent: Path, rel: PurePath = PurePath()) -> Iterator[PurePath]:
    """The entries of ``staging`` to put in ``parent``, as paths relative to both: a directory that
    exists in ``parent`` too is merged into (its own entries are swapped, the directory stays)."""
    for entry in sorted((staging / rel).iterdir()):
        name = rel / entry.name
        if entry.is_dir() and not entry.is_symlink() and (parent / name).is_dir():
            yield from _entries_to_swap(staging, parent, name)
        else:
            yield name


def _reason(ex: BaseException) -> str:
    if isinstance(ex, OSError) and ex.strerror:
        return ex.strerror.lower()
    return str(ex) or type(ex).__name__


@contextmanager
def atomic_entries(parent: Path, *, stale: Collection[str] = ()) -> Iterator[Path]:
    """Yield a staging directory to fill with files and directories; when the block succeeds each of them
    replaces the entry of the same name in ``parent`` (a directory that exists in ``parent`` is merged
    into: the entries written in it replace theirs, the directory itself and its other entries stay).
    ``stale`` names entries (relative paths, ``"toy/sweep.png"``) of ``parent`` the new set does not
    write but which belong to the set: they are removed as part of the same swap. Every other entry of
    ``parent``, and ``parent`` itself (owner, mode, a symlink to it, a mount point), is left alone.

    Nothing is renamed before everything is written, and if a rename fails the entries already swapped
    are swapped back: ``parent`` shows the previous set or the new one, never a mix (a hard kill can only
    land in the few microseconds of the renames). Should putting them back fail too, the previous entries
    are left in a hidden directory of ``parent`` and the ``FlearnError`` raised says where. On any error
    the staging directory vanishes. A ``parent`` that does not exist yet appears whole, or not at all.
    """
    parent = Path(parent)
    if _exists(parent) and not parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(parent))
    if not parent.is_dir():
        with atomic_directory(parent) as tmp:
            yield tmp
        return
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
    try:
        yield staging
        normalise_permissions(staging)  # only what the command wrote is in it
        _swap_in(staging, parent, stale)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(staging: Path, parent: Path, stale: Collection[str]) -> None:
    new = list(_entries_to_swap(staging, parent))
    placed = set(new)
    removed = [
        PurePath(rel)
        for rel in stale
        if PurePath(rel) not in placed
        and not any(p in placed for p in PurePath(rel).parents)
        and _exists(parent / rel)
    ]
    aside = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
    done: list[tuple[Path, Path]] = []  # the renames made, in order
    try:
        for rel in [*removed, *new]:  # every directory made before the first rename
            (aside / rel).parent.mkdir(parents=True, exist_ok=True)
        for rel in removed:
            os.replace(parent / rel, aside / rel)
            done.append((parent / rel, aside / rel))
        for rel in new:
            if _exists(parent / rel):
                os.replace(parent / rel, aside / rel)
                done.append((parent / rel, aside / rel))
            os.replace(staging / rel, parent / rel)
            done.append((staging / rel, parent / rel))
    except BaseException:
        _undo(done, staging, parent, aside)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _undo(done: list[tuple[Path, Path]], staging: Path, parent: Path, aside: Path) -> None:
    """Put every entry renamed by ``_swap_in`` back where it was (new ones into ``staging``, previous ones
    into ``parent``), going on past a failure; then remove ``aside``, unless a previous entry is still in
    it: it is left there and a ``FlearnError`` says where."""
    failures: list[tuple[Path, BaseException]] = []
    restored: set[Path] = set()
    for src, dst in reversed(done):
        try:
            os.replace(dst, src)
        except BaseException as ex:  # a second Ctrl-C included: the previous entries come first
            failures.append((dst, ex))
        else:
            if dst.is_relative_to(aside):
                restored.add(src)
    if not failures:
        shutil.rmtree(aside, ignore_errors=True)
        return
    kept = [str(dst.relative_to(aside)) for dst, _ in failures if dst.is_relative_to(aside)]
    new_left = [
        str(dst.relative_to(parent))
        for dst, _ in failures
        if not dst.is_relative_to(aside) and dst not in restored
    ]
    message = (
        f"{parent}: the new entries could not all be put in place, and putting the previous ones back "
        f"failed too ({_reason(failures[0][1])})."
    )
    if kept:
        message += (
            f" The previous {', '.join(kept)} could not be put back: "
            f"{'it is' if len(kept) == 1 else 'they are'} kept in {aside}; move "
            f"{'it' if len(kept) == 1 else 'them'} back into {parent} by hand."
        )
    else:
        shutil.rmtree(aside, ignore_errors=True)
    if new_left:
        message += f" {', '.join(new_left)} in {parent} {'is the new one' if len(new_left) == 1 else 'are the new ones'}."
    raise FlearnError(message) from failures[0][1]
