"""The user's own column names mapped onto the project's fields (``--field prompt=question``).

A mapping is ``{field: column}``: ``field`` one of the project's fields (``formats.JSONL_FIELDS``),
``column`` the name in the user's file. A mapped record is read as the project's own layout (format
``jsonl``). The mapping is checked against the file's columns before any record is (``check_columns``),
and problems found in a record name the user's column (``rename_problems``), since that is what the user
can find in the file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from flearning.data.formats import JSONL_FIELDS
from flearning.errors import FlearnError, Problem

FIELD_OPTION = "--field"


def parse_fields(items: Iterable[str] | None) -> dict[str, str] | None:
    """``--field`` values (repeatable, each ``FIELD=COLUMN[,FIELD=COLUMN...]``) as ``{field: column}``.

    Returns:
        The mapping, or None when no item was given.
    Raises:
        FlearnError: an item is not ``FIELD=COLUMN``, a field is unknown or given twice.
    """
    mapping: dict[str, str] = {}
    problems: list[str] = []
    for item in items or ():
        for part in item.split(","):
            if not part.strip():
                continue
            field, sep, column = part.partition("=")
            field, column = field.strip(), column.strip()
            if not sep or not field or not column:
                problems.append(f"{part.strip()!r} is not FIELD=COLUMN")
            elif field in mapping and mapping[field] != column:
                problems.append(f"{field} is mapped twice ({mapping[field]} and {column})")
            else:
                mapping[field] = column
    problems += mapping_problems(mapping)
    if problems:
        raise FlearnError(f"{FIELD_OPTION}: " + "; ".join(problems))
    return mapping or None


def mapping_problems(mapping: Mapping[str, Any]) -> list[str]:
    """What is wrong with a ``{field: column}`` mapping on its own: fields that are not the project's,
    columns that are not non-empty text."""
    problems = []
    for field, column in mapping.items():
        if field not in JSONL_FIELDS:
            problems.append(f"'{field}' is not a field (fields: {', '.join(JSONL_FIELDS)})")
        elif not isinstance(column, str) or not column.strip():
            problems.append(f"{field}: the column must be a non-empty name, got {column!r}")
    return problems


def other_target(part: str) -> tuple[str, ...]:
    """The field a file of ``part`` (``both``, ``old``, ``new``) may lack a column for: in a split pair,
    the other file's target."""
    if part == "old":
        return ("target_new",)
    if part == "new":
        return ("target_old",)
    return ()


def check_columns(
    mapping: Mapping[str, str], columns: Iterable[str], source: str, *, part: str = "both"
) -> list[Problem]:
    """A problem per mapped column the file does not have (except the other side's target of a split
    pair), naming the column and listing the columns the file has; and per unknown field."""
    present = list(dict.fromkeys(columns))
    listed = ", ".join(present) if present else "none"
    problems = [Problem(source, None, FIELD_OPTION, message) for message in mapping_problems(mapping)]
    for field, column in mapping.items():
        if field in JSONL_FIELDS and column not in present and field not in other_target(part):
            problems.append(
                Problem(
                    source,
                    None,
                    column,
                    f"no such column (mapped to {field} by {FIELD_OPTION} {field}={column}); "
                    f"the columns are: {listed}",
                )
            )
    return problems


def unused_columns(mapping: Mapping[str, str] | None, columns: Iterable[str]) -> list[str]:
    """Columns a mapped (or table) file has that no field reads: neither mapped nor named like a field."""
    mapping = mapping or {}
    used = set(mapping.values()) | {f for f in JSONL_FIELDS if f not in mapping}
    return [c for c in dict.fromkeys(columns) if c not in used]


def map_record(raw: Mapping[str, Any], mapping: Mapping[str, str] | None) -> dict[str, Any]:
    """The record with the project's field names: each mapped column under its field, the columns named
    like a field and not mapped as they are; other columns are not read (``unused_columns``)."""
    mapping = mapping or {}
    sources = set(mapping.values())
    out = {field: raw[column] for field, column in mapping.items() if column in raw}
    for key, value in raw.items():
        if key in JSONL_FIELDS and key not in mapping and key not in sources:
            out[key] = value
    return out


_HEAD = re.compile(r"^[^.\[]+")


def rename_problems(problems: list[Problem], mapping: Mapping[str, str] | None) -> list[Problem]:
    """Problems of mapped records naming the user's column instead of the field (``question: must not be
    empty (mapped to prompt)``)."""
    if not mapping:
        return problems
    out = []
    for problem in problems:
        head = _HEAD.match(problem.field or "")
        if head is None or head.group(0) not in mapping:
            out.append(problem)
            continue
        field = head.group(0)
        renamed = mapping[field] + problem.field[head.end() :]
        out.append(replace(problem, field=renamed, message=f"{problem.message} (mapped to {field})"))
    return out
