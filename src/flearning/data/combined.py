"""Several data files read as one dataset (the bench's ``--data zsre=DEV --data zsre=TRAIN``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flearning.data.loading import LoadedDataset, Location, load_dataset
from flearning.data.records import KnowledgeRecord
from flearning.errors import FlearnError


@dataclass(frozen=True)
class CombinedDataset:
    """Several files read as one dataset (``load_combined``): ``records`` and ``locations`` of every
    file in order; ``zsre_old`` the field ZsRE's old answers came from (None for other formats)."""

    records: list[KnowledgeRecord]
    locations: tuple[Location, ...]
    zsre_old: str | None
    parts: tuple[LoadedDataset, ...]


def load_combined(
    paths: Sequence[str | os.PathLike[str]],
    *,
    fields: Mapping[str, str] | None = None,
    split: str | None = None,
    zsre_old: str | None = None,
) -> CombinedDataset:
    """The records of several files as one dataset, file after file, each read by ``load_dataset`` with
    the same arguments (e.g. ZsRE's evaluation and training files). With more than one file each
    record's id becomes ``<file's position>/<id>``: ZsRE files number their records from 0 each, and ids
    key per-record results. One file: its records as they are.

    Raises:
        InputError, FlearnError: as ``load_dataset``, for the first file that has a problem; and a
            FlearnError when the files read ZsRE's old answers from different fields (set ``zsre_old``).
    """
    if not paths:
        raise FlearnError("no data file given")
    parts = tuple(load_dataset(path, fields=fields, split=split, zsre_old=zsre_old) for path in paths)
    olds = {part.zsre_old for part in parts if part.zsre_old is not None}
    if len(olds) > 1:
        found = "; ".join(f"{part.path}: {part.zsre_old}" for part in parts if part.zsre_old)
        raise FlearnError(
            f"the files of one dataset read ZsRE's old answers from different fields ({found}): set zsre_old "
            "(--zsre-old pred or answers) so that every file reads the same"
        )
    if len(parts) == 1:
        records = list(parts[0].records)
    else:
        records = [
            record.model_copy(update={"id": f"{k}/{record.id}"})
            for k, part in enumerate(parts)
            for record in part.records
        ]
    return CombinedDataset(
        records=records,
        locations=tuple(loc for part in parts for loc in part.locations),
        zsre_old=olds.pop() if olds else None,
        parts=parts,
    )
