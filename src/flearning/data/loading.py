"""Load a knowledge dataset into ``KnowledgeRecord``s, or report everything wrong with it at once.

A dataset is a JSON list or JSON Lines file, or a table read through ``datasets`` (``sources``: Parquet,
CSV, a ``save_to_disk`` directory, a hub dataset). The format (``FORMATS``: ``zsre``, ``counterfact``,
``counterfact-rome``, the project's ``jsonl`` fields) is detected from the content when not given; a
field mapping (``fields``: ``--field prompt=question``) reads the user's own columns as the project's
fields. Records whose old or new target is empty, or unchanged, are dropped and counted per reason
(``DROP_REASONS``; errors with ``strict=True``). Every problem is raised together as one ``InputError``
naming the file, record (or line) and field: nothing is half-loaded. Field mappings, detection rules and
messages: ``data/README.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flearning.data.fields import FIELD_OPTION, check_columns, map_record, rename_problems, unused_columns
from flearning.data.formats import (
    FORMATS,
    PARSERS,
    ZSRE_OLD,
    Candidate,
    RecordContext,
    detect_record_format,
    json_type,
)
from flearning.data.records import KnowledgeRecord
from flearning.data.sources import EMPTY_TABLE, SPLIT_OPTION, Source, read_table, resolve_source
from flearning.errors import FlearnError, InputError, Problem

log = logging.getLogger(__name__)

# reason key -> human wording; the keys appear in ``LoadedDataset.dropped`` and in reports.
DROP_REASONS: dict[str, str] = {
    "empty_target_old": "the old target is empty",
    "empty_target_new": "the new target is empty",
    "target_new_equals_old": "the new target equals the old one",
}

JSONL_SUFFIXES = (".jsonl", ".ndjson")
# which targets a file holds: both, or one of a split pair (``--old FILE --new FILE``)
PARTS = ("both", "old", "new")


@dataclass(frozen=True)
class Location:
    """Where a record is: its file and its 0-based position in a JSON list or a table (``record N``) or
    its 1-based line in a JSON Lines file (``line N``), as problems name it."""

    source: str
    index: int
    kind: str = "record"

    def __str__(self) -> str:
        return f"{self.source}:{self.kind} {self.index}"


@dataclass(frozen=True)
class LoadedDataset:
    """The records of one file and how they were obtained.

    Attributes:
        records: kept records, in file order (at most ``limit`` of them).
        format: the format used (given or detected; ``jsonl``: the project's fields, also of a table or a
            mapped file).
        path: the file, directory or hub dataset as given.
        n_raw: number of records in the file (JSON list entries, non-blank JSONL lines, table rows).
        dropped: reason → count for records removed by the drop rules, over the whole file
            (only reasons that occurred).
        sha256: hex digest of the file's bytes (of the rows as JSON for a directory or a hub dataset).
        locations: where each kept record is in the file (parallel to ``records``).
        has_ids: every kept record has its own id (not its position).
        part: ``both``, or ``old``/``new`` for one file of a split pair (the other target is "").
        reader: ``json`` (a JSON list or JSON Lines), ``parquet``, ``csv``, ``disk`` (a ``save_to_disk``
            directory) or ``hub``.
        split: the split read (a ``DatasetDict`` directory or a hub dataset), else None.
        fields: the field mapping used (``{field: column}``), else None.
        unused_columns: columns of a table or mapped file that no field reads.
        zsre_old: the field a ZsRE file's old answers were read from (``pred`` or ``answers``); None
            for the other formats.
    """

    records: list[KnowledgeRecord]
    format: str
    path: Path
    n_raw: int
    dropped: dict[str, int]
    sha256: str
    locations: tuple[Location, ...] = ()
    has_ids: bool = False
    part: str = "both"
    reader: str = "json"
    split: str | None = None
    fields: dict[str, str] | None = None
    unused_columns: tuple[str, ...] = ()
    zsre_old: str | None = None

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())


def normalize_format(fmt: str, source: str) -> str:
    """Accept ``CounterFact_ROME``-style spellings of a format name; reject unknown names."""
    name = fmt.strip().lower().replace("_", "-")
    if name not in FORMATS:
        raise _file_error(source, f"unknown format '{fmt}' (known: {', '.join(FORMATS)})")
    return name


def _file_error(source: str, message: str) -> InputError:
    return InputError([Problem(source, None, None, message)], what="dataset")


def _read_text(path: Path, source: str) -> tuple[str, str]:
    """The file's text (UTF-8, an optional BOM removed) and the sha256 of its bytes."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _file_error(source, "no such file") from None
    except IsADirectoryError:
        raise _file_error(source, "is a directory, not a file") from None
    except PermissionError:
        raise _file_error(source, "permission denied") from None
    except OSError as ex:
        raise _file_error(source, f"cannot read the file: {ex.strerror or ex}") from None
    digest = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as ex:
        raise _file_error(source, f"not UTF-8 text (invalid byte at offset {ex.start})") from None
    if not text.strip():
        raise _file_error(source, "file is empty")
    return text, digest


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """Non-blank lines with 1-based numbers. Only ``\\n`` ends a line: JSON strings may legally hold
    U+2028 and friends, which ``str.splitlines`` would split on."""
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield number, line


def _first_line_object(text: str) -> dict[str, Any] | None:
    """The first non-blank line decoded as a JSON object, or None if it is not one on its own."""
    for _, line in _lines(text):
        try:
            value = json.loads(line)
        except (ValueError, RecursionError):
            return None
        return value if isinstance(value, dict) else None
    return None


def _decode_json(text: str, source: str) -> Any:
    """The whole file as one JSON document; a syntax error names its line and column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as ex:
        hint = ""
        if ex.msg == "Extra data" and _first_line_object(text) is not None:
            hint = (
                " (the file holds one JSON object per line: the project's own records belong in a .jsonl "
                "file; other formats need the records wrapped in one JSON list)"
            )
        raise _file_error(
            source, f"malformed JSON at line {ex.lineno}, column {ex.colno}: {ex.msg}{hint}"
        ) from None
    except RecursionError:
        raise _file_error(source, "malformed JSON: nested too deeply") from None
    except ValueError as ex:  # e.g. an integer literal beyond Python's digit limit
        raise _file_error(source, f"malformed JSON: {ex}") from None


def _decode_jsonl(text: str, source: str) -> tuple[list[tuple[int, Any]], list[Problem]]:
    """Every non-blank line decoded on its own.

    Returns:
        ``([(line number, value), ...], [problem per malformed line])``: the well-formed lines are
        still validated, so one report lists every problem in the file.
    """
    problems: list[Problem] = []
    values: list[tuple[int, Any]] = []
    for number, line in _lines(text):
        try:
            values.append((number, json.loads(line)))
        except json.JSONDecodeError as ex:
            problems.append(
                Problem(source, number, None, f"malformed JSON at column {ex.colno}: {ex.msg}", "line")
            )
        except RecursionError:
            problems.append(Problem(source, number, None, "malformed JSON: nested too deeply", "line"))
        except ValueError as ex:
            problems.append(Problem(source, number, None, f"malformed JSON: {ex}", "line"))
    return values, problems


def _looks_like_jsonl(path: Path, text: str) -> bool:
    if path.suffix.lower() in JSONL_SUFFIXES:
        return True
    if text.lstrip().startswith("{"):
        first = _first_line_object(text)
        return first is not None and "target_old" in first
    return False


def _detect_list_format(items: list[Any], source: str) -> str:
    """The format of a JSON list, judged from its first object's fields."""
    first = next((item for item in items if isinstance(item, dict)), None)
    if first is None:
        raise _file_error(source, "cannot detect the format: no record is a JSON object")
    fmt = detect_record_format(first)
    if fmt is None:
        index = items.index(first)
        fields = ", ".join(sorted(first)[:8]) or "none"
        hint = ""
        if "target_old" in first:
            hint = "; records with prompt/target_old/target_new go one per line in a .jsonl file"
        raise _file_error(
            source,
            f"cannot detect the format from the fields of record {index} ({fields}): expected zsre "
            "(src, answers, alt), counterfact (prompt, ground_truth, target_new) or counterfact-rome "
            f"(requested_rewrite){hint}",
        )
    return fmt


def _raw_items(
    path: Path, text: str, fmt: str | None, source: str
) -> tuple[str, str, list[tuple[int, Any]], list[Problem]]:
    """Decode the file and settle its format.

    Returns:
        ``(format, kind, [(index, raw value), ...], problems)`` where ``kind`` is ``"record"`` (index =
        0-based position in a JSON list) or ``"line"`` (index = 1-based line number), and ``problems``
        lists malformed JSON Lines lines (the other lines are still checked).
    """
    if fmt == "jsonl" or (fmt is None and _looks_like_jsonl(path, text)):
        if text.lstrip().startswith("["):
            raise _file_error(
                source,
                "expected JSON Lines (one object per line) but the file is a JSON list; "
                f"use one of the formats {', '.join(f for f in FORMATS if f != 'jsonl')}",
            )
        values, problems = _decode_jsonl(text, source)
        return "jsonl", "line", values, problems
    document = _decode_json(text, source)
    if not isinstance(document, list):
        raise _file_error(
            source, f"expected a JSON list of records at the top level, got {json_type(document)}"
        )
    if not document:
        raise _file_error(source, "the JSON list holds no records")
    if fmt is None:
        fmt = _detect_list_format(document, source)
    return fmt, "record", list(enumerate(document)), []


def _table_format(columns: tuple[str, ...], source: str) -> str:
    """The format of a table, judged from its columns: the project's fields when it has ``target_old``, or
    ``target_new`` and no ``ground_truth`` (the new file of a split pair); else as a JSON list's record."""
    keys = dict.fromkeys(columns)
    fmt = detect_record_format(keys)
    if fmt in (None, "counterfact") and (
        "target_old" in keys or ("target_new" in keys and "ground_truth" not in keys)
    ):
        return "jsonl"
    if fmt is None:
        raise _file_error(
            source,
            f"cannot detect the format from the columns ({', '.join(columns) or 'none'}): expected the "
            "project's fields (prompt, target_old, target_new), zsre (src, answers, alt), counterfact "
            "(prompt, ground_truth, target_new) or counterfact-rome (requested_rewrite); map your own "
            f"columns with {FIELD_OPTION} prompt=COLUMN,target_old=COLUMN,target_new=COLUMN",
        )
    return fmt


def _mapped_items(text: str, source: str) -> tuple[str, list[tuple[int, Any]], list[Problem]]:
    """A JSON list or JSON Lines file whose records are mapped (``fields``): a list when the text starts
    with ``[``, else one object per line. Returns ``(kind, [(index, raw value)], problems)``."""
    if text.lstrip().startswith("["):
        document = _decode_json(text, source)
        if not document:
            raise _file_error(source, "the JSON list holds no records")
        return "record", list(enumerate(document)), []
    values, problems = _decode_jsonl(text, source)
    return "line", values, problems


def _columns(items: list[tuple[int, Any]]) -> list[str]:
    """The fields of a JSON file's records, in order of first appearance."""
    return list(dict.fromkeys(key for _, raw in items if isinstance(raw, dict) for key in raw))


def _project_fields(
    items: list[tuple[int, Any]],
    columns: list[str] | tuple[str, ...],
    fields: Mapping[str, str] | None,
    source: str,
    part: str,
) -> tuple[list[tuple[int, Any]], tuple[str, ...]]:
    """Records of the project's fields read from a table or through a mapping: the mapping checked against
    the columns (every problem at once), each record mapped, the columns no field reads named once.

    Returns:
        ``([(index, mapped record)], unused columns)``.
    """
    if fields:
        problems = check_columns(fields, columns, source, part=part)
        if problems:
            raise InputError(problems, what="dataset")
    unused = tuple(unused_columns(fields, columns))
    if unused:
        log.warning(
            "%s: columns not read: %s (map one onto a field with %s FIELD=COLUMN)",
            source,
            ", ".join(unused),
            FIELD_OPTION,
        )
    mapped = [(index, map_record(raw, fields) if isinstance(raw, dict) else raw) for index, raw in items]
    return mapped, unused


def _drop_reason(candidate: Candidate, part: str = "both") -> tuple[str, str] | None:
    """``(reason, source field)`` if the record cannot be used as an update, else None. One file of a
    split pair is checked for its own target only; the pair is checked once joined (``data.joining``)."""
    if part in ("both", "old") and not candidate.target_old:
        return "empty_target_old", candidate.old_field
    if part in ("both", "new") and not candidate.target_new:
        return "empty_target_new", candidate.new_field
    if part == "both" and candidate.target_old == candidate.target_new:
        return "target_new_equals_old", candidate.new_field
    return None


def _to_record(candidate: Candidate, record_id: str) -> KnowledgeRecord:
    return KnowledgeRecord(
        id=record_id,
        prompt=candidate.prompt,
        target_old=candidate.target_old,
        target_new=candidate.target_new,
        subject=candidate.subject,
        rephrase_prompts=list(candidate.rephrase_prompts),
        locality=list(candidate.locality),
        portability=list(candidate.portability),
    )


def zsre_old_field(items: list[tuple[int, Any]], given: str | None) -> str:
    """The field a ZsRE file's old answers are read from: ``given``, else ``pred`` when every record has
    one (the F-Learning paper's choice), else ``answers`` (``answers[0]``)."""
    if given is not None:
        return given
    records = [raw for _, raw in items if isinstance(raw, dict)]
    return "pred" if records and all("pred" in raw for raw in records) else "answers"


def _convert(
    items: list[tuple[int, Any]],
    fmt: str,
    kind: str,
    source: str,
    *,
    strict: bool,
    part: str = "both",
    zsre_old: str = "answers",
) -> tuple[list[KnowledgeRecord], list[Location], bool, dict[str, int], list[Problem]]:
    """Parse every raw record, apply the id and drop rules, and collect the problems.

    Args:
        items: ``(index, raw value)`` pairs from ``_raw_items``.
        fmt: the format whose parser reads each record.
        kind: ``"record"`` or ``"line"`` (what ``index`` counts).
        source: the file name used in messages.
        strict: report droppable records as problems.
        part: ``both``, or the side of a split pair the file holds (``RecordContext.part``).
        zsre_old: the field a ZsRE record's old answer is read from (``RecordContext.zsre_old``).
    Returns:
        ``(kept records, their locations, whether every kept record has its own id, reason -> dropped
        count, problems)``.
    """
    parse = PARSERS[fmt]
    problems: list[Problem] = []
    kept: list[KnowledgeRecord] = []
    locations: list[Location] = []
    own_ids = True
    dropped: dict[str, int] = {}
    seen_ids: dict[str, int] = {}
    for position, (index, raw) in enumerate(items):
        ctx = RecordContext(source, index, kind, part=part, zsre_old=zsre_old)
        if not isinstance(raw, dict):
            ctx.add(None, f"expected an object, got {json_type(raw)}")
            problems += ctx.problems
            continue
        candidate = parse(ctx, raw)
        problems += ctx.problems
        if candidate is None:
            continue
        # Ids key per-record results downstream, so a clash would silently merge two records.
        record_id = candidate.id if candidate.id is not None else str(position)
        if record_id in seen_ids:
            first = seen_ids[record_id]
            problems.append(
                Problem(
                    source,
                    index,
                    candidate.id_field,
                    f"duplicate id '{record_id}' (first used by {kind} {first})",
                    kind,
                )
            )
            continue
        seen_ids[record_id] = index
        reason = _drop_reason(candidate, part)
        if reason is not None:
            key, field_name = reason
            if strict:
                problems.append(
                    Problem(source, index, field_name, f"{DROP_REASONS[key]} (strict mode rejects it)", kind)
                )
            dropped[key] = dropped.get(key, 0) + 1
            continue
        kept.append(_to_record(candidate, record_id))
        locations.append(Location(source, index, kind))
        own_ids = own_ids and candidate.id is not None
    return kept, locations, own_ids and bool(kept), dropped, problems


@dataclass
class _Read:
    """A dataset read and its format settled: ``items`` are ``(index, raw record)`` as the format's parser
    reads them (mapped to the project's fields for a mapping or a table of them), ``kind`` what ``index``
    counts, ``source`` how problems name the dataset, ``problems`` its malformed JSON Lines lines."""

    fmt: str
    kind: str
    source: str
    items: list[tuple[int, Any]]
    problems: list[Problem]
    sha256: str
    split: str | None = None
    unused: tuple[str, ...] = ()


def _read(
    found: Source, fmt: str | None, fields: Mapping[str, str] | None, split: str | None, part: str
) -> _Read:
    """Read the dataset (a JSON file, or a table through ``sources``) and settle its format."""
    source = str(found.path)
    if found.is_table:
        table = read_table(found, split)
        if not table.rows:
            raise _file_error(table.name, EMPTY_TABLE)
        items: list[tuple[int, Any]] = list(enumerate(table.rows))
        fmt = "jsonl" if fields else fmt or _table_format(table.columns, table.name)
        unused: tuple[str, ...] = ()
        if fmt == "jsonl":
            items, unused = _project_fields(items, table.columns, fields, table.name, part)
        return _Read(fmt, "record", table.name, items, [], table.sha256, table.split, unused)
    if split is not None:
        raise _file_error(
            source,
            f"{SPLIT_OPTION} {split}: a JSON file has no splits ({SPLIT_OPTION} picks a split of a datasets "
            "directory written from a DatasetDict, or of a hub dataset)",
        )
    text, digest = _read_text(found.path.expanduser(), source)
    if not fields:
        fmt, kind, items, problems = _raw_items(found.path, text, fmt, source)
        return _Read(fmt, kind, source, items, problems, digest)
    kind, items, problems = _mapped_items(text, source)
    items, unused = _project_fields(items, _columns(items), fields, source, part)
    return _Read("jsonl", kind, source, items, problems, digest, None, unused)


def load_dataset(
    path: str | os.PathLike[str],
    fmt: str | None = None,
    *,
    strict: bool = False,
    limit: int | None = None,
    part: str = "both",
    fields: Mapping[str, str] | None = None,
    split: str | None = None,
    zsre_old: str | None = None,
) -> LoadedDataset:
    """Read, validate and convert a dataset.

    Args:
        path: a .json list or .jsonl file, a .parquet or .csv file, a directory written by
            ``save_to_disk``, or a hub dataset (``hf:owner/name``; ``owner/name`` when nothing local is
            named ``owner``), loaded through the user's cache (``sources``).
        fmt: one of ``FORMATS``; detected from the content when None.
        strict: report records that the drop rules would remove as errors instead of dropping them.
        limit: keep at most this many records (the first ones kept, in file order). The whole file is
            still validated and ``dropped`` counts the whole file.
        part: ``both`` (every record holds both targets), or ``old``/``new``: the file is one of a split
            pair and holds that target (the other may be absent; ``data.joining`` joins the pair).
        fields: ``{field: column}``: read the user's columns as the project's fields (format ``jsonl``).
        split: the split of a ``DatasetDict`` directory or a hub dataset (default: its only split).
        zsre_old: where a ZsRE file's old answers come from: ``pred`` or ``answers`` (``answers[0]``);
            None: ``pred`` when every record has one, else ``answers``. Other formats ignore it.
    Returns:
        A ``LoadedDataset`` with at least one record.
    Raises:
        InputError: listing every problem (``FILE:record N:FIELD: message``; ``line N`` for JSONL).
        FlearnError: a hub dataset cannot be loaded (offline and not cached, unknown, ...).
    """
    found = resolve_source(path)
    path = found.path
    source = str(path)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise FlearnError(f"limit must be a positive integer, got {limit!r}")
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, not {part!r}")
    if zsre_old is not None and zsre_old not in ZSRE_OLD:
        raise FlearnError(f"zsre_old must be one of {', '.join(ZSRE_OLD)}, not {zsre_old!r}")
    if fmt is not None:
        fmt = normalize_format(fmt, source)
    fields = dict(fields) if fields else None
    if fields and fmt not in (None, "jsonl"):
        raise _file_error(
            source,
            f"{FIELD_OPTION} maps columns onto the project's fields (format jsonl); it cannot be combined "
            f"with --format {fmt}",
        )
    read = _read(found, fmt, fields, split, part)
    fmt, source, items, problems = read.fmt, read.source, read.items, read.problems

    old_field = zsre_old_field(items, zsre_old) if fmt == "zsre" else None
    kept, locations, has_ids, dropped, record_problems = _convert(
        items, fmt, read.kind, source, strict=strict, part=part, zsre_old=old_field or "answers"
    )
    # Malformed JSONL lines were found while decoding; merge them in file order (the sort is stable).
    problems += rename_problems(record_problems, fields)
    if problems:
        problems.sort(key=lambda p: -1 if p.record is None else p.record)
        raise InputError(problems, what="dataset")
    if not kept:
        details = ", ".join(f"{n} {key}" for key, n in sorted(dropped.items()))
        raise _file_error(source, f"no usable records: all {len(items)} were dropped ({details})")

    records = kept if limit is None else kept[:limit]
    locations = locations[: len(records)]
    if dropped:
        details = ", ".join(f"{n} {key}" for key, n in sorted(dropped.items()))
        log.info("%s: dropped %d of %d records (%s)", source, sum(dropped.values()), len(items), details)
    old_note = f", old answers from {old_field}" if old_field else ""
    log.info("%s: loaded %d records (format %s%s)", source, len(records), fmt, old_note)
    return LoadedDataset(
        records=records,
        format=fmt,
        path=path,
        n_raw=len(items),
        dropped=dict(sorted(dropped.items())),
        sha256=read.sha256,
        locations=tuple(locations),
        has_ids=has_ids,
        part=part,
        reader=found.kind,
        split=read.split,
        fields=fields,
        unused_columns=read.unused,
        zsre_old=old_field,
    )


def load_records(
    path: str | os.PathLike[str],
    fmt: str | None = None,
    *,
    strict: bool = False,
    limit: int | None = None,
    fields: Mapping[str, str] | None = None,
    split: str | None = None,
    zsre_old: str | None = None,
) -> list[KnowledgeRecord]:
    """The records of ``load_dataset`` with the same arguments."""
    return load_dataset(
        path, fmt, strict=strict, limit=limit, fields=fields, split=split, zsre_old=zsre_old
    ).records
