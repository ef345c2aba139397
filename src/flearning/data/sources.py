"""Where a dataset comes from: a JSON or JSON Lines file (read by ``loading``'s own readers), or a table
read through the ``datasets`` library: a Parquet or CSV file, a directory written by ``save_to_disk``
(a ``Dataset`` or a ``DatasetDict``) or a hub dataset (``hf:owner/name``, or ``owner/name`` when nothing
local is named ``owner``), which loads through the user's own cache and respects ``HF_HUB_OFFLINE`` /
``HF_DATASETS_OFFLINE``.

A table becomes rows of plain values (a null cell is an absent field). Of a ``DatasetDict`` or a hub
dataset, ``split`` picks the split, else its only one. ``datasets`` is imported only when a table is read.
The rules and messages: ``data/README.md``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flearning.errors import FlearnError, InputError, Problem
from flearning.models.loading import HUB_PREFIX

# file suffix -> the datasets builder that reads it; any other file goes to the JSON readers
TABLE_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "csv"}
DATA_SUFFIXES = (*TABLE_SUFFIXES, ".json", ".jsonl", ".ndjson")
# what save_to_disk writes: dataset_dict.json for a DatasetDict, state.json for a Dataset
DISK_MARKERS = ("dataset_dict.json", "state.json")
SPLIT_OPTION = "--split"
EMPTY_TABLE = "the table holds no records"
# a hub repository id as huggingface_hub validates it: [org/]name of word characters, '-' and '.'
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class Source:
    """A dataset as given: ``kind`` is ``json`` (a JSON list or JSON Lines file), ``parquet``, ``csv``,
    ``disk`` (a ``save_to_disk`` directory) or ``hub``; ``path`` as given (``hf:owner/name`` for a hub
    dataset, whose id is ``hub_id``)."""

    kind: str
    path: Path
    hub_id: str | None = None

    @property
    def is_table(self) -> bool:
        return self.kind != "json"


@dataclass(frozen=True)
class Table:
    """The rows of a table source. ``name`` is how problems name it (the path, with ``[split]`` for a
    split); ``sha256`` is of the file's bytes (Parquet, CSV) or of the rows as JSON (a directory, a hub
    dataset)."""

    rows: list[dict[str, Any]]
    columns: tuple[str, ...]
    name: str
    sha256: str
    split: str | None = None


def file_error(source: str, message: str) -> InputError:
    return InputError([Problem(source, None, None, message)], what="dataset")


def _hub_id(text: str, given: str) -> str:
    if not _HUB_ID.match(text) or ".." in text or "--" in text or len(text) > 96:
        raise FlearnError(f"'{given}' is not a hub dataset id (owner/name of letters, digits, '-', '_', '.')")
    return text


def _is_hub_id(text: str) -> bool:
    """Whether a ``--data`` naming nothing local means a hub dataset: ``owner/name`` written as no path
    is (not starting with ``/``, ``.`` or ``~``, no data file suffix) and whose ``owner`` is nothing
    local; anything else is a mistyped path ("no such file", never a hub lookup)."""
    if text.startswith(("/", ".", "~")) or "\\" in text or not _HUB_ID.match(text):
        return False
    if text.lower().endswith(DATA_SUFFIXES):
        return False
    return not Path(text.partition("/")[0]).exists()


def resolve_source(spec: str | os.PathLike[str]) -> Source:
    """What ``spec`` names (nothing is read yet).

    Raises:
        InputError: a directory that ``save_to_disk`` did not write.
        FlearnError: ``hf:`` followed by no valid id.
    """
    text = str(spec)
    if text.startswith(HUB_PREFIX):
        return Source("hub", Path(text), _hub_id(text.removeprefix(HUB_PREFIX), text))
    path = Path(spec).expanduser()
    if path.is_dir():
        if any((path / marker).is_file() for marker in DISK_MARKERS):
            return Source("disk", Path(spec))
        raise file_error(
            text,
            "is a directory, not a file (a datasets directory, written by save_to_disk, holds "
            f"{' or '.join(DISK_MARKERS)})",
        )
    if not os.path.lexists(path) and _is_hub_id(text):
        return Source("hub", Path(text), text)
    return Source(TABLE_SUFFIXES.get(path.suffix.lower(), "json"), Path(spec))


# --------------------------------------------------------------------------------------------------
# Reading through ``datasets``.


def _datasets() -> Any:
    import datasets

    return datasets


@contextmanager
def _no_progress_bars(datasets: Any) -> Iterator[None]:
    """``datasets`` draws a progress bar per split it prepares; a dataset of facts loads in an instant."""
    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            datasets.enable_progress_bars()


def _reason(ex: BaseException) -> str:
    text = str(ex).strip().splitlines()
    return text[0] if text else type(ex).__name__


def _drop_nulls(value: Any) -> Any:
    """A table's null cells (and the null members Arrow gives a struct that lacks them) as absent."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _rows(dataset: Any) -> list[dict[str, Any]]:
    # with_format(None): plain Python values whatever format the dataset was saved with (numpy, torch)
    return [_drop_nulls(row) for row in dataset.with_format(None).to_list()]


def _rows_digest(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    text = json.dumps({"columns": columns, "rows": rows}, sort_keys=True, ensure_ascii=False, default=repr)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _file_digest(path: Path, name: str) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        raise file_error(name, "no such file") from None
    except PermissionError:
        raise file_error(name, "permission denied") from None
    except OSError as ex:
        raise file_error(name, f"cannot read the file: {ex.strerror or ex}") from None
    return digest.hexdigest()


def _no_split(source: Source, split: str | None, what: str) -> None:
    if split is not None:
        raise file_error(
            str(source.path),
            f"{SPLIT_OPTION} {split}: {what} has no splits ({SPLIT_OPTION} picks a split of a datasets "
            "directory written from a DatasetDict, or of a hub dataset)",
        )


def _csv_options(path: Path, name: str) -> dict[str, Any]:
    """Every CSV column read as text, empty cells as "" (pandas would turn ``1990`` into a number and
    ``NA`` or an empty cell into a null)."""
    datasets = _datasets()
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            first_row = next(reader, None)
    except UnicodeDecodeError as ex:
        raise file_error(name, f"not UTF-8 text (invalid byte at offset {ex.start})") from None
    except csv.Error as ex:
        raise file_error(name, f"malformed CSV: {ex}") from None
    if not header or not any(c.strip() for c in header):
        raise file_error(name, "file is empty (no header line naming the columns)")
    twice = sorted({c for c in header if header.count(c) > 1})
    if twice:
        raise file_error(name, f"the header names the columns {', '.join(twice)} more than once")
    if first_row is None:
        raise file_error(name, EMPTY_TABLE)
    features = datasets.Features({column: datasets.Value("string") for column in header})
    return {"features": features, "na_filter": False, "sep": delimiter, "encoding": "utf-8-sig"}


def _check_parquet(path: Path, name: str) -> None:
    """A Parquet file's footer read by pyarrow first: a damaged or empty file is named plainly (``datasets``
    would log its own error and then fail on "no data")."""
    import pyarrow.parquet as pq

    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as ex:  # ArrowInvalid, OSError: not a Parquet file, cut short
        raise file_error(name, f"cannot read the file as PARQUET: {_reason(ex)}") from None
    if rows == 0:
        raise file_error(name, EMPTY_TABLE)


def _read_file(source: Source, split: str | None) -> Table:
    """A Parquet or CSV file through ``datasets.load_dataset``, prepared in a temporary cache (the
    user's datasets cache is left alone) and held in memory."""
    name = str(source.path)
    path = source.path.expanduser()
    _no_split(source, split, f"a {source.kind} file")
    digest = _file_digest(path, name)
    options = _csv_options(path, name) if source.kind == "csv" else {}
    if source.kind == "parquet":
        _check_parquet(path, name)
    datasets = _datasets()
    with tempfile.TemporaryDirectory(prefix="flearn-datasets-") as cache, _no_progress_bars(datasets):
        try:
            dataset = datasets.load_dataset(
                source.kind,
                data_files=str(path.resolve()),
                split="train",
                cache_dir=cache,
                keep_in_memory=True,
                **options,
            )
        except Exception as ex:  # the library's errors vary by reader and version (Arrow, pandas, OS)
            raise file_error(name, f"cannot read the file as {source.kind.upper()}: {_reason(ex)}") from None
    columns = tuple(dataset.column_names)
    return Table(_rows(dataset), columns, name, digest)


def _pick_split(splits: dict[str, Any], split: str | None, name: str) -> tuple[Any, str]:
    """The split named ``split``, else the only one; several and none named is an error listing them."""
    names = list(splits)
    if split is None:
        if len(names) == 1:
            return splits[names[0]], names[0]
        raise file_error(
            name, f"holds the splits {', '.join(names)}: choose one with {SPLIT_OPTION} NAME (split: NAME)"
        )
    if split not in splits:
        raise file_error(name, f"has no split '{split}' (its splits: {', '.join(names) or 'none'})")
    return splits[split], split


def _read_disk(source: Source, split: str | None) -> Table:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    name = str(source.path)
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(source.path.expanduser()))
    except Exception as ex:  # a damaged directory: missing or unreadable Arrow files, bad JSON
        raise file_error(name, f"cannot read the datasets directory: {_reason(ex)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        dataset, split = _pick_split(dict(loaded), split, name)
        name = f"{name}[{split}]"
    else:
        _no_split(source, split, "a directory of one Dataset (not a DatasetDict)")
        dataset = loaded
    columns = tuple(dataset.column_names)
    rows = _rows(dataset)
    return Table(rows, columns, name, _rows_digest(rows, columns), split)


def _hub_message(source: Source, ex: BaseException) -> str:
    datasets = _datasets()
    given = str(source.path)
    offline = bool(datasets.config.HF_HUB_OFFLINE)
    if offline and isinstance(ex, (ConnectionError, FileNotFoundError)):
        return (
            f"hub dataset {given}: not in the local cache ({datasets.config.HF_DATASETS_CACHE}) and offline "
            f"mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): load it once with network access, or give "
            f"a local file ({_reason(ex)})"
        )
    hint = ""
    if isinstance(ex, ConnectionError):
        hint = "; without network access, HF_HUB_OFFLINE=1 reads the local cache only"
    return f"hub dataset {given}: cannot be loaded ({type(ex).__name__}: {_reason(ex)}){hint}"


def _read_hub(source: Source, split: str | None) -> Table:
    """A hub dataset through ``datasets.load_dataset`` and the user's cache (``hf://datasets/``: never a
    local directory of the same name)."""
    datasets = _datasets()
    with _no_progress_bars(datasets):
        try:
            loaded = datasets.load_dataset(f"hf://datasets/{source.hub_id}", split=split)
        except Exception as ex:  # network, cache, auth, unknown split or config: said in one message
            raise FlearnError(_hub_message(source, ex)) from None
    name = str(source.path)
    if isinstance(loaded, datasets.DatasetDict):
        loaded, split = _pick_split(dict(loaded), None, name)
    if split is not None:
        name = f"{name}[{split}]"
    columns = tuple(loaded.column_names)
    rows = _rows(loaded)
    return Table(rows, columns, name, _rows_digest(rows, columns), split)


def read_table(source: Source, split: str | None = None) -> Table:
    """The rows of a table source (``Source.is_table``).

    Raises:
        InputError: the file or directory cannot be read, or ``split`` does not fit it.
        FlearnError: a hub dataset cannot be loaded (offline and not cached, unknown, ...).
    """
    if source.kind in ("parquet", "csv"):
        return _read_file(source, split)
    if source.kind == "disk":
        return _read_disk(source, split)
    if source.kind == "hub":
        return _read_hub(source, split)
    raise ValueError(f"not a table source: {source.kind}")
