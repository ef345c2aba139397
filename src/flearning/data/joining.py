"""The facts of one update: one file holding both targets (``--data``), or a split pair (``--old FILE --new
FILE``) joined record by record.

A split pair is joined by ``id`` when every record of both files has one, else by prompt. The old file gives
``target_old``; the new file gives ``target_new`` and the evaluation probes (rephrases, locality,
portability; the old file's where the new one has none), and the order. Every record without a partner,
and every prompt given twice when joining by prompt, is a problem naming its file and record; all problems
of both files are reported together. The drop rules run once more on the joined pairs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from flearning.data.loading import DROP_REASONS, LoadedDataset, Location, load_dataset
from flearning.data.records import KnowledgeRecord
from flearning.errors import FlearnError, InputError, Problem


@dataclass(frozen=True)
class UpdateData:
    """What ``flearn update`` trains and evaluates on.

    Attributes:
        old, new: the files as loaded (the same object for one file).
        records: the facts with both targets, in the new file's order (at most ``limit``).
        locations: where each record is (in the new file; parallel to ``records``).
        joined_by: None for one file, else ``"id"`` or ``"prompt"``.
        dropped: reason → count of joined pairs the drop rules removed (a split pair only).
    """

    old: LoadedDataset
    new: LoadedDataset
    records: list[KnowledgeRecord]
    locations: tuple[Location, ...]
    joined_by: str | None = None
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def old_pairs(self) -> list[tuple[str, str]]:
        return [r.old_pair for r in self.records]

    @property
    def new_pairs(self) -> list[tuple[str, str]]:
        return [r.new_pair for r in self.records]

    def with_records(self, records: Sequence[KnowledgeRecord]) -> UpdateData:
        """The same data with ``records`` changed in place (e.g. prompts cut to fit the context)."""
        if len(records) != len(self.records):
            raise ValueError("with_records keeps every record")
        return replace(self, records=list(records))


def load_update_data(
    old: str | os.PathLike[str],
    new: str | os.PathLike[str],
    fmt: str | None = None,
    *,
    strict: bool = False,
    limit: int | None = None,
    fields: Mapping[str, str] | None = None,
    split: str | None = None,
    zsre_old: str | None = None,
) -> UpdateData:
    """The facts of an update from one file (``old == new``) or a split pair, joined; ``fields`` and
    ``split`` and ``zsre_old`` (``loading.load_dataset``) apply to both files.

    Raises:
        InputError: every problem of both files and of the join (``FILE:line N:FIELD: what``).
    """
    if Path(old) == Path(new):
        dataset = load_dataset(
            old, fmt, strict=strict, limit=limit, fields=fields, split=split, zsre_old=zsre_old
        )
        return UpdateData(dataset, dataset, list(dataset.records), dataset.locations)
    loaded: dict[str, LoadedDataset] = {}
    problems: list[Problem] = []
    for part, path in (("old", old), ("new", new)):
        try:
            loaded[part] = load_dataset(
                path, fmt, strict=strict, part=part, fields=fields, split=split, zsre_old=zsre_old
            )
        except InputError as ex:
            problems += ex.problems
    if problems:
        raise InputError(problems, what="dataset")
    return join(loaded["old"], loaded["new"], strict=strict, limit=limit)


def _key(record: KnowledgeRecord, by: str) -> str:
    return record.id if by == "id" else record.prompt


def _index(dataset: LoadedDataset, by: str, problems: list[Problem]) -> dict[str, int]:
    """key → position of the record holding it; a prompt given twice is a problem (ids are unique)."""
    index: dict[str, int] = {}
    for i, (record, where) in enumerate(zip(dataset.records, dataset.locations, strict=True)):
        key = _key(record, by)
        if key in index:
            first = dataset.locations[index[key]]
            problems.append(
                Problem(
                    where.source,
                    where.index,
                    "prompt",
                    f"the same prompt as {first.kind} {first.index}: give both files ids to join them",
                    where.kind,
                )
            )
            continue
        index[key] = i
    return index


def _unmatched(where: Location, record: KnowledgeRecord, other: LoadedDataset, by: str) -> Problem:
    what = f"id '{record.id}'" if by == "id" else f"this prompt ({record.prompt!r})"
    return Problem(where.source, where.index, by, f"no record of {other.path} has {what}", where.kind)


def join(
    old: LoadedDataset, new: LoadedDataset, *, strict: bool = False, limit: int | None = None
) -> UpdateData:
    """Join a split pair (``load_dataset(..., part="old")`` and ``part="new"``) into records with both
    targets; see the module docstring for the rules.

    Raises:
        InputError: records without a partner, prompts given twice (joining by prompt), and with
            ``strict`` pairs the drop rules would remove.
    """
    by = "id" if old.has_ids and new.has_ids else "prompt"
    problems: list[Problem] = []
    old_index = _index(old, by, problems)
    new_index = _index(new, by, problems)
    for key, i in old_index.items():
        if key not in new_index:
            problems.append(_unmatched(old.locations[i], old.records[i], new, by))
    records: list[KnowledgeRecord] = []
    locations: list[Location] = []
    dropped: dict[str, int] = {}
    for key, i in new_index.items():
        record, where = new.records[i], new.locations[i]
        if key not in old_index:
            problems.append(_unmatched(where, record, old, by))
            continue
        partner = old.records[old_index[key]]
        if record.target_new == partner.target_old:
            if strict:
                message = f"{DROP_REASONS['target_new_equals_old']} (strict mode rejects it)"
                problems.append(Problem(where.source, where.index, "target_new", message, where.kind))
            dropped["target_new_equals_old"] = dropped.get("target_new_equals_old", 0) + 1
            continue
        records.append(
            record.model_copy(
                update={
                    "target_old": partner.target_old,
                    "subject": record.subject or partner.subject,
                    "rephrase_prompts": record.rephrase_prompts or partner.rephrase_prompts,
                    "locality": record.locality or partner.locality,
                    "portability": record.portability or partner.portability,
                }
            )
        )
        locations.append(where)
    if problems:
        first = old.locations[0].source if old.locations else str(old.path)  # with [split] for a split
        problems.sort(key=lambda p: (p.source != first, p.record if p.record is not None else -1))
        raise InputError(problems, what="dataset")
    if not records:
        raise FlearnError(
            f"no usable facts after joining {old.path} and {new.path}: every pair has the same old and new target"
        )
    if limit is not None:
        records, locations = records[:limit], locations[:limit]
    return UpdateData(old, new, records, tuple(locations), joined_by=by, dropped=dropped)
