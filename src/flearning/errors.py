"""User-facing errors.

Every error a user can fix (bad data, bad config, bad path, bad numbers) is a ``FlearnError``: the CLI
prints its message without a traceback and exits with code 2. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

MAX_SHOWN = 20


def format_names(items: Iterable[str], limit: int = MAX_SHOWN) -> str:
    """Indented lines (messages or names) to append to an error message, at most ``limit`` of them,
    then "... and N more"; the string starts with a newline."""
    items = list(items)
    shown = "".join(f"\n  {item}" for item in items[:limit])
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return shown + more


class FlearnError(Exception):
    """An error caused by the user's input; the CLI exits with ``exit_code``."""

    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input: where (file, record, field) and what.

    ``kind`` names what ``record`` counts: ``"record"`` (0-based index in a JSON list) or ``"line"``
    (1-based line number in a JSON Lines file), so the message points where an editor would.
    """

    source: str
    record: int | None
    field: str | None
    message: str
    kind: str = "record"

    def __str__(self) -> str:
        parts = [self.source]
        if self.record is not None:
            parts.append(f"{self.kind} {self.record}")
        if self.field:
            parts.append(self.field)
        return ":".join(parts) + f": {self.message}"


class InputError(FlearnError):
    """Several problems found in one input, reported together (at most ``MAX_SHOWN`` listed)."""

    def __init__(self, problems: list[Problem], what: str = "input") -> None:
        if not problems:
            raise ValueError("InputError needs at least one problem")
        self.problems = list(problems)
        n = len(self.problems)
        shown = "\n".join(f"  {p}" for p in self.problems[:MAX_SHOWN])
        more = f"\n  ... and {n - MAX_SHOWN} more" if n > MAX_SHOWN else ""
        noun = "problem" if n == 1 else "problems"
        super().__init__(f"invalid {what}: {n} {noun}\n{shown}{more}")


class ConfigError(InputError):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(problems, what="configuration")
