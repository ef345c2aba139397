"""Progress: a tqdm bar on a terminal, a plain log line every few seconds anywhere else.

Every progress display of the package comes from ``progress_bar`` (training steps, scoring and generation
batches, the bench's runs). On a terminal (or in a notebook) it is tqdm's bar. When the stream is not a
terminal (CI, ``nohup``, SLURM, a pipe) a bar redrawn with carriage returns becomes hundreds of lines in
a log file, so there it is ``LogLines``: one line at most every ``LINE_INTERVAL`` seconds, such as
``forget: step 40/120 (33%), loss 1.2300, 2.1 step/s, eta 57 s``, and a closing line with the total time.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Iterable
from typing import IO, Any

from tqdm.std import tqdm as _std_tqdm

LINE_INTERVAL = 10.0  # seconds between two progress lines when the stream is not a terminal


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    leave: bool = True,
    initial: int = 0,
    file: IO[str] | None = None,
    interval: float = LINE_INTERVAL,
    clock: Callable[[], float] | None = None,
):
    """A tqdm object (iterate over it, or ``update``/``set_postfix``/``close`` it) that shows progress
    as a bar on a terminal and as ``LogLines`` elsewhere.

    Args:
        iterable: what to iterate over (or None, and ``update`` by hand).
        total: the expected count (default: ``len(iterable)`` when it has one).
        desc: the label (``forget: FT on old facts``).
        unit: what is counted (``step``, ``batch``, ``run``).
        enabled: False shows nothing (``--no-progress``, or a process other than the main one).
        leave: keep the finished bar; for log lines: write the closing line even when the work took less
            than ``interval`` (a bar with ``leave=False`` that finished quickly leaves no line).
        initial: the count already done (a resumed stage).
        file: the stream (default: standard error).
        interval: seconds between two log lines (not a terminal).
        clock: the time source of the log lines (tests); default ``time.monotonic``.
    """
    stream = file if file is not None else sys.stderr
    if _is_terminal(stream) or _in_notebook():
        from tqdm.auto import tqdm

        return tqdm(
            iterable,
            total=total,
            desc=desc,
            unit=unit,
            disable=not enabled,
            leave=leave,
            initial=initial,
            file=file,
            dynamic_ncols=True,
        )
    return LogLines(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=not enabled,
        leave=leave,
        initial=initial,
        file=stream,
        interval=interval,
        clock=clock,
    )


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _in_notebook() -> bool:
    """Whether tqdm would draw a notebook widget here (Jupyter: its stderr is not a terminal)."""
    if "ipykernel" not in sys.modules:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from tqdm.autonotebook import tqdm as chosen
    return chosen is not _std_tqdm


class LogLines(_std_tqdm):
    """tqdm counting as usual but writing whole lines, at most one per ``interval`` seconds, never a
    carriage return: ``desc: unit n/total (pct%), postfix, rate, eta``. ``close`` writes the closing line
    (``done in ...``)."""

    monitor_interval = 0  # no monitor thread: the lines are written from update/set_postfix only

    def __init__(
        self,
        *args: Any,
        interval: float = LINE_INTERVAL,
        clock: Callable[[], float] | None = None,
        **kwargs: Any,
    ) -> None:
        self.interval = interval
        self._extra: list[str] = []  # set_postfix's key value pairs, or set_postfix_str's text
        self._printed = False
        self._last_t = None  # nothing to write before __init__ has set the clock
        # miniters=1: tqdm's own gate is then time only (mininterval), not a count it adapts
        super().__init__(*args, mininterval=interval, miniters=1, **kwargs)
        if self.disable:
            return
        self._time = clock or time.monotonic
        self.start_t = self.last_print_t = self._last_t = self._time()
        self._last_n = self.n

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs: Any) -> None:
        self._extra = [f"{key} {value}" for key, value in {**dict(ordered_dict or {}), **kwargs}.items()]
        super().set_postfix(ordered_dict, refresh=refresh, **kwargs)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self._extra = [str(s)] if s else []
        super().set_postfix_str(s, refresh=refresh)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        """A line when ``interval`` seconds have passed since the last one (tqdm calls this on updates
        and on ``set_postfix``), none once the count is complete (``close`` writes that one)."""
        if self._last_t is None or (self.total and self.n >= self.total):  # the closing line says it
            return False
        now = self._time()
        if now - self._last_t < self.interval:
            return False
        self._write(self._line(now, final=False))
        self._last_t, self._last_n = now, self.n
        return True

    def close(self) -> None:
        if self.disable:
            return
        now = self._time()
        if self._printed or self.leave or now - self.start_t >= self.interval:
            self._write(self._line(now, final=True))
        self.disable = True
        self._decr_instances(self)

    def _write(self, line: str) -> None:
        self.fp.write(line + "\n")
        getattr(self.fp, "flush", lambda: None)()
        self._printed = True

    def _line(self, now: float, *, final: bool) -> str:
        unit, n, total = self.unit, self.n, self.total
        head = f"{self.desc}: " if self.desc else ""
        count = f"{unit} {n}/{total} ({100 * n / total:.0f}%)" if total else f"{n} {unit}"
        parts = [f"{head}{count}", *self._extra]
        if final:
            seconds = now - self.start_t
            done = n - self.initial
        else:
            seconds = now - self._last_t
            done = n - self._last_n
        rate = done / seconds if seconds > 0 else 0.0
        if rate > 0:
            parts.append(f"{rate:.1f} {unit}/s" if rate >= 1 else f"{1 / rate:.1f} s/{unit}")
        if final:
            parts.append(f"done in {duration(now - self.start_t)}")
        elif rate > 0 and total and total > n:
            parts.append(f"eta {duration((total - n) / rate)}")
        return ", ".join(parts)


def duration(seconds: float) -> str:
    """``57 s``, ``12 min 5 s``, ``2 h 3 min``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min {rest} s"
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours} h {rest // 60} min"
