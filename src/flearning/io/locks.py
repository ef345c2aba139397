"""File locks, and what killed writers leave behind: one implementation for every output and the model cache.

``FileLock`` is an ``flock`` on a small file beside what it guards (``.NAME.lock``) that records its holder
(pid, host, command, start); a second process asking for it gets ``LockHeld`` at once (or waits, with
``wait=True``). ``release`` removes the file while still holding it, and ``acquire`` checks that the file
it locked is still the one at that path (else it locks again), so removing lock files is safe. Within one
process the lock is the process's: asking again takes it over (the last taker releases it), so a failed
run whose objects are not yet garbage-collected never blocks the next run in the same process.

The atomic writers (``io.atomic``) stage a new directory in ``.NAME.tmp-XXXXXXXX`` beside ``NAME`` and move
the previous one aside into ``.NAME.old-XXXXXXXX/previous`` for the swap; a killed process leaves them.
``leftovers`` finds them, ``clear_leftover`` removes one (putting a previous ``NAME`` back if the swap was
cut between its two renames: ``puts_back``), ``remove_stale`` removes a list, optionally only those untouched for a while
(for a lock that may not hold: NFS without lock support).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path
from typing import Any

from flearning.errors import FlearnError

log = logging.getLogger(__name__)

# what mkdtemp makes: PREFIX + 8 characters of [a-z0-9_]; ``.NAME.tmp-`` (a new directory being written) and
# ``.NAME.old-`` (the holder of the previous one during a swap)
LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old)-[a-z0-9_]{8}$")


class LockHeld(FlearnError):
    """Another process holds the lock; ``holder`` is what it recorded (pid, host, command, since)."""

    def __init__(self, path: Path, holder: dict[str, Any] | None) -> None:
        self.path, self.holder = path, holder
        super().__init__(f"{path}: locked by {describe_holder(holder)}")


def describe_holder(holder: dict[str, Any] | None) -> str:
    """ "pid 123 (flearn update --out runs/x, since 14:02:11)", "pid 123 on node7 (...)"."""
    if not holder:
        return "another process (it has not said which yet)"
    where = "" if holder.get("host") in (None, socket.gethostname()) else f" on {holder['host']}"
    since = time.strftime("%H:%M:%S", time.localtime(holder["since"])) if "since" in holder else "?"
    return f"pid {holder.get('pid', '?')}{where} ({holder.get('command', '?')}, since {since})"


# lock path -> (open file descriptor, the token of the FileLock owning it); no reference to the FileLock
# itself, so a lock whose run failed is released when that run's objects are garbage-collected
_held: dict[str, tuple[int, object]] = {}
_held_lock = threading.Lock()


class FileLock:
    """An exclusive ``flock`` on ``path`` for this process (``with FileLock(path):`` or acquire/release)."""

    def __init__(self, path: str | os.PathLike, *, wait: bool = False) -> None:
        path = Path(path).expanduser()
        self.path = path.parent.resolve() / path.name
        self.wait = wait
        self._token = object()

    def acquire(self) -> FileLock:
        key = str(self.path)
        with _held_lock:
            if key in _held:  # ours already (an earlier run of this process): take it over
                _held[key] = (_held[key][0], self._token)
                return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise LockHeld(self.path, holder) from None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(self.path, fd):
                break
            os.close(fd)  # its holder removed it meanwhile: lock the file now at the path
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": _command(),
            "since": time.time(),
        }
        with suppress(OSError):  # only informative
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        with _held_lock:
            _held[key] = (fd, self._token)
        return self

    def release(self) -> None:
        """Remove the lock file and let go (nothing if this object does not own the lock)."""
        with _held_lock:
            if _held.get(str(self.path), (None, None))[1] is not self._token:
                return
        let_go(self.path)

    def holder(self) -> dict[str, Any] | None:
        """What the holder recorded, or None (no such file, not readable)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            return _read_holder(fd)
        finally:
            os.close(fd)

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        with suppress(Exception):
            self.release()


def let_go(path: str | os.PathLike) -> None:
    """Remove the lock file ``path`` and let go of it, if this process holds it (whichever ``FileLock`` took
    it: one of a run that failed may not have been garbage-collected yet)."""
    path = Path(path).expanduser()
    path = path.parent.resolve() / path.name
    with _held_lock:
        fd, _ = _held.pop(str(path), (None, None))
    if fd is None:
        return
    try:
        if _same_file(path, fd):
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


def held_by(path: Path) -> dict[str, Any] | str | None:
    """Whether a process holds the lock file ``path`` (this one included), without taking it over or
    removing the file: what the holder recorded ("unknown" if nothing), or None (not held, no such file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(fd) or "unknown"
    except OSError:
        return None
    finally:
        os.close(fd)  # also lets go of it if we got it
    return None


def _same_file(path: Path, fd: int) -> bool:
    try:
        st, fst = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        value = json.loads(os.pread(fd, 4096, 0) or b"null")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _command() -> str:
    words = [os.path.basename(sys.argv[0]) if sys.argv else "python", *sys.argv[1:]]
    text = " ".join(words)
    return text if len(text) <= 120 else text[:117] + "..."


# ---- what killed writers leave ---------------------------------------------------------------------------


def leftovers(directory: Path, name: str | None = None) -> list[Path]:
    """The ``.NAME.tmp-XXXXXXXX`` and ``.NAME.old-XXXXXXXX`` entries of ``directory`` (of ``name`` only, if
    given), sorted."""
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return []
    found = []
    for path in entries:
        match = LEFTOVER.match(path.name)
        if match and (name is None or match["name"] == name):
            found.append(path)
    return sorted(found)


def owner_of(leftover: Path) -> Path:
    """The path a leftover was written for: ``runs/.out.tmp-x1y2z3w4`` → ``runs/out``."""
    match = LEFTOVER.match(leftover.name)
    if match is None:
        raise ValueError(f"{leftover} is not a leftover of an atomic writer")
    return leftover.parent / match["name"]


def size_of(path: Path) -> int:
    """Bytes of the files under ``path`` (symlinks not followed)."""
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def puts_back(leftover: Path) -> bool:
    """Whether ``leftover`` holds the previous ``NAME`` of a swap cut between its two renames: a
    ``.NAME.old-`` holder with a ``previous`` directory, and no ``NAME``."""
    match = LEFTOVER.match(leftover.name)
    return bool(
        match
        and match["what"] == "old"
        and (leftover / "previous").is_dir()
        and not os.path.lexists(owner_of(leftover))
    )


def clear_leftover(leftover: Path) -> None:
    """Remove one leftover, first putting the previous ``NAME`` back when the swap was cut half-way
    (``puts_back``)."""
    if puts_back(leftover):
        os.replace(leftover / "previous", owner_of(leftover))
    if leftover.is_dir() and not leftover.is_symlink():
        shutil.rmtree(leftover, ignore_errors=True)
    else:
        with suppress(FileNotFoundError):
            leftover.unlink()


def newest_mtime(path: Path) -> float:
    """The newest modification time of ``path`` and of everything in it (symlinks not followed)."""
    newest = path.lstat().st_mtime
    for root, dirs, files in os.walk(path):
        for entry in (*dirs, *files):
            with suppress(OSError):  # removed meanwhile
                newest = max(newest, os.lstat(os.path.join(root, entry)).st_mtime)
    return newest


def remove_stale(
    paths: Iterable[Path],
    *,
    what: str,
    max_age: float | None = None,
    now: float | None = None,
    logger: logging.Logger = log,
) -> list[Path]:
    """Remove the leftovers ``paths`` of killed ``what`` (e.g. "conversion"): call it holding the lock of
    what they were written for. With ``max_age``, only those untouched for more than ``max_age`` seconds
    (their own and their files' modification times, against ``now``): where the lock may not hold (NFS
    without lock support) a younger one may belong to a process on another host, and is kept (logged)."""
    removed = []
    now = time.time() if now is None else now
    for path in sorted(paths):
        try:
            age = now - newest_mtime(path)
        except OSError:  # removed meanwhile
            continue
        if max_age is not None and age <= max_age:
            logger.info(
                "keeping %s: changed %.0f s ago, it may be a %s running on another host; "
                "it is removed once untouched for %.0f s",
                path,
                max(age, 0.0),
                what,
                max_age,
            )
            continue
        if puts_back(path):
            logger.info(
                "putting %s back from %s, left behind by an interrupted %s", owner_of(path), path, what
            )
        else:
            logger.info(
                "removing %s, left behind by an interrupted %s (untouched for %.0f s)", path, what, age
            )
        clear_leftover(path)
        removed.append(path)
    return removed
