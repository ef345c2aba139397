"""Safetensors files: reading headers and row blocks, writing fp32 shards, and refusing pickles.

A small floor that knows nothing of models or knowledge vectors (as mergekit's ``io/`` keeps its lazy
tensor loader and tensor writer apart from the merge math): ``open_checkpoint`` reads the headers of a
model directory (one ``model.safetensors`` or an index and shards), ``read_block`` reads a block of rows
through a fresh memory map, ``copy_range`` copies bytes inside the kernel and ``ShardWriter`` writes a
file sequentially. A pickle file (``.bin``, ``.pt``, ...) can run code when loaded, so it is refused,
never opened (``refuse_pickles``). Errors are ``SafetensorsError``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flearning.errors import FlearnError, format_names

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CHUNK_BYTES = 64 << 20  # fp32 bytes per block of rows; a handful of blocks is the working set
_COPY_BYTES = 64 << 20
_HEADER_LIMIT = 100 << 20  # safetensors' own limit
CONVERT_HINT = (
    ". Convert once in a trusted environment: model.save_pretrained(dir, safe_serialization=True), or "
    "safetensors.torch.save_file."
)

# safetensors dtype code -> (torch dtype name, bytes per element)
_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
_FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}
# Codes safetensors also reads (sub-byte or complex), whose sizes are not checked here.
_PACKED_DTYPES = {"F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "C64"}


class SafetensorsError(FlearnError):
    """A weights file that is missing, a pickle, or not valid safetensors."""


def pickle_files(directory: str | os.PathLike) -> list[str]:
    """The names of the pickle files in ``directory`` (sorted; empty if it is not a directory)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)


def refuse_pickles(
    path: str | os.PathLike, what: str, *, error: type[FlearnError] = SafetensorsError, hint: str = ""
) -> None:
    """Raise ``error`` if ``path`` is a pickle file or a directory holding pickle files.

    Call it where the safetensors file that is needed is missing, so the message names the pickles
    instead of only "not found". ``what`` starts the sentence ("weights are", "the adapter is"); ``hint``
    is appended (e.g. how to convert).
    """
    path = Path(path)
    names = [path.name] if path.is_file() and path.suffix in PICKLE_SUFFIXES else pickle_files(path)
    if names:
        raise error(
            f"{path}: {what} only in pickle format ({', '.join(names)}), refused: f-learning reads "
            f"safetensors only, because unpickling can run arbitrary code{hint}"
        )


@dataclass(frozen=True)
class TensorEntry:
    """One tensor in a safetensors file, as its header describes it."""

    name: str
    file: Path
    dtype: str  # safetensors code, e.g. "F32", "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_floating(self) -> bool:
        return self.dtype in _FLOATS

    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of the stored values (``SafetensorsError`` for a code torch lacks)."""
        import torch

        if self.dtype not in _DTYPES:
            raise SafetensorsError(
                f"{self.file.name}: {self.name} has dtype {self.dtype}, which is not supported"
            )
        return getattr(torch, _DTYPES[self.dtype][0])


@dataclass(frozen=True)
class ShardFile:
    """A safetensors file's header: the raw bytes (to copy verbatim) and its tensors in offset order."""

    path: Path
    header: bytes  # the 8-byte length and the JSON, exactly as in the file
    entries: tuple[TensorEntry, ...]
    metadata: dict[str, str]

    @property
    def size(self) -> int:
        return len(self.header) + sum(e.nbytes for e in self.entries)


def refuse_non_safetensors(path: str | os.PathLike, what: str = "weights file") -> None:
    """Refuse, by its name, a file that is not ``*.safetensors``: a pickle (``.bin``, ``.pt``, ...) with the
    reason, anything else as not safetensors (``SafetensorsError``, naming the file)."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise SafetensorsError(
            f"{path}: the {what} is a pickle ({path.suffix}), refused: f-learning reads safetensors only, "
            f"because unpickling can run arbitrary code{CONVERT_HINT}"
        )
    if path.suffix != ".safetensors":
        raise SafetensorsError(f"{path}: the {what} is not a .safetensors file, refused")


def _looks_like_pickle(head: bytes) -> bool:
    """Whether a file's first 9 bytes are a pickle's (protocol 2 to 5: ``\\x80`` and the protocol) or the
    zip archive ``torch.save`` writes around one, and not a safetensors file's (whose JSON header starts
    at byte 8, so a header length that happens to begin with ``\\x80`` is not mistaken for one)."""
    if head[8:9] == b"{":
        return False
    return head.startswith(b"PK\x03\x04") or (
        head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    )


def read_shard_header(path: str | os.PathLike) -> ShardFile:
    """Parse and check a safetensors file's header without reading the tensors: the one check every
    weights file passes before anything reads it (models, shards named by an index, vectors, adapters).

    Args:
        path: a ``.safetensors`` file.

    Returns:
        The header; ``SafetensorsError`` naming the file if it is not named ``*.safetensors`` (a pickle
        suffix says so), is a pickle or ``torch.save`` archive under that name, or is not complete, valid
        safetensors: a header that is cut off, not JSON or malformed, data offsets with holes or overlaps,
        sizes that do not match the shapes, a file shorter (truncated) or longer than the header says.
    """
    path = Path(path)
    refuse_non_safetensors(path)
    try:
        with open(path, "rb") as fh:
            raw_len = fh.read(8)
            size = os.fstat(fh.fileno()).st_size
            if _looks_like_pickle(raw_len + fh.read(1)):
                raise SafetensorsError(
                    f"{path}: a pickle (or torch.save archive) named .safetensors, refused: f-learning reads "
                    f"safetensors only, because unpickling can run arbitrary code{CONVERT_HINT}"
                )
            if len(raw_len) != 8:
                raise SafetensorsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            fh.seek(8)
            (length,) = struct.unpack("<Q", raw_len)
            if length > _HEADER_LIMIT:
                raise SafetensorsError(f"{path}: not a safetensors file (header length {length})")
            if 8 + length > size:
                raise SafetensorsError(
                    f"{path}: truncated: the file has {size} bytes and ends inside its {length}-byte header"
                )
            raw = fh.read(length)
    except OSError as ex:
        raise SafetensorsError(f"{path}: cannot read ({ex})") from ex
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as ex:
        raise SafetensorsError(f"{path}: not a safetensors file (header is not JSON: {ex})") from ex
    if len(raw) != length or not isinstance(header, dict):
        raise SafetensorsError(f"{path}: not a safetensors file (truncated or malformed header)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SafetensorsError(f"{path}: not a safetensors file (__metadata__ is not an object)")
    base = 8 + length
    entries: list[TensorEntry] = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = (
                info["dtype"],
                tuple(int(d) for d in info["shape"]),
                info["data_offsets"],
            )
            entry = TensorEntry(name, path, str(dtype), shape, base + int(begin), base + int(end))
        except (KeyError, TypeError, ValueError) as ex:
            raise SafetensorsError(f"{path}: {name}: malformed header entry ({ex!r})") from ex
        if entry.dtype not in _DTYPES and entry.dtype not in _PACKED_DTYPES:
            raise SafetensorsError(f"{path}: {name}: unknown dtype {entry.dtype!r}")
        itemsize = _DTYPES.get(entry.dtype, (None, None))[1]
        if itemsize is not None and entry.numel * itemsize != entry.nbytes:
            raise SafetensorsError(
                f"{path}: {name}: {entry.nbytes} bytes for shape {list(shape)} of {entry.dtype}"
            )
        entries.append(entry)
    entries.sort(key=lambda e: (e.start, e.end))
    position = base
    for entry in entries:
        if entry.start != position or entry.end < entry.start:
            raise SafetensorsError(f"{path}: {entry.name}: data offsets leave a hole or overlap")
        position = entry.end
    if position > size:
        raise SafetensorsError(
            f"{path}: truncated: the file has {size} bytes, its header describes {position}"
        )
    if position != size:
        raise SafetensorsError(f"{path}: the file has {size} bytes, its header describes {position}")
    return ShardFile(path, raw_len + raw, tuple(entries), dict(metadata))


@dataclass(frozen=True)
class Checkpoint:
    """A model directory's safetensors weights: one file or an index with shards."""

    root: Path
    shards: tuple[ShardFile, ...]
    index: dict[str, Any] | None  # the parsed index; None for a single model.safetensors

    @property
    def sharded(self) -> bool:
        return self.index is not None

    @property
    def entries(self) -> dict[str, TensorEntry]:
        """File tensor name → entry, shard by shard in offset order."""
        return {e.name: e for shard in self.shards for e in shard.entries}

    @property
    def total_bytes(self) -> int:
        return sum(shard.size for shard in self.shards)

    def weight_files(self) -> set[str]:
        names = {shard.path.name for shard in self.shards}
        return names | ({INDEX_FILE} if self.sharded else set())


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory with ``model.safetensors.index.json``."""
    return (Path(path) / INDEX_FILE).is_file()


def weights_file(root: Path) -> Path | None:
    """The file transformers reads a model directory's weights from: the one ``config.json`` names
    (``transformers_weights``), else ``model.safetensors``, else ``model.safetensors.index.json``; None if
    there is none. A name in ``config.json`` other than those two is refused (a pickle by its suffix), so
    the loader and the streamed reader always read the same, checked files."""
    named = None
    try:
        config = json.loads((root / "config.json").read_text())
        named = config.get("transformers_weights") if isinstance(config, dict) else None
    except (OSError, ValueError):
        pass  # no or a broken config.json: the model loader reports it
    if named is not None:
        where = f"{root / 'config.json'} names its weights file {named!r} (transformers_weights)"
        if named in (SINGLE_FILE, INDEX_FILE):
            if not (root / named).is_file():
                raise SafetensorsError(f"{where}, which is missing")
            return root / named
        if isinstance(named, str) and Path(named).suffix in PICKLE_SUFFIXES:
            raise SafetensorsError(
                f"{where}: {root / named} is a pickle, refused: f-learning reads safetensors only, because "
                f"unpickling can run arbitrary code{CONVERT_HINT}"
            )
        raise SafetensorsError(
            f"{where}, refused: f-learning reads {SINGLE_FILE} or {INDEX_FILE} (an existing one); rename "
            "the weights to one of these and remove the key"
        )
    for name in (SINGLE_FILE, INDEX_FILE):  # transformers' order
        if (root / name).is_file():
            return root / name
    return None


def _read_index(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """A safetensors index and its ``weight_map`` (tensor name → shard file name), checked as JSON."""
    try:
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise TypeError("weight_map is empty or not an object")
        bad = [f"{k}: {v!r}" for k, v in weight_map.items() if not isinstance(v, str)]
        if bad:
            raise TypeError(f"weight_map names no file for {', '.join(bad[:3])}")
    except (OSError, ValueError, KeyError, TypeError) as ex:
        raise SafetensorsError(f"{path}: not a safetensors index ({ex})") from ex
    return index, weight_map


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and check the headers of a model directory's safetensors weights (no tensor data).

    The weights are those transformers would load (``weights_file``); every file is checked by name and
    header (``read_shard_header``), the shards of an index each one, before anything reads a tensor.

    Args:
        path: a directory with ``model.safetensors`` or ``model.safetensors.index.json`` + shards.

    Returns:
        The checkpoint; ``SafetensorsError`` naming the file for a missing, pickled, truncated, corrupt
        or inconsistent one.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise SafetensorsError(f"no such model directory: {root}")
    weights = weights_file(root)
    if weights is None:
        refuse_pickles(root, "weights are", hint=CONVERT_HINT)
        raise SafetensorsError(f"{root}: no {SINGLE_FILE} or {INDEX_FILE}")
    if weights.name == SINGLE_FILE:
        return Checkpoint(root, (read_shard_header(weights),), None)
    index, weight_map = _read_index(weights)
    files = sorted(set(weight_map.values()))
    outside = [f for f in files if "/" in f or "\\" in f]
    if outside:
        raise SafetensorsError(f"{weights}: refusing shard names outside the directory {outside}")
    for name in files:  # every file the index names: a pickle is refused by its name, never opened
        refuse_non_safetensors(root / name, f"shard named in {weights.name}")
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise SafetensorsError(f"{root}: shards named in {weights.name} are missing: {', '.join(missing)}")
    shards = tuple(read_shard_header(root / f) for f in files)
    problems: list[str] = []
    seen: set[str] = set()
    for shard in shards:
        for entry in shard.entries:
            if weight_map.get(entry.name) != shard.path.name:
                problems.append(
                    f"{entry.name}: in {shard.path.name}, the index says {weight_map.get(entry.name)}"
                )
            seen.add(entry.name)
    problems += [f"{k}: in the index, in no shard" for k in weight_map if k not in seen]
    if problems:
        raise SafetensorsError(f"{root}: index and shards disagree:" + format_names(problems))
    return Checkpoint(root, shards, index)


def _safe_open(path: Path):
    """One memory-mapped handle (the single place files are opened for tensor data; tests count them)."""
    from safetensors import safe_open

    return safe_open(str(path), framework="pt")


def row_blocks(shape: tuple[int, ...], chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, int] | None]:
    """Split dimension 0 into blocks of about ``chunk_bytes`` fp32 bytes.

    Args:
        shape: the tensor's shape.
        chunk_bytes: target block size (at least one row per block).

    Returns:
        An iterator of (start, stop) row ranges; one ``None`` for a 0-dim tensor, nothing if empty.
    """
    if not shape:
        yield None
        return
    rows = shape[0]
    row_bytes = 4 * math.prod(shape[1:])
    if rows == 0 or row_bytes == 0:
        return
    per = max(1, chunk_bytes // row_bytes)
    for start in range(0, rows, per):
        yield start, min(rows, start + per)


def read_block(entry: TensorEntry, block: tuple[int, int] | None) -> torch.Tensor:
    """Rows ``block`` of a stored tensor (the whole tensor for ``None``), through a fresh mmap handle.

    Args:
        entry: the tensor.
        block: (start, stop) rows, or ``None``.

    Returns:
        The rows in the stored dtype.
    """
    try:
        with _safe_open(entry.file) as fh:
            if block is None:
                return fh.get_tensor(entry.name)
            return fh.get_slice(entry.name)[block[0] : block[1]]
    except SafetensorsError:
        raise
    except Exception as ex:  # SafetensorError has no public base class
        raise SafetensorsError(f"{entry.file}: cannot read {entry.name} ({ex})") from ex


def copy_range(src: int, dst: int, offset: int, count: int) -> None:
    """Append ``count`` bytes of ``src`` from ``offset`` to ``dst``, inside the kernel where possible."""
    copy = getattr(os, "copy_file_range", None)
    while count > 0:
        done = 0
        if copy is not None:
            try:
                done = copy(src, dst, min(count, 1 << 30), offset)
            except OSError:
                copy = None
        if copy is None:
            data = os.pread(src, min(count, _COPY_BYTES), offset)
            done = os.write(dst, data)
        if done <= 0:
            raise SafetensorsError(f"short read while copying {count} bytes at offset {offset}")
        offset += done
        count -= done


def tensor_bytes(tensor: torch.Tensor):
    """A zero-copy byte view of a tensor (numpy has no bf16, so go through uint8)."""
    import torch

    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


def write_all(fh, data) -> None:
    """Write all of ``data`` (a buffer) to the unbuffered file ``fh``."""
    view = memoryview(data).cast("B")
    while view:
        n = fh.write(view)
        view = view[n:]


class ShardWriter:
    """Write a safetensors file of fp32 tensors sequentially, dropping some after the fact.

    The header is reserved at its largest (every planned tensor) and rewritten at the end, padded with
    spaces (valid JSON, and what safetensors itself pads with); a tensor found to be all zero is cut off
    again with ``truncate``. So each tensor is computed once and written once.
    """

    def __init__(
        self, path: Path, planned: list[tuple[str, tuple[int, ...]]], metadata: dict[str, str] | None = None
    ) -> None:
        self.path = path
        self.metadata = dict(metadata or {})
        self.reserved = len(self._header(self._layout(planned)))
        self.reserved += -self.reserved % 8
        self.fh = open(path, "wb", buffering=0)  # noqa: SIM115 - closed by finish() or abort()
        self.fh.seek(8 + self.reserved)
        self.kept: list[tuple[str, tuple[int, ...]]] = []
        self._start = 0

    def _layout(self, tensors: list[tuple[str, tuple[int, ...]]]) -> dict[str, Any]:
        layout: dict[str, Any] = {"__metadata__": self.metadata} if self.metadata else {}
        offset = 0
        for name, shape in tensors:
            size = 4 * math.prod(shape)
            layout[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        return layout

    @staticmethod
    def _header(layout: dict[str, Any]) -> bytes:
        return json.dumps(layout, separators=(",", ":")).encode()

    def begin(self) -> None:
        """Start a tensor: ``write`` its row blocks in order, then ``end`` it."""
        self._start = self.fh.tell()

    def write(self, tensor: torch.Tensor) -> None:
        write_all(self.fh, tensor_bytes(tensor))

    def end(self, name: str, shape: tuple[int, ...], keep: bool) -> None:
        """Finish the tensor begun last: keep it, or cut its bytes off again."""
        if keep:
            self.kept.append((name, shape))
        else:
            self.fh.seek(self._start)
            self.fh.truncate()

    def finish(self) -> None:
        header = self._header(self._layout(self.kept))
        header += b" " * (self.reserved - len(header))
        self.fh.seek(0)
        self.fh.write(struct.pack("<Q", len(header)) + header)
        self.fh.close()

    def abort(self) -> None:
        self.fh.close()
