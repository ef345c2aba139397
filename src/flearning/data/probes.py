"""Prompt → answer probes that are not knowledge records: a JSON Lines file of ``{"prompt", "answer"}``
objects, e.g. the held-out Locality probes of the learning stage's locality budget
(``sample:locality-probes.jsonl``). Every problem in the file is reported at once, by line and field.
"""

from __future__ import annotations

from pathlib import Path

from flearning.data.formats import json_type
from flearning.data.loading import _decode_jsonl, _read_text
from flearning.errors import InputError, Problem

FIELDS = ("prompt", "answer")


def load_probe_pairs(path: str | Path) -> list[tuple[str, str]]:
    """The (prompt, answer) pairs of a JSON Lines probe file, in file order.

    Raises:
        InputError: the file cannot be read, a line is not a JSON object, or a line's ``prompt`` or
            ``answer`` is missing or not a non-empty text (every problem named by line and field).
    """
    path = Path(path)
    source = str(path)
    text, _ = _read_text(path, source)
    values, problems = _decode_jsonl(text, source)
    pairs: list[tuple[str, str]] = []
    for line, value in values:
        if not isinstance(value, dict):
            problems.append(
                Problem(source, line, None, f"expected an object, got {json_type(value)}", "line")
            )
            continue
        found = []
        for key in FIELDS:
            item = value.get(key)
            if key not in value:
                problems.append(Problem(source, line, key, "missing", "line"))
            elif not isinstance(item, str) or not item.strip():
                problems.append(
                    Problem(source, line, key, f"expected a non-empty text, got {json_type(item)}", "line")
                )
            else:
                found.append(item)
        if len(found) == len(FIELDS):
            pairs.append((found[0], found[1]))
    if problems:
        problems.sort(key=lambda p: p.record or 0)
        raise InputError(problems, what="probe file")
    return pairs
