"""Knowledge vectors on disk: ``vector.safetensors`` (the tensors) + ``vector.json`` (what they are).

The JSON records the metadata, every key with its shape, and the sha256 of the safetensors file; loading
checks all three against the tensors, so a truncated, edited or mismatched pair is an error and not a
silently different model. Loading never unpickles: a ``.bin``/``.pt`` file can run arbitrary code.

Big vectors (written by ``vectors.streaming`` from a sharded checkpoint) are sharded the same way:
``vector-00001-of-0000n.safetensors`` ... with ``format_version`` 2, whose ``vector.json`` has ``shards``
(file name → sha256) and ``weight_map`` (tensor name → file name) instead of ``safetensors_sha256``.
Shard i holds the deltas of the tensors in the model's shard i, so streaming reads and writes map 1:1.
A vector written from a model (``KnowledgeVector.save_sharded``, ``flearn update`` with ``vector_files:
sharded``) has the same format with one shard per decoder block and one for the other tensors
(``save_sharded_vector``): under FSDP2 each is gathered onto the main process, written, and let go.

Directories are written atomically: into a temporary directory beside the target, renamed into place, so
a crash leaves either the old directory or the complete new one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flearning.io.atomic import atomic_directory
from flearning.io.safetensors import (
    SafetensorsError,
    read_shard_header,
    refuse_non_safetensors,
    refuse_pickles,
)
from flearning.vectors.ops import VectorError, format_names

if TYPE_CHECKING:
    import torch

TENSORS_FILE = "vector.safetensors"
META_FILE = "vector.json"
FORMAT = "flearning.knowledge_vector"
FORMAT_VERSION = 1
SHARDED_FORMAT_VERSION = 2
SHARD_PREFIX = "vector-"


def shard_file_name(index: int, count: int) -> str:
    """``vector-00001-of-00003.safetensors`` for the first of three shards (1-based, like transformers).

    Args:
        index: 1-based shard number.
        count: number of shards.

    Returns:
        The file name.
    """
    return f"{SHARD_PREFIX}{index:05d}-of-{count:05d}.safetensors"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks.

    Args:
        path: the file.
        chunk: bytes per read.

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_vector(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a vector directory atomically.

    Args:
        tensors: name → fp32 CPU tensor.
        metadata: JSON-serialisable metadata.
        path: the directory to create.
        overwrite: replace an earlier knowledge vector there (``io.output``'s rule: never anything else).

    Returns:
        The directory path.
    """
    from safetensors.torch import save_file

    target = Path(path).expanduser()
    with atomic_directory(target, overwrite=overwrite, kind="vector", error=VectorError) as tmp:
        save_file(
            {k: t.contiguous() for k, t in tensors.items()},
            str(tmp / TENSORS_FILE),
            metadata={"format": FORMAT},
        )
        shapes = {k: tuple(t.shape) for k, t in tensors.items()}
        record = vector_record(metadata, shapes, sha256=sha256_file(tmp / TENSORS_FILE))
        (tmp / META_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return target


def vector_record(
    metadata: dict[str, Any],
    shapes: Mapping[str, Sequence[int]],
    *,
    sha256: str | None = None,
    shards: Mapping[str, str] | None = None,
    weight_map: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The ``vector.json`` record of a vector directory: one file (``sha256`` of ``vector.safetensors``,
    format 1) or sharded (``shards``: file → sha256 and ``weight_map``: tensor → file, format 2).

    Args:
        metadata: JSON-serialisable metadata.
        shapes: tensor name → shape, in the order the record lists them (all fp32).
        sha256: the one file's sha256 (format 1).
        shards: the shard files' sha256, in shard order (format 2, with ``weight_map``).
        weight_map: tensor name → its shard file (format 2).

    Returns:
        The record, ready for ``json.dumps``.
    """
    if (sha256 is None) == (shards is None) or (shards is None) != (weight_map is None):
        raise ValueError("give sha256 (one file) or shards and weight_map (sharded)")
    record: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if sha256 is not None else SHARDED_FORMAT_VERSION,
        "metadata": metadata,
        "tensors": {k: {"shape": list(shape), "dtype": "float32"} for k, shape in shapes.items()},
        "num_params": sum(math.prod(shape) for shape in shapes.values()),
    }
    if sha256 is not None:
        record["safetensors_sha256"] = sha256
    else:
        record["shards"] = dict(shards or {})
        record["weight_map"] = {k: (weight_map or {})[k] for k in shapes}
    return record


_BLOCK = re.compile(r"^(.*?\.\d+)\.")  # "model.layers.3." of "model.layers.3.mlp.up_proj.weight"


def block_groups(names: Iterable[str]) -> list[list[str]]:
    """The tensors of each shard of a vector written a group at a time (``save_sharded_vector``): one
    group per decoder block (the names up to their first numeric part, ``model.layers.3``) and one for
    the others (embeddings, final norm, head), in the order the names first appear.

    Args:
        names: tensor names, in parameter order.

    Returns:
        The groups, each a list of names in the given order.
    """
    groups: dict[str, list[str]] = {}
    for name in names:
        match = _BLOCK.match(name)
        groups.setdefault(match.group(1) if match else "", []).append(name)
    return list(groups.values())


def save_sharded_vector(
    groups: Iterable[Mapping[str, torch.Tensor]],
    metadata: dict[str, Any] | Callable[[], dict[str, Any]],
    path: str | os.PathLike,
    *,
    order: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a vector directory in the sharded format (format 2), one shard per group, as the groups come.

    Only one group is held at a time (the caller yields the next once the last is written), so a vector
    gathered a block at a time from FSDP2 shards is never whole in memory. The layout is the one
    ``vectors.streaming`` writes (``vector-0000i-of-0000n.safetensors``, each shard's sha256, a
    ``weight_map``); an empty group writes no shard. Written atomically like ``save_vector``.

    Args:
        groups: name → fp32 CPU tensor, one mapping per shard.
        metadata: JSON-serialisable metadata, or a function giving it once every group is written (when
            it depends on them, e.g. the tensors dropped as zero).
        path: the directory to create.
        order: the order of the tensors in ``vector.json`` (default: as written); it is the order
            ``load_vector`` returns them in.
        overwrite: replace an earlier knowledge vector there (``io.output``'s rule).

    Returns:
        The directory path.
    """
    from safetensors.torch import save_file

    target = Path(path).expanduser()
    with atomic_directory(target, overwrite=overwrite, kind="vector", error=VectorError) as tmp:
        parts: list[tuple[Path, list[str]]] = []
        shapes: dict[str, tuple[int, ...]] = {}
        for group in groups:
            if group:
                part = tmp / f"part-{len(parts)}.tmp"
                save_file(
                    {k: t.contiguous() for k, t in group.items()}, str(part), metadata={"format": FORMAT}
                )
                parts.append((part, list(group)))
                shapes.update((k, tuple(t.shape)) for k, t in group.items())
            del group  # before the next group is made
        meta = metadata() if callable(metadata) else metadata
        if not parts:
            raise VectorError("a knowledge vector needs at least one tensor")
        shards: dict[str, str] = {}
        weight_map: dict[str, str] = {}
        for i, (part, names) in enumerate(parts, start=1):
            name = shard_file_name(i, len(parts))
            part.rename(tmp / name)
            shards[name] = sha256_file(tmp / name)
            weight_map.update(dict.fromkeys(names, name))
        ordered = [k for k in order if k in shapes] if order is not None else list(shapes)
        if len(ordered) != len(shapes):
            raise ValueError(f"order lists {len(ordered)} of the {len(shapes)} tensors written")
        record = vector_record(meta, {k: shapes[k] for k in ordered}, shards=shards, weight_map=weight_map)
        (tmp / META_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return target


def _refuse_pickle(path: Path) -> None:
    if path.is_dir() and ((path / TENSORS_FILE).is_file() or (path / META_FILE).is_file()):
        return
    refuse_pickles(path, "the knowledge vector is", error=VectorError)


def read_record(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """Read and check ``vector.json`` of a vector directory (the tensors are not read).

    Args:
        path: the vector directory (or its ``vector.json`` / ``vector.safetensors`` / one of its shards).

    Returns:
        (the directory, the parsed JSON record).
    """
    path = Path(path).expanduser()
    _refuse_pickle(path)
    if path.is_file() and (path.name in (TENSORS_FILE, META_FILE) or path.name.startswith(SHARD_PREFIX)):
        path = path.parent
    if not path.is_dir():
        raise VectorError(f"{path}: no such knowledge-vector directory")
    if not (path / META_FILE).is_file():
        raise VectorError(f"{path}: not a knowledge-vector directory (no {META_FILE})")
    try:
        record = json.loads((path / META_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as ex:
        raise VectorError(f"{path / META_FILE}: not valid JSON ({ex})") from ex
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise VectorError(f"{path / META_FILE}: not a knowledge-vector description (format != {FORMAT})")
    version = record.get("format_version")
    if version not in (FORMAT_VERSION, SHARDED_FORMAT_VERSION):
        raise VectorError(
            f"{path / META_FILE}: format version {version!r}; this f-learning reads versions "
            f"{FORMAT_VERSION} (one file) and {SHARDED_FORMAT_VERSION} (sharded)"
        )
    fields: tuple[tuple[str, type], ...] = (("metadata", dict), ("tensors", dict))
    if version == FORMAT_VERSION:
        fields += (("safetensors_sha256", str),)
    else:
        fields += (("shards", dict), ("weight_map", dict))
    for field, kind in fields:
        if not isinstance(record.get(field), kind):
            raise VectorError(f"{path / META_FILE}: field '{field}' missing or not a {kind.__name__}")
    for name in tensor_files(path, record):
        if not (path / name).is_file():
            raise VectorError(f"{path}: not a knowledge-vector directory (no {name})")
    return path, record


def tensor_files(path: Path, record: dict[str, Any]) -> dict[str, str]:
    """The safetensors files of a vector directory with their recorded sha256.

    Args:
        path: the vector directory.
        record: its parsed ``vector.json`` (as returned by ``read_record``).

    Returns:
        file name → hex sha256, in shard order.
    """
    if record.get("format_version") == FORMAT_VERSION:
        return {TENSORS_FILE: record["safetensors_sha256"]}
    shards = record["shards"]
    problems = [
        f"{name!r}: not a shard file name of the form {SHARD_PREFIX}NNNNN-of-NNNNN.safetensors"
        for name in shards
        if not (isinstance(name, str) and name.startswith(SHARD_PREFIX) and "/" not in name)
    ]
    for name in shards:  # a pickle (.bin) or another file is refused by its name, never opened
        try:
            refuse_non_safetensors(path / str(name), "vector shard")
        except SafetensorsError as ex:
            problems.append(str(ex))
    problems += [
        f"{name}: sha256 is not a string" for name, sha in shards.items() if not isinstance(sha, str)
    ]
    problems += [
        f"{key}: weight_map names {file!r}, which is not in 'shards'"
        for key, file in record["weight_map"].items()
        if file not in shards
    ]
    if set(record["weight_map"]) != set(record["tensors"]):
        problems.append("weight_map and tensors list different tensor names")
    if problems:
        raise VectorError(f"{path / META_FILE}: broken shard description:" + format_names(problems))
    return dict(shards)


def verify_checksum(path: Path, name: str, expected: str) -> None:
    """Raise ``VectorError`` unless ``path/name`` has the recorded sha256.

    Args:
        path: the vector directory.
        name: a tensor file in it.
        expected: the hex sha256 recorded in ``vector.json``.

    Returns:
        None.
    """
    tensors_file = path / name
    actual = sha256_file(tensors_file)
    if actual != expected:
        raise VectorError(
            f"{tensors_file}: checksum mismatch (sha256 {actual[:16]}…, {META_FILE} records "
            f"{expected[:16]}…): the file was modified or is corrupt"
        )


def load_vector(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a vector directory and verify the tensors against its JSON description.

    Args:
        path: the vector directory.

    Returns:
        (name → fp32 tensor in the recorded order, the metadata dict).
    """
    from safetensors import SafetensorError, safe_open

    path, record = read_record(path)
    files = tensor_files(path, record)
    stored: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    problems: list[str] = []
    for name, expected in files.items():
        tensors_file = path / name
        try:  # name and header first: a truncated or pickled file is named as such
            read_shard_header(tensors_file)
        except SafetensorsError as ex:
            raise VectorError(f"cannot read safetensors: {ex}") from ex
        verify_checksum(path, name, expected)
        try:
            with safe_open(str(tensors_file), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if key in stored:
                        problems.append(f"{key}: in both {where[key]} and {name}")
                    stored[key] = fh.get_tensor(key)
                    where[key] = name
        except (SafetensorError, OSError, ValueError) as ex:
            raise VectorError(f"{tensors_file}: cannot read safetensors ({ex})") from ex

    described = record["tensors"]
    weight_map = record.get("weight_map") or dict.fromkeys(described, TENSORS_FILE)
    problems += [
        f"{k}: described in {META_FILE}, missing from {weight_map.get(k, TENSORS_FILE)}"
        for k in described
        if k not in stored
    ]
    problems += [f"{k}: in {where[k]}, not described in {META_FILE}" for k in stored if k not in described]
    problems += [
        f"{k}: in {where[k]}, {META_FILE} places it in {weight_map[k]}"
        for k in stored
        if k in weight_map and where[k] != weight_map[k]
    ]
    for key, info in described.items():
        tensor = stored.get(key)
        if tensor is None:
            continue
        shape = info.get("shape") if isinstance(info, dict) else None
        if shape != list(tensor.shape):
            problems.append(f"{key}: shape {list(tensor.shape)} in {where[key]}, {shape} in {META_FILE}")
        if str(tensor.dtype) != "torch.float32":
            problems.append(f"{key}: dtype {tensor.dtype}, expected float32")
    if problems:
        raise VectorError(
            f"{path}: the files do not match ({len(problems)} problems):" + format_names(problems)
        )
    return {key: stored[key] for key in described}, record["metadata"]
