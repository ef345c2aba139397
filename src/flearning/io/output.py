"""The output-safety rule, in one place: where a command may write, what ``--overwrite`` may replace, the
marker that makes an output recognisable, and the lock a run holds on its output.

- An output never is, holds or lies inside one of the command's inputs (data, model, vector, adapter,
  reference, config), never is or holds the root or the home directory; one replaced as a whole never is
  (or holds) the current directory and never is a symlink (its target would be replaced).
- Without ``overwrite`` no existing file is replaced: a directory replaced whole must be absent or empty;
  one written into (an eval report, a bench) must hold none of the entries it writes.
- ``overwrite`` replaces only an earlier output of the same command: a directory whose marker
  (``.flearn-output.json``, written into every output) names the same kind; a knowledge vector is
  recognised by its own ``vector.json``. The bench continues its own directory without it.
- A run holds ``.NAME.lock`` beside its output from its checks to its end (``claim_output``): a second
  run exits 2 naming the first's pid. Holding it, a run removes what killed runs of the same output left
  (``.NAME.tmp-…``, ``.NAME.old-…``: ``io.locks``). ``flearn clean`` does the same for a whole tree.

Every refusal is a ``FlearnError`` (exit 2) naming the output and why.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from flearning._version import __version__
from flearning.errors import FlearnError
from flearning.io.atomic import atomic_write_text, probe_writable
from flearning.io.locks import (
    FileLock,
    LockHeld,
    clear_leftover,
    describe_holder,
    held_by,
    leftovers,
    let_go,
    owner_of,
    puts_back,
    remove_stale,
    size_of,
)

MARKER = ".flearn-output.json"
MARKER_FORMAT = "flearn-output"
VECTOR_FORMAT = "flearning.knowledge_vector"  # vector.json's "format": a vector describes itself
SELF_DESCRIBED = {"vector"}  # kinds recognised by their own files, written without a marker
LABELS = {
    "update": "flearn update",
    "prime": "flearn prime",
    "eval": "flearn eval",
    "bench": "flearn bench",
    "vector": "flearn vector compute/scale",
    "vector-apply": "flearn vector apply",
}
OVERWRITE_HINT = "pass --overwrite (overwrite=True in Python)"
LOCK_INSIDE = ".flearn.lock"  # the lock of a directory written into whose parent is read-only

PathLike = str | os.PathLike


def label(kind: str) -> str:
    return LABELS.get(kind, f"flearn {kind}")


# ---- the marker ----------------------------------------------------------------------------------------


def output_kind(directory: PathLike) -> str | None:
    """The kind of flearn output ``directory`` is (its marker's, or "vector" for a knowledge vector), or
    None: not a directory, or not recognisably an flearn output."""
    directory = Path(directory)
    for name, key, expect in ((MARKER, "format", MARKER_FORMAT), ("vector.json", "format", VECTOR_FORMAT)):
        try:
            record = json.loads((directory / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get(key) == expect:
            kind = record.get("kind", "vector") if name == MARKER else "vector"
            return kind if isinstance(kind, str) else None
    return None


def write_marker(directory: PathLike, kind: str) -> None:
    """Mark ``directory`` as an output of ``kind`` (atomically; the directory must exist)."""
    record = {"format": MARKER_FORMAT, "kind": kind, "flearning_version": __version__}
    atomic_write_text(Path(directory) / MARKER, json.dumps(record, indent=2) + "\n")


# ---- the checks ----------------------------------------------------------------------------------------


def _absolute(out: PathLike) -> Path:
    return Path(os.path.abspath(Path(out).expanduser()))


def _symlink_message(out: Path) -> str:
    return (
        f"{out}: is a symbolic link (to {out.resolve()}); an output directory is replaced as a whole and "
        "a link's target never is: give a new path, or the target itself"
    )


def check_replaceable(
    out: PathLike, *, kind: str, overwrite: bool, error: type[FlearnError] = FlearnError
) -> None:
    """Refuse (``error``) to replace ``out`` as a whole unless it is absent, an empty directory, or
    (``overwrite``) an earlier output of ``kind``; a file or a symlink is never replaced."""
    out = _absolute(out)
    if out.is_symlink():
        raise error(_symlink_message(out))
    if os.path.lexists(out) and not out.is_dir():
        raise error(f"{out}: output path exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise error(
            f"{out}: output directory is not empty; {OVERWRITE_HINT} to replace an earlier output of {label(kind)}"
        )
    found = output_kind(out)
    if found != kind:
        what = f"the output of {label(found)}" if found else f"not an flearn output (no {MARKER} in it)"
        raise error(
            f"{out}: --overwrite replaces only an earlier output of {label(kind)}, and this is {what}; "
            "move it away or choose another output"
        )


def _check_entries(
    out: Path, *, kind: str, overwrite: bool, entries: Iterable[str], rerun: bool, error: type[FlearnError]
) -> None:
    """For a directory written into: none of ``entries`` may exist, unless it is an earlier output of
    ``kind`` and ``overwrite`` (or ``rerun``: the command continues its own directory)."""
    if not out.is_dir():
        return
    found = output_kind(out)
    if found is not None and found != kind:
        raise error(
            f"{out}: is the output of {label(found)}; {label(kind)} does not write into it: choose another"
        )
    present = sorted(e for e in entries if os.path.lexists(out / e))
    if not present or (found == kind and (overwrite or rerun)):
        return
    names = ", ".join(present)
    if found == kind:
        raise error(
            f"{out}: holds the output of an earlier {label(kind)} ({names}); {OVERWRITE_HINT} to replace it"
        )
    raise error(
        f"{out}: holds {names}, which {label(kind)} would replace, and is not the output of an earlier "
        f"{label(kind)} (no {MARKER} in it); choose another directory"
    )


def _refuse_places(out: Path, *, whole: bool, error: type[FlearnError]) -> None:
    """Never the root or the home directory (or one holding it); replaced whole, never the current one."""
    if out.parent == out:
        raise error(f"{out}: is the root directory; an output never is: choose a new directory for it")
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError, OSError):
        home = None
    if home is not None and (out == home or home.is_relative_to(out)):
        raise error(
            f"{out}: is your home directory (or holds it); an output never is: write it into a new subdirectory"
        )
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the current directory was deleted
        return
    if whole and (cwd == out or out in cwd.parents):
        raise error(
            f"{out}: is the current directory (or holds it); an output directory is replaced as a whole, "
            "so write it into a new subdirectory instead"
        )


def _refuse_inputs(out: Path, inputs: Mapping[str, PathLike | None], error: type[FlearnError]) -> None:
    """Never an input, inside one, or holding one (whatever ``overwrite`` says)."""
    for what, given in inputs.items():
        if given is None:
            continue
        try:
            path = Path(given).expanduser().resolve()
        except (OSError, RuntimeError):
            continue
        if not os.path.lexists(path):  # a hub id, or a path whose own error comes later
            continue
        if out == path or out.is_relative_to(path):
            raise error(f"{out}: refusing to write into the input {what}'s directory ({path})")
        if path.is_relative_to(out):
            raise error(
                f"{out}: holds the input {what} {path}; an output never holds its inputs (writing it could "
                "replace or delete them): choose another directory"
            )


def check_output(
    out: PathLike,
    *,
    kind: str,
    inputs: Mapping[str, PathLike | None],
    overwrite: bool,
    whole: bool = True,
    entries: Iterable[str] = (),
    rerun: bool = False,
    error: type[FlearnError] = FlearnError,
) -> Path:
    """Apply the rule to the output ``out`` of a command of ``kind`` before any work; return it resolved.

    ``whole``: the directory is replaced as a whole (written beside it, renamed into place); otherwise
    ``entries`` are written into it (the directory stays: it may be a symlink, the current directory).
    ``inputs``: what the command reads, by name ("model", "data", ...; None or a non-existent path is
    skipped). ``rerun``: an earlier output of ``kind`` is continued without ``overwrite`` (the bench).
    Also refused: a path under a file, a place the system does not let us write.
    """
    given = _absolute(out)
    if whole and given.is_symlink():
        raise error(_symlink_message(given))
    out = given.resolve()
    if os.path.lexists(out) and not out.is_dir():
        raise error(f"{out}: output path exists and is not a directory")
    _refuse_places(out, whole=whole, error=error)
    _refuse_inputs(out, inputs, error)
    if not whole and out.is_dir():
        probe_writable(out, out)  # written inside only: its parent may be read-only
    else:
        parent = out.parent
        while not parent.exists():
            parent = parent.parent
        probe_writable(parent, out)
    if whole:
        check_replaceable(out, kind=kind, overwrite=overwrite, error=error)
    else:
        _check_entries(out, kind=kind, overwrite=overwrite, entries=entries, rerun=rerun, error=error)
    return out


# ---- the lock and the leftovers ------------------------------------------------------------------------


def lock_path(out: PathLike) -> Path:
    """``.NAME.lock`` beside the output; inside it (``.flearn.lock``) for an existing directory written
    into whose parent is read-only."""
    out = _absolute(out).resolve()
    if out.is_dir() and not os.access(out.parent, os.W_OK | os.X_OK) and os.access(out, os.W_OK | os.X_OK):
        return out / LOCK_INSIDE
    return out.parent / f".{out.name}.lock"


def output_lock(out: PathLike) -> FileLock:
    """The lock every run writing ``out`` holds (not taken yet: ``acquire``/``release``)."""
    return FileLock(lock_path(out))


def release_output(out: PathLike) -> None:
    """Let go of this process's lock on ``out`` (a run that ended with an error: the next may start)."""
    let_go(lock_path(out))


def _leftovers_within(root: Path) -> Iterator[Path]:
    """Every leftover of an atomic writer under ``root``, not descending into leftovers."""
    if not root.is_dir() or root.is_symlink():
        return
    found = leftovers(root)
    yield from found
    try:
        children = sorted(root.iterdir())
    except OSError:  # not readable: nothing of ours in it
        return
    for child in children:
        if child.is_dir() and not child.is_symlink() and child not in found:
            yield from _leftovers_within(child)


class OutputClaim:
    """A checked output and the lock on it (``path``, ``release``; a context manager)."""

    def __init__(self, path: Path, lock: FileLock) -> None:
        self.path, self.lock = path, lock

    def release(self) -> None:
        self.lock.release()

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_output(
    out: PathLike,
    *,
    kind: str,
    inputs: Mapping[str, PathLike | None],
    overwrite: bool,
    whole: bool = True,
    entries: Iterable[str] = (),
    rerun: bool = False,
    within: Iterable[PathLike] = (),
    error: type[FlearnError] = FlearnError,
) -> OutputClaim:
    """``check_output``, then take the output's lock (held until ``release``) and remove what killed runs
    of it left (beside it, and anywhere under the directories ``within``: a work directory, a cache),
    then check again (a leftover may have been the previous output, put back). ``error`` if another run
    holds the lock, naming its pid."""
    entries = list(entries)
    rule = dict(
        kind=kind, inputs=inputs, overwrite=overwrite, whole=whole, entries=entries, rerun=rerun, error=error
    )
    path = check_output(out, **rule)
    lock = output_lock(path)
    try:
        lock.path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except LockHeld as ex:
        raise error(
            f"{path}: another flearn run ({describe_holder(ex.holder)}) is writing this output; wait for it "
            "to finish, or choose another output"
        ) from None
    except OSError as ex:
        raise error(f"{path}: cannot lock it for this run ({(ex.strerror or str(ex)).lower()})") from ex
    try:
        stale = [*leftovers(path.parent, path.name)]
        for directory in within:
            stale.extend(_leftovers_within(Path(directory)))
        remove_stale(stale, what=f"write of {path}")
        check_output(path, **rule)
    except BaseException:
        lock.release()
        raise
    return OutputClaim(path, lock)


def clean(root: PathLike, *, dry_run: bool = False) -> list[dict[str, Any]]:
    """What killed runs left under ``root``: each leftover with its output and what was (``dry_run``:
    would be) done: "removed", "put back" (the previous output of a cut swap), or "kept" when a running
    command (the holder of its output's lock, or of a directory holding it) may be writing it."""
    root = _absolute(root)
    done = []
    for leftover in _leftovers_within(root):
        owner = owner_of(leftover)
        item = {"path": leftover, "output": owner, "bytes": size_of(leftover)}
        holder = _live_holder(owner, root)
        if holder is not None:
            done.append({**item, "action": "kept", "holder": holder})
            continue
        action = "put back" if puts_back(leftover) else "removed"
        if not dry_run:
            lock = output_lock(owner)
            try:
                lock.acquire()
            except (LockHeld, OSError) as ex:  # started meanwhile, or a directory we may not lock
                done.append({**item, "action": "kept", "holder": getattr(ex, "holder", None)})
                continue
            try:
                clear_leftover(leftover)
            finally:
                lock.release()
        done.append({**item, "action": action})
    return done


def _live_holder(owner: Path, root: Path) -> dict[str, Any] | str | None:
    """The holder of the lock of ``owner`` or of any directory holding it (up to ``root``'s parent), if a
    process holds one: what it recorded, or "unknown"."""
    for path in (owner, *owner.parents):
        for candidate in {lock_path(path), path / LOCK_INSIDE}:
            holder = held_by(candidate)
            if holder is not None:
                return holder
        if path == root.parent or path.parent == path:
            break
    return None
