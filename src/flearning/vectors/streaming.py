"""Knowledge vectors for checkpoints bigger than RAM: θ + λ·Δ and Δ = FT(θ) − θ, streamed from safetensors.

Inputs are Hugging Face model directories with safetensors weights, one ``model.safetensors`` or a
sharded ``model.safetensors.index.json`` + shards. Nothing is loaded as a model: tensors are read through
``safetensors.safe_open`` (memory mapped) a block of rows at a time, with a new handle per block, so the
mapped pages are released as soon as the block is done. Untouched tensors are copied byte for byte by
the kernel (``copy_file_range``). Peak memory is therefore a few blocks (``chunk_bytes``, 64 MiB by
default) plus the interpreter, whatever the shard size; it does not grow with the model.

Layout: the output has the input's shard layout, file for file. A model shard is rewritten with its
header verbatim (same names, dtypes, shapes, offsets: θ + λ·Δ is cast back to the stored dtype) and a
copy of the index. A vector computed from a sharded model is sharded the same way
(``vector-0000i-of-0000n.safetensors`` holds the deltas of the tensors in the model's shard i; see
``vectors.files``); from a single-file model it is the ordinary ``vector.safetensors`` that
``KnowledgeVector.save`` writes. Either kind loads with ``KnowledgeVector.load`` and applies with
``stream_apply``, and an in-memory vector applies with ``stream_apply`` too.

Arithmetic is the in-memory code's: the expressions of ``ops.updated_values`` (fp32, cast back) and
``ops.difference``, evaluated per block into reused buffers (``updated_block``, ``difference_block``).
Both are elementwise, so blocks give bit-identical results; tests compare them on every float dtype.

Checks run while writing: the base fingerprint and the vector's sha256 are hashed on the second core
(``Background``), and must pass before the output is renamed into place.

Names: vectors are keyed by ``named_parameters()`` names, so a tied embedding/lm_head is one key
(``model.embed_tokens.weight``). ``save_pretrained`` stores a tied weight once, under that same name, and
omits ``lm_head.weight``. To map names exactly, the architecture is built from ``config.json`` on the
``meta`` device (no memory, about a second): that gives the tied names, the parameter order and the
``state_dict`` names. Without a loadable config the file names are used as they are.

Fingerprint: ``flearning.models.model_fingerprint`` hashes the sorted ``state_dict()`` (both names of a
tied weight), shapes, dtypes and raw bytes of a model loaded by ``load_model`` (fp32). The files hold
everything needed, given the tied names from the meta model, so ``checkpoint_fingerprint`` reproduces it
exactly, reading one tensor at a time (floating tensors stored in bf16/fp16 are converted to fp32 as
``load_model`` would). A streamed vector therefore records the same ``base_fingerprint`` as an in-memory
one, and ``stream_apply`` checks it the same way. Where it cannot be reproduced (no config, an
architecture transformers cannot build, file names that transformers renames on load), a vector records
no fingerprint and ``stream_apply`` asks for ``check_base=False``.

Writing is atomic: everything goes into a temporary directory that is renamed into place at the end, and
removed on any error, so a NaN found in the last shard leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flearning.io.safetensors import PICKLE_SUFFIXES, refuse_pickles
from flearning.vectors import files as vio
from flearning.vectors import ops
from flearning.vectors.ops import VectorError, format_names

if TYPE_CHECKING:
    import torch

    from flearning.vectors.vector import VectorMetadata

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROVENANCE_FILE = "flearn_vector_applied.json"
CHUNK_BYTES = 64 << 20  # fp32 bytes per block of rows; a handful of blocks is the working set
_COPY_BYTES = 64 << 20
_HEADER_LIMIT = 100 << 20  # safetensors' own limit

# safetensors dtype code -> (torch dtype name, bytes per element)
_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
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
_FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


# -- reading safetensors files ---------------------------------------------------------------------------


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
        """The torch dtype of the stored values (``VectorError`` for a code torch lacks)."""
        import torch

        if self.dtype not in _DTYPES:
            raise VectorError(f"{self.file.name}: {self.name} has dtype {self.dtype}, which is not supported")
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


def read_shard_header(path: str | os.PathLike) -> ShardFile:
    """Parse and check a safetensors header without reading the tensors.

    Args:
        path: a ``.safetensors`` file.

    Returns:
        The header; ``VectorError`` if the file is not complete, valid safetensors (holes, overlaps,
        sizes that do not match the shapes, a file shorter or longer than the header says).
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) != 8:
                raise VectorError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (length,) = struct.unpack("<Q", raw_len)
            if length > _HEADER_LIMIT:
                raise VectorError(f"{path}: not a safetensors file (header length {length})")
            raw = fh.read(length)
            size = os.fstat(fh.fileno()).st_size
    except OSError as ex:
        raise VectorError(f"{path}: cannot read ({ex})") from ex
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as ex:
        raise VectorError(f"{path}: not a safetensors file (header is not JSON: {ex})") from ex
    if len(raw) != length or not isinstance(header, dict):
        raise VectorError(f"{path}: not a safetensors file (truncated or malformed header)")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + length
    entries: list[TensorEntry] = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = (
                info["dtype"],
                tuple(int(d) for d in info["shape"]),
                info["data_offsets"],
            )
        except (KeyError, TypeError, ValueError) as ex:
            raise VectorError(f"{path}: {name}: malformed header entry ({ex})") from ex
        entry = TensorEntry(name, path, str(dtype), shape, base + int(begin), base + int(end))
        itemsize = _DTYPES.get(entry.dtype, (None, None))[1]
        if itemsize is not None and entry.numel * itemsize != entry.nbytes:
            raise VectorError(
                f"{path}: {name}: {entry.nbytes} bytes for shape {list(shape)} of {entry.dtype}"
            )
        entries.append(entry)
    entries.sort(key=lambda e: (e.start, e.end))
    position = base
    for entry in entries:
        if entry.start != position or entry.end < entry.start:
            raise VectorError(f"{path}: {entry.name}: data offsets leave a hole or overlap")
        position = entry.end
    if position != size:
        raise VectorError(f"{path}: the file has {size} bytes, its header describes {position}")
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


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read the headers of a model directory's safetensors weights (no tensor data).

    Args:
        path: a directory with ``model.safetensors`` or ``model.safetensors.index.json`` + shards.

    Returns:
        The checkpoint; ``VectorError`` for a missing, pickled or inconsistent one.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise VectorError(f"{root}: no such model directory")
    if (root / INDEX_FILE).is_file():
        try:
            index = json.loads((root / INDEX_FILE).read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not weight_map:
                raise TypeError("weight_map is empty or not an object")
        except (OSError, ValueError, KeyError, TypeError) as ex:
            raise VectorError(f"{root / INDEX_FILE}: not a safetensors index ({ex})") from ex
        files = sorted(set(weight_map.values()))
        bad = [f for f in files if not isinstance(f, str) or "/" in f or not f.endswith(".safetensors")]
        if bad:
            raise VectorError(f"{root / INDEX_FILE}: refusing shard names {bad}")
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise VectorError(f"{root}: shards named in {INDEX_FILE} are missing: {', '.join(missing)}")
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
            raise VectorError(f"{root}: index and shards disagree:" + format_names(problems))
        return Checkpoint(root, shards, index)
    if (root / SINGLE_FILE).is_file():
        return Checkpoint(root, (read_shard_header(root / SINGLE_FILE),), None)
    refuse_pickles(root, "weights are", error=VectorError)
    raise VectorError(f"{root}: no {SINGLE_FILE} or {INDEX_FILE}")


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
    except VectorError:
        raise
    except Exception as ex:  # SafetensorError has no public base class
        raise VectorError(f"{entry.file}: cannot read {entry.name} ({ex})") from ex


def _copy_range(src: int, dst: int, offset: int, count: int) -> None:
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
            raise VectorError(f"short read while copying {count} bytes at offset {offset}")
        offset += done
        count -= done


def _tensor_bytes(tensor: torch.Tensor):
    """A zero-copy byte view of a tensor (numpy has no bf16, so go through uint8)."""
    import torch

    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


# -- names: files vs named_parameters() -------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """Names of a model built on the meta device from ``config.json``."""

    state_names: tuple[str, ...]  # state_dict() order, both names of a tied weight
    parameters: tuple[str, ...]  # named_parameters() order, tied weights once
    aliases: dict[str, str]  # every parameter name → its named_parameters() name
    shapes: dict[str, tuple[int, ...]]


def model_architecture(path: str | os.PathLike) -> tuple[Architecture | None, str]:
    """Build the model of ``path/config.json`` on the meta device to learn its parameter names.

    Args:
        path: a model directory.

    Returns:
        (the names, "") or (None, why not); nothing is allocated and no remote code is run.
    """
    root = Path(path)
    if not (root / "config.json").is_file():
        return None, f"{root} has no config.json"
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        config = AutoConfig.from_pretrained(root)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception as ex:  # any failure only means the names cannot be derived
        return None, f"transformers cannot build the model of {root / 'config.json'} ({ex})"
    state = model.state_dict()
    return (
        Architecture(
            state_names=tuple(state),
            parameters=tuple(dict(model.named_parameters())),
            aliases=ops.parameter_aliases(model),
            shapes={k: tuple(v.shape) for k, v in state.items()},
        ),
        "",
    )


def parameter_entries(ckpt: Checkpoint, arch: Architecture | None) -> dict[str, TensorEntry]:
    """The checkpoint's tensors under their ``named_parameters()`` names (a tied weight once).

    Args:
        ckpt: the checkpoint.
        arch: its architecture, or None (file names are then used as they are).

    Returns:
        canonical name → entry, in file order.
    """
    out: dict[str, TensorEntry] = {}
    aliases = arch.aliases if arch else {}
    for name, entry in ckpt.entries.items():
        out.setdefault(aliases.get(name, name), entry)
    return out


def _order(names: list[str], arch: Architecture | None) -> list[str]:
    """``names`` in ``named_parameters()`` order where known (what in-memory vectors use), else as given."""
    if arch is None:
        return list(names)
    rank = {n: i for i, n in enumerate(arch.state_names)}
    position = {n: i for i, n in enumerate(names)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), position[n]))


def model_parameters(ckpt: Checkpoint, arch: Architecture | None) -> dict[str, TensorEntry]:
    """Like ``parameter_entries``, restricted to ``named_parameters()`` where the architecture is known
    (persistent buffers are not parameters, as for ``KnowledgeVector.apply_to``)."""
    entries = parameter_entries(ckpt, arch)
    if arch is None:
        return entries
    parameters = set(arch.parameters)
    return {k: e for k, e in entries.items() if k in parameters}


def _meta(shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
    import torch

    return torch.empty(shape, dtype=dtype or torch.float32, device="meta")


def _param_metas(params: Mapping[str, TensorEntry]) -> dict[str, torch.Tensor]:
    """Shape/dtype stand-ins for ``ops.check_applicable`` (non-floating tensors as int64)."""
    import torch

    return {k: _meta(e.shape, e.torch_dtype() if e.is_floating else torch.int64) for k, e in params.items()}


# -- fingerprint ------------------------------------------------------------------------------------------


def _state_dict_sources(ckpt: Checkpoint, arch: Architecture | None, why: str) -> dict[str, TensorEntry]:
    """state_dict name → the stored tensor holding its values; ``VectorError`` if that is not exact."""
    if arch is None:
        raise VectorError(f"cannot reproduce model_fingerprint from the files: {why}")
    entries = ckpt.entries
    groups: dict[str, list[str]] = {}
    for name, canonical in arch.aliases.items():
        groups.setdefault(canonical, []).append(name)
    sources: dict[str, TensorEntry] = {}
    problems: list[str] = []
    for name in arch.state_names:
        entry = entries.get(name)
        if entry is None:
            group = groups.get(arch.aliases.get(name, name), [])
            entry = next((entries[n] for n in group if n in entries), None)
        if entry is None:
            problems.append(f"{name}: in the model's state_dict, not in the files")
        elif entry.shape != arch.shapes[name]:
            problems.append(
                f"{name}: shape {list(entry.shape)} in the files, {list(arch.shapes[name])} in the model"
            )
        else:
            sources[name] = entry
    known = set(arch.state_names)
    problems += [f"{n}: in the files, not in the model's state_dict" for n in entries if n not in known]
    if problems:
        raise VectorError(
            "cannot reproduce model_fingerprint from the files (transformers would rename, drop or "
            "initialise tensors on loading):" + format_names(problems)
        )
    return sources


def _hash_file_range(h, path: Path, start: int, count: int, buffer: bytearray) -> None:
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        fh.seek(start)
        while count > 0:
            n = fh.readinto(view[: min(count, len(buffer))])
            if not n:
                raise VectorError(f"{path}: file ended while hashing")
            h.update(view[:n])
            count -= n


def checkpoint_fingerprint(
    model_dir: str | os.PathLike, *, as_stored: bool = False, chunk_bytes: int = CHUNK_BYTES
) -> str:
    """``model_fingerprint(load_model(model_dir))`` computed from the files, one tensor at a time.

    Args:
        model_dir: a model directory with safetensors weights and a config transformers can build.
        as_stored: hash floating tensors in their stored dtype (the fingerprint of a model loaded with
            ``dtype=None``/its own dtype) instead of fp32 (what ``load_model`` gives). Same for fp32 files.
        chunk_bytes: read size.

    Returns:
        The fingerprint string; ``VectorError`` where the files cannot reproduce it exactly.
    """
    import hashlib

    import torch

    ckpt = open_checkpoint(model_dir)
    arch, why = model_architecture(ckpt.root)
    sources = _state_dict_sources(ckpt, arch, why)
    h = hashlib.blake2b(digest_size=16)
    buffer = bytearray(min(chunk_bytes, 16 << 20))
    for name in sorted(sources):
        entry = sources[name]
        stored = entry.torch_dtype()
        target = torch.float32 if entry.is_floating and not as_stored else stored
        h.update(f"{name}|{entry.shape}|{target}".encode())
        if target == stored:
            _hash_file_range(h, entry.file, entry.start, entry.nbytes, buffer)
        else:
            for block in row_blocks(entry.shape, chunk_bytes):
                h.update(_tensor_bytes(read_block(entry, block).to(target)))
    return h.hexdigest()


def _check_base(ckpt: Checkpoint, expected: str, base_model: str | None) -> None:
    """Raise like ``KnowledgeVector.check_fits`` unless the checkpoint is the vector's base."""
    try:
        actual = checkpoint_fingerprint(ckpt.root)
        if actual != expected and any(e.is_floating and e.dtype != "F32" for e in ckpt.entries.values()):
            # a vector computed from this model loaded in its own dtype (e.g. bf16)
            stored = checkpoint_fingerprint(ckpt.root, as_stored=True)
            actual = stored if stored == expected else actual
    except VectorError as ex:
        raise VectorError(
            f"{ex}. The vector records base fingerprint {expected}, which cannot be checked here: pass "
            "check_base=False (CLI: --no-check-base) to apply it anyway."
        ) from ex
    if actual != expected:
        raise VectorError(
            f"the vector was computed from another base model: its base {base_model!r} has fingerprint "
            f"{expected}, {ckpt.root} has {actual}. A model already changed by a vector also differs from "
            "its base. Pass check_base=False (CLI: --no-check-base) to apply it anyway."
        )


# -- block arithmetic -------------------------------------------------------------------------------------


class BlockBuffers:
    """Reusable output buffers for the block arithmetic.

    A fresh 64 MiB tensor costs more than the arithmetic on it (page faults and zeroing: measured 32 ms
    for ``0.7 * x`` against 8 ms in place), so every block result is written into a buffer that lives
    for the whole operation. A tensor returned from here is valid until the same slot is asked again.
    """

    def __init__(self) -> None:
        self._store: dict[tuple[str, Any], torch.Tensor] = {}

    def get(self, slot: str, dtype: torch.dtype, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        import torch

        n = math.prod(shape)
        buffer = self._store.get((slot, dtype))
        if buffer is None or buffer.numel() < n:
            buffer = self._store[(slot, dtype)] = torch.empty(max(n, 1), dtype=dtype)
        return buffer[:n].view(shape)


def _as(tensor: torch.Tensor, dtype: torch.dtype, buffers: BlockBuffers, slot: str) -> torch.Tensor:
    """``tensor.to(dtype)`` (the same conversion: ``to`` is a ``copy_``), into a buffer if it converts."""
    if tensor.dtype == dtype:
        return tensor
    return buffers.get(slot, dtype, tensor.shape).copy_(tensor)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, in one pass: min and max propagate NaN and ±inf.

    ``torch.isfinite(t).all()`` gives the same answer 8× slower (it builds several temporaries).
    """
    import torch

    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.reshape(-1))
    return math.isfinite(float(low)) and math.isfinite(float(high))


def updated_block(
    theta: torch.Tensor, delta: torch.Tensor, lam: float, buffers: BlockBuffers
) -> tuple[torch.Tensor, int]:
    """θ + lam·Δ for one block: ``ops.updated_values``' arithmetic without its allocations.

    The same operations in the same order (``θ.to(compute) + lam * Δ.to(compute)``, compute = at least
    fp32, then ``.to(θ.dtype)``) through the same kernels with ``out=``, so the values are bit-identical
    (tests compare the two on every float dtype).

    Args:
        theta: a block of the stored parameter.
        delta: the same block of Δ (fp32).
        lam: the finite scale.
        buffers: where the result goes.

    Returns:
        (the new block in θ's dtype, valid until the next call; how many values are not finite).
    """
    import torch

    compute = torch.promote_types(theta.dtype, torch.float32)
    out = buffers.get("new", compute, theta.shape)
    torch.mul(_as(delta, compute, buffers, "delta"), lam, out=out)
    torch.add(_as(theta, compute, buffers, "theta"), out, out=out)
    new = _as(out, theta.dtype, buffers, "cast")
    if all_finite(new):
        return new, 0
    return new, int((~torch.isfinite(new)).sum())


def difference_block(base: torch.Tensor, tuned: torch.Tensor, buffers: BlockBuffers) -> torch.Tensor:
    """``tuned − base`` in fp32 for one block: ``ops.difference``' expression, into a buffer."""
    import torch

    out = buffers.get("difference", torch.float32, base.shape)
    return torch.sub(
        _as(tuned, torch.float32, buffers, "tuned"), _as(base, torch.float32, buffers, "base"), out=out
    )


# -- where deltas come from --------------------------------------------------------------------------------


class DeltaSource:
    """Δ for a set of parameter names, produced a block of rows at a time in fp32."""

    description: str = ""
    metadata: VectorMetadata | None = None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """canonical parameter name → shape of Δ."""
        raise NotImplementedError

    def block(self, name: str, block: tuple[int, int] | None) -> torch.Tensor:
        """Rows ``block`` of Δ[name] in fp32."""
        raise NotImplementedError

    def verify(self) -> None:
        """Check the files against their recorded checksums (before anything is written)."""

    def provenance(self) -> dict[str, Any]:
        return {}


class VectorFiles(DeltaSource):
    """A knowledge-vector directory (one file or sharded), read lazily.

    Args:
        path: the directory written by ``KnowledgeVector.save`` or ``stream_difference``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        from pydantic import ValidationError

        from flearning.vectors.vector import VectorMetadata

        self.path, record = vio.read_record(path)
        self.files = vio.tensor_files(self.path, record)
        try:
            self.metadata = VectorMetadata.model_validate(record["metadata"])
        except ValidationError as ex:
            raise VectorError(
                f"{self.path}: invalid metadata in {vio.META_FILE}:" + format_names([str(ex)])
            ) from ex
        described = record["tensors"]
        weight_map = record.get("weight_map") or dict.fromkeys(described, vio.TENSORS_FILE)
        self.entries: dict[str, TensorEntry] = {}
        problems: list[str] = []
        for name in self.files:
            for entry in read_shard_header(self.path / name).entries:
                if entry.name in self.entries:
                    problems.append(f"{entry.name}: in two files")
                elif entry.name not in described:
                    problems.append(f"{entry.name}: in {name}, not described in {vio.META_FILE}")
                elif weight_map.get(entry.name) != name:
                    problems.append(
                        f"{entry.name}: in {name}, {vio.META_FILE} places it in {weight_map.get(entry.name)}"
                    )
                self.entries[entry.name] = entry
        for key, info in described.items():
            entry = self.entries.get(key)
            shape = info.get("shape") if isinstance(info, dict) else None
            if entry is None:
                problems.append(f"{key}: described in {vio.META_FILE}, missing from {weight_map.get(key)}")
            elif shape != list(entry.shape):
                problems.append(
                    f"{key}: shape {list(entry.shape)} in {entry.file.name}, {shape} in {vio.META_FILE}"
                )
            elif entry.dtype != "F32":
                problems.append(f"{key}: dtype {entry.dtype}, expected F32")
        if problems:
            raise VectorError(
                f"{self.path}: the files do not match ({len(problems)} problems):" + format_names(problems)
            )
        self.order = list(described)
        self.description = f"{self.metadata.kind} vector {self.path}"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.entries[k].shape for k in self.order}

    def block(self, name: str, block: tuple[int, int] | None) -> torch.Tensor:
        return read_block(self.entries[name], block)

    def verify(self) -> None:
        for name, sha in self.files.items():
            vio.verify_checksum(self.path, name, sha)

    def provenance(self) -> dict[str, Any]:
        assert self.metadata is not None
        return {"vector": str(self.path), "vector_metadata": self.metadata.model_dump(mode="json")}


@dataclass
class _LoraLayer:
    a: TensorEntry
    b: TensorEntry
    scaling: float
    fan_in_fan_out: bool
    shape: tuple[int, ...]


_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def is_lora_adapter(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PEFT adapter directory (has ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _lora_config(adapter_dir: Path) -> Any:
    """The adapter's LoraConfig, refused (with reasons) where B·A·scaling is not its whole change."""
    from types import SimpleNamespace

    from peft import LoraConfig

    from flearning.vectors import lora

    try:
        raw = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as ex:
        raise VectorError(f"{adapter_dir / ADAPTER_CONFIG}: cannot read ({ex})") from ex
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        kind = raw.get("peft_type") if isinstance(raw, dict) else None
        raise VectorError(f"{adapter_dir}: a {kind} adapter, not LoRA")
    try:
        config = LoraConfig.from_pretrained(str(adapter_dir))
    except (TypeError, ValueError) as ex:
        raise VectorError(f"{adapter_dir / ADAPTER_CONFIG}: not a valid LoraConfig ({ex})") from ex
    # the same refusals as for a live peft model (DoRA, PiSSA-like inits, modules_to_save, lora_bias, ...)
    lora.lora_config(SimpleNamespace(peft_config={"default": config}), "default")
    problems = []
    for spec in dataclasses.fields(config):
        if spec.name == "init_lora_weights":
            variants = [v for v in spec.metadata.get("lora_variants", ()) if config.init_lora_weights == v]
            problems += [
                f"init_lora_weights='{v}' is a LoRA variant, not plain B·A·scaling" for v in variants
            ]
        elif spec.metadata.get("is_lora_variant") and getattr(config, spec.name):
            problems.append(f"{spec.name} selects a LoRA variant, not plain B·A·scaling")
    if getattr(config, "layer_replication", None):
        problems.append("layer_replication changes the base model's layers")
    if problems:
        raise VectorError(f"cannot apply adapter {adapter_dir}:" + format_names(problems))
    return config


class LoraAdapterFiles(DeltaSource):
    """A PEFT LoRA adapter directory: Δ = B·A·scaling per adapted linear layer, computed per block.

    The math is ``lora.lora_deltas``' (fp32, ``fan_in_fan_out`` transposes, scaling α/r or α/√r with
    ``rank_pattern``/``alpha_pattern`` resolved as peft does), keyed by the base parameter name.

    Args:
        path: the directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
        aliases: the base model's tied names → canonical names (a LoRA on a tied lm_head changes the
            shared embedding, as merging would).
    """

    def __init__(self, path: str | os.PathLike, aliases: Mapping[str, str] | None = None) -> None:
        from peft.utils.other import get_pattern_key

        from flearning.vectors import lora

        self.path = Path(path).expanduser()
        if not (self.path / ADAPTER_WEIGHTS).is_file():
            refuse_pickles(self.path, "the adapter is", error=VectorError)
            raise VectorError(f"{self.path}: no {ADAPTER_WEIGHTS}")
        config = _lora_config(self.path)
        self.config = config
        aliases = aliases or {}
        parts: dict[str, dict[str, TensorEntry]] = {}
        problems: list[str] = []
        for entry in read_shard_header(self.path / ADAPTER_WEIGHTS).entries:
            match = _LORA_KEY.match(entry.name)
            if match is None:
                problems.append(f"{entry.name}: {_lora_refusal(entry.name)}")
                continue
            parts.setdefault(match["module"], {})[match["part"]] = entry
        self.layers: dict[str, _LoraLayer] = {}
        for module_key, pair in parts.items():
            module = lora.base_name(module_key)
            if set(pair) != {"A", "B"}:
                problems.append(f"{module}: has lora_{''.join(pair)} only")
                continue
            a, b = pair["A"], pair["B"]
            if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
                problems.append(
                    f"{module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not multiply"
                )
                continue
            r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
            alpha = config.alpha_pattern.get(
                get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha
            )
            if r != a.shape[0]:
                problems.append(f"{module}: adapter_config gives r={r}, lora_A has {a.shape[0]} rows")
                continue
            scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
            shape = (b.shape[0], a.shape[1])
            if config.fan_in_fan_out:
                shape = shape[::-1]
            weight = f"{module}.weight"
            key = aliases.get(weight, weight)
            if key in self.layers:
                problems.append(f"{module}: a second LoRA layer on the tied weight {key}")
                continue
            self.layers[key] = _LoraLayer(a, b, scaling, bool(config.fan_in_fan_out), shape)
        if problems:
            raise VectorError(f"cannot apply adapter {self.path}:" + format_names(problems))
        if not self.layers:
            raise VectorError(f"adapter {self.path} adapts no linear layer")
        self._cached: tuple[str, torch.Tensor, torch.Tensor] | None = None
        self.description = f"LoRA adapter {self.path} (r={config.r}, alpha={config.lora_alpha})"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: layer.shape for k, layer in self.layers.items()}

    def block(self, name: str, block: tuple[int, int] | None) -> torch.Tensor:
        import torch

        layer = self.layers[name]
        if self._cached is None or self._cached[0] != name:
            self._cached = None  # release the previous layer's factors first
            a = read_block(layer.a, None).to(torch.float32)
            b = read_block(layer.b, None).to(torch.float32)
            self._cached = (name, a, b)
        _, a, b = self._cached
        start, stop = block if block is not None else (0, layer.shape[0])
        with torch.no_grad():
            # fan_in_fan_out: Δ = (B·A)ᵀ, whose rows are columns of B·A
            delta = (b @ a[:, start:stop]).T if layer.fan_in_fan_out else b[start:stop] @ a
            return (delta * layer.scaling).contiguous()

    def provenance(self) -> dict[str, Any]:
        from types import SimpleNamespace

        from flearning.vectors.lora import lora_hyperparameters

        return {
            "adapter": str(self.path),
            "adapter_base_model": self.config.base_model_name_or_path,
            **lora_hyperparameters(SimpleNamespace(peft_config={"default": self.config}), "default"),
        }


def _lora_refusal(name: str) -> str:
    if "lora_embedding_" in name:
        return "LoRA on an embedding layer is not supported (only linear layers)"
    if "lora_magnitude_vector" in name:
        return "DoRA magnitude; its change is not B·A·scaling"
    if "modules_to_save" in name:
        return "a fully trained module copy (modules_to_save), not a low-rank delta"
    if "trainable_tokens" in name:
        return "trainable token rows, not a low-rank delta"
    if ".lora_B." in name and name.endswith(".bias"):
        return "lora_bias also changes the bias"
    return "not a LoRA A/B weight"


def open_delta_source(path: str | os.PathLike, aliases: Mapping[str, str] | None = None) -> DeltaSource:
    """A knowledge-vector directory or a PEFT LoRA adapter directory, opened for streaming.

    Args:
        path: the directory.
        aliases: tied names of the base model (used for adapters).

    Returns:
        The source.
    """
    if is_lora_adapter(path):
        return LoraAdapterFiles(path, aliases)
    return VectorFiles(path)


# -- checks in the background ----------------------------------------------------------------------------


class Background:
    """Run hashing (base fingerprint, vector checksums) on the second core while the main thread writes.

    Hashing releases the GIL, and the main thread is mostly in the kernel (reads, writes) or torch, so
    the checks cost little wall time. They must all pass before the output is renamed into place
    (``wait``); the main thread also polls them between shards (``raise_failed``) to stop early.
    """

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="flearn-check")
        self._futures: list[Any] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        future = self._pool.submit(fn, *args)
        self._futures.append(future)
        return future

    def raise_failed(self) -> None:
        for future in self._futures:
            if future.done() and future.exception() is not None:
                raise future.exception()

    def wait(self) -> None:
        for future in self._futures:
            future.result()

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# -- results ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamResult:
    """What a streaming operation wrote."""

    path: Path
    num_tensors: int  # tensors in the vector / tensors changed in the model
    num_params: int
    num_shards: int
    bytes_written: int
    seconds: float
    norm: float | None = None  # vectors: ‖Δ‖₂ (fp32 dot per block, summed in fp64: for display)
    max_abs: float | None = None
    dropped_zero: tuple[str, ...] = field(default_factory=tuple)


def _check_paths(out: Path, inputs: Mapping[str, Path]) -> None:
    for what, path in inputs.items():
        src = path.expanduser().resolve()
        if out == src or src in out.parents or out in src.parents:
            raise VectorError(
                f"the output {out} would write into (or over) the {what} {path}; choose another"
            )


# -- θ + λ·Δ ----------------------------------------------------------------------------------------------


def stream_apply(
    model_dir: str | os.PathLike,
    vector_dir: str | os.PathLike,
    lam: float,
    out_dir: str | os.PathLike,
    *,
    check_base: bool = True,
    overwrite: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
) -> StreamResult:
    """Write a new model θ + lam·Δ from safetensors files, a block of rows at a time.

    Checks are those of ``KnowledgeVector.apply_to``: finite λ; every key of Δ is a floating parameter of
    the model with the same shape (a second name of a tied weight is refused); the model's fingerprint
    equals the vector's base fingerprint (``check_base``; adapters carry none); every new value is
    finite. Nothing is written unless all pass. Values are computed in fp32 and cast back to the stored
    dtype; tensors Δ does not touch are copied byte for byte; config, tokenizer and other files are copied
    (stale pickled weights are not), and ``flearn_vector_applied.json`` records what was done.

    Args:
        model_dir: θ: a directory with ``model.safetensors`` or an index and shards.
        vector_dir: Δ: a knowledge-vector directory (one file or sharded) or a PEFT LoRA adapter directory
            (Δ = B·A·scaling).
        lam: the scale; forgetting is negative (F-Learning's θ − λ·Δ_old is ``lam=-λ``).
        out_dir: the new model directory (same shard files as the input, new index).
        check_base: refuse a model that is not the vector's base.
        overwrite: replace a non-empty ``out_dir``.
        chunk_bytes: fp32 bytes per block of rows (memory is a few blocks).

    Returns:
        What was written.
    """
    started = time.perf_counter()
    lam = ops.check_scalar(lam, "lambda")
    model_dir, vector_dir = Path(model_dir).expanduser(), Path(vector_dir).expanduser()
    out = Path(out_dir).expanduser().absolute()
    _check_paths(out.resolve(), {"input model": model_dir, "vector": vector_dir})
    vio.check_writable_target(out, overwrite=overwrite)

    ckpt = open_checkpoint(model_dir)
    arch, why = model_architecture(ckpt.root)
    if arch is None:
        log.info("parameter names from the file names only: %s", why)
    source = open_delta_source(vector_dir, arch.aliases if arch else None)
    params = model_parameters(ckpt, arch)
    delta_shapes = source.shapes()
    ops.check_applicable(
        _param_metas(params), {k: _meta(s) for k, s in delta_shapes.items()}, arch.aliases if arch else None
    )
    meta = source.metadata

    updates = {params[k].name: k for k in delta_shapes}  # file name → Δ key
    buffers = BlockBuffers()
    written = 0
    with Background() as background, vio.atomic_directory(out, overwrite=overwrite) as tmp:
        if check_base and meta is not None and meta.base_fingerprint:
            background.submit(_check_base, ckpt, meta.base_fingerprint, meta.base_model)
        background.submit(source.verify)
        _copy_other_files(ckpt, tmp)
        for shard in ckpt.shards:
            background.raise_failed()
            bad = _apply_shard(shard, tmp / shard.path.name, updates, source, lam, chunk_bytes, buffers)
            if bad:
                background.wait()  # a wrong base or a corrupt vector explains NaNs better
                raise VectorError(
                    f"applying the vector with lambda={lam} gives NaN/inf values; nothing was written "
                    f"(stopped after {shard.path.name}):" + format_names(bad)
                )
            written += shard.size
            log.info("wrote %s (%.1f MB)", shard.path.name, shard.size / 1e6)
        background.wait()  # base fingerprint and checksums, before anything becomes visible
        if ckpt.index is not None:
            (tmp / INDEX_FILE).write_text(json.dumps(ckpt.index, indent=2, sort_keys=True) + "\n")
        provenance = {
            "model": str(model_dir),
            **source.provenance(),
            "lambda": lam,
            "operation": "theta + lambda * delta",
            "streamed": True,
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return StreamResult(
        path=out,
        num_tensors=len(delta_shapes),
        num_params=sum(math.prod(s) for s in delta_shapes.values()),
        num_shards=len(ckpt.shards),
        bytes_written=written,
        seconds=time.perf_counter() - started,
    )


def _apply_shard(
    shard: ShardFile,
    target: Path,
    updates: Mapping[str, str],
    source: DeltaSource,
    lam: float,
    chunk_bytes: int,
    buffers: BlockBuffers,
) -> list[str]:
    """Write one output shard: the input header verbatim, then every tensor in offset order."""
    bad: list[str] = []
    with open(shard.path, "rb", buffering=0) as src, open(target, "wb", buffering=0) as dst:
        dst.write(shard.header)
        for entry in shard.entries:
            key = updates.get(entry.name)
            if key is None:
                _copy_range(src.fileno(), dst.fileno(), entry.start, entry.nbytes)
                continue
            not_finite = 0
            for block in row_blocks(entry.shape, chunk_bytes):
                theta = read_block(entry, block)
                delta = source.block(key, block)
                new, count = updated_block(theta, delta, lam, buffers)
                not_finite += count
                _write_all(dst, _tensor_bytes(new))
                del theta, delta, new
            if not_finite:
                bad.append(f"{key}: {not_finite} of {entry.numel} values not finite")
        if dst.tell() != shard.size:
            raise VectorError(f"{target}: wrote {dst.tell()} bytes, expected {shard.size}")
    return bad


def _write_all(fh, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = fh.write(view)
        view = view[n:]


def _copy_other_files(ckpt: Checkpoint, tmp: Path) -> None:
    """Config, tokenizer, generation config, README ...: everything but the weights being rewritten."""
    skip = ckpt.weight_files() | {PROVENANCE_FILE}
    for path in sorted(ckpt.root.iterdir()):
        name = path.name
        if name in skip or name.startswith("."):
            continue
        if path.suffix in PICKLE_SUFFIXES or name.endswith((".safetensors", ".safetensors.index.json")):
            log.warning("not copied: %s (other weights than the ones being updated would be stale)", name)
            continue
        if path.is_dir():
            shutil.copytree(path, tmp / name)
        else:
            shutil.copy2(path, tmp / name)


# -- Δ = FT(θ) − θ ---------------------------------------------------------------------------------------


class _VectorShardWriter:
    """Write a safetensors file of fp32 tensors sequentially, dropping some after the fact.

    The header is reserved at its largest (every planned tensor) and rewritten at the end, padded with
    spaces (valid JSON, and what safetensors itself pads with); a tensor found to be all zero is cut off
    again with ``truncate``. So each tensor is computed once and written once.
    """

    def __init__(self, path: Path, planned: list[tuple[str, tuple[int, ...]]]) -> None:
        self.path = path
        self.reserved = len(self._header(self._layout(planned)))
        self.reserved += -self.reserved % 8
        self.fh = open(path, "wb", buffering=0)  # noqa: SIM115 - closed in finish()/abort()
        self.fh.seek(8 + self.reserved)
        self.kept: list[tuple[str, tuple[int, ...]]] = []
        self._start = 0

    @staticmethod
    def _layout(tensors: list[tuple[str, tuple[int, ...]]]) -> dict[str, Any]:
        layout: dict[str, Any] = {"__metadata__": {"format": vio.FORMAT}}
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
        self._start = self.fh.tell()

    def write(self, tensor: torch.Tensor) -> None:
        _write_all(self.fh, _tensor_bytes(tensor))

    def end(self, name: str, shape: tuple[int, ...], keep: bool) -> None:
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


def _write_vector(
    out: Path,
    layout: list[list[tuple[str, tuple[int, ...]]]],
    produce: Callable[[str, tuple[int, ...]], Iterator[torch.Tensor]],
    *,
    sharded: bool,
    order: list[str],
    metadata_fields: dict[str, Any],
    fingerprint: Callable[[], str | None],
    drop_zero: bool,
    overwrite: bool,
    started: float,
) -> StreamResult:
    """Write a vector directory shard by shard; ``produce(name, shape)`` yields Δ's row blocks in fp32.

    The base fingerprint and each finished shard's sha256 are computed in the background while the next
    shard is written.
    """
    import torch
    from pydantic import ValidationError

    from flearning.vectors.vector import VectorMetadata

    sum_sq, max_abs, dropped = 0.0, 0.0, []
    tensors: dict[str, dict[str, Any]] = {}
    weight_map: dict[str, str] = {}
    shards: dict[str, Any] = {}
    with Background() as background, vio.atomic_directory(out, overwrite=overwrite) as tmp:
        base_fingerprint = background.submit(fingerprint)
        for i, planned in enumerate(layout, start=1):
            background.raise_failed()
            name = vio.shard_file_name(i, len(layout)) if sharded else vio.TENSORS_FILE
            writer = _VectorShardWriter(tmp / name, planned)
            try:
                for key, shape in planned:
                    writer.begin()
                    nonzero = False
                    for block in produce(key, shape):
                        writer.write(block)
                        if block.numel():
                            # one pass for "all zero" and max |Δ| (NaN propagates), a BLAS dot for ‖Δ‖²
                            low, high = (float(x) for x in torch.aminmax(block.reshape(-1)))
                            nonzero = nonzero or low != 0 or high != 0
                            max_abs = max(max_abs, abs(low), abs(high))
                            flat = block.reshape(-1)
                            sum_sq += float(torch.dot(flat, flat))
                    keep = nonzero or not drop_zero
                    writer.end(key, shape, keep)
                    if keep:
                        tensors[key] = {"shape": list(shape), "dtype": "float32"}
                        weight_map[key] = name
                    else:
                        dropped.append(key)
                writer.finish()
            except BaseException:
                writer.fh.close()
                raise
            shards[name] = background.submit(vio.sha256_file, tmp / name)
            log.info("wrote %s", name)
        if not tensors:
            raise VectorError(
                "every delta is zero: the fine-tuned weights equal the base weights (same model twice, "
                "or a fine-tuning that changed nothing)"
            )
        shards = {name: future.result() for name, future in shards.items()}
        try:
            dropped_set = set(dropped)
            metadata = VectorMetadata(
                dropped_zero=[k for k in order if k in dropped_set],
                base_fingerprint=base_fingerprint.result(),
                **metadata_fields,
            )
        except ValidationError as ex:
            raise VectorError(f"invalid vector metadata: {ex}") from ex
        ordered = [k for k in order if k in tensors]
        record: dict[str, Any] = {
            "format": vio.FORMAT,
            "format_version": vio.SHARDED_FORMAT_VERSION if sharded else vio.FORMAT_VERSION,
            "metadata": metadata.model_dump(mode="json"),
            "tensors": {k: tensors[k] for k in ordered},
            "num_params": sum(math.prod(tensors[k]["shape"]) for k in ordered),
        }
        if sharded:
            record["shards"] = shards
            record["weight_map"] = {k: weight_map[k] for k in ordered}
        else:
            record["safetensors_sha256"] = shards[vio.TENSORS_FILE]
        (tmp / vio.META_FILE).write_text(json.dumps(record, indent=2) + "\n")
        written = sum((tmp / n).stat().st_size for n in shards)
    return StreamResult(
        path=out,
        num_tensors=len(tensors),
        num_params=record["num_params"],
        num_shards=len(shards),
        bytes_written=written,
        seconds=time.perf_counter() - started,
        norm=math.sqrt(sum_sq),
        max_abs=max_abs,
        dropped_zero=tuple(dropped),
    )


def _vector_layout(
    ckpt: Checkpoint, names: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Per model shard, the Δ keys of its tensors in offset order (``names``: file name → Δ key)."""
    return [
        [(names[e.name], shapes[names[e.name]]) for e in shard.entries if e.name in names]
        for shard in ckpt.shards
    ]


def _base_fingerprint(ckpt: Checkpoint, given: str | None) -> str | None:
    if given is not None:
        return given
    try:
        return checkpoint_fingerprint(ckpt.root)
    except VectorError as ex:
        log.warning("the vector records no base fingerprint: %s", ex)
        return None


def stream_difference(
    base_dir: str | os.PathLike,
    finetuned_dir: str | os.PathLike,
    out_vector_dir: str | os.PathLike,
    *,
    base_model: str | None = None,
    base_fingerprint: str | None = None,
    method: str | None = "ft",
    data_hash: str | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    drop_zero: bool = True,
    overwrite: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
) -> StreamResult:
    """Δ = fine-tuned − base from two safetensors checkpoints, written as a knowledge-vector directory.

    Same result as ``KnowledgeVector.from_models(base, finetuned)`` (keys, order, values bit for bit,
    zero deltas dropped, fingerprint), without loading either model. A sharded base gives a sharded
    vector with one shard per model shard; a single-file base gives ``vector.safetensors``.

    Args:
        base_dir: θ's model directory.
        finetuned_dir: FT(θ)'s model directory (same tensor names and shapes).
        out_vector_dir: the vector directory to create.
        base_model: recorded; default ``base_dir``.
        base_fingerprint: recorded; default ``checkpoint_fingerprint(base_dir)`` (None, with a warning,
            where the files cannot reproduce ``model_fingerprint``).
        method: recorded.
        data_hash: recorded.
        hyperparameters: recorded (JSON values).
        drop_zero: leave out tensors whose delta is exactly zero.
        overwrite: replace a non-empty ``out_vector_dir``.
        chunk_bytes: fp32 bytes per block of rows.

    Returns:
        What was written (with the norm and largest |Δ|).
    """

    started = time.perf_counter()
    base_dir, finetuned_dir = Path(base_dir).expanduser(), Path(finetuned_dir).expanduser()
    out = Path(out_vector_dir).expanduser().absolute()
    _check_paths(out.resolve(), {"base model": base_dir, "fine-tuned model": finetuned_dir})
    vio.check_writable_target(out, overwrite=overwrite)
    base, tuned = open_checkpoint(base_dir), open_checkpoint(finetuned_dir)
    arch, why = model_architecture(base.root)
    if arch is None:
        log.info("parameter names from the file names only: %s", why)
    # each side with its own config: tied in one and untied in the other is a difference, not a rename
    base_params = model_parameters(base, arch)
    tuned_params = model_parameters(tuned, model_architecture(tuned.root)[0])
    ops.check_same_layout(
        {k: _meta(e.shape) for k, e in base_params.items()},
        {k: _meta(e.shape) for k, e in tuned_params.items()},
    )
    not_float = [
        f"{k}: {e.dtype} / {tuned_params[k].dtype}"
        for k, e in base_params.items()
        if not (e.is_floating and tuned_params[k].is_floating)
    ]
    if not_float:
        raise VectorError("not floating-point tensors:" + format_names(not_float))

    buffers = BlockBuffers()

    def produce(key: str, shape: tuple[int, ...]) -> Iterator[torch.Tensor]:
        b_entry, f_entry = base_params[key], tuned_params[key]
        for block in row_blocks(shape, chunk_bytes):
            b, f = read_block(b_entry, block), read_block(f_entry, block)
            delta = difference_block(b, f, buffers)
            del b, f  # before the next block is read
            yield delta

    fields = {
        "kind": "full",
        "base_model": base_model if base_model is not None else str(base_dir),
        "method": method,
        "data_hash": data_hash,
        "hyperparameters": dict(hyperparameters or {}),
    }
    names = {e.name: k for k, e in base_params.items()}
    return _write_vector(
        out,
        _vector_layout(base, names, {k: e.shape for k, e in base_params.items()}),
        produce,
        sharded=base.sharded,
        order=_order(list(base_params), arch),
        metadata_fields=fields,
        fingerprint=lambda: _base_fingerprint(base, base_fingerprint),
        drop_zero=drop_zero,
        overwrite=overwrite,
        started=started,
    )


def stream_lora_vector(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_vector_dir: str | os.PathLike,
    *,
    base_model: str | None = None,
    base_fingerprint: str | None = None,
    method: str | None = "lora",
    data_hash: str | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    drop_zero: bool = True,
    overwrite: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
) -> StreamResult:
    """Δ = B·A·scaling of a LoRA adapter trained on ``base_dir``, written in the base's shard layout.

    Same deltas as ``KnowledgeVector.from_lora`` (within matmul rounding: B·A is computed a block of rows
    at a time), keyed by base parameter names; only the base's headers and config are read (and its
    weights once, for the fingerprint).

    Args:
        base_dir: θ's model directory.
        adapter_dir: the PEFT adapter directory.
        out_vector_dir: the vector directory to create.
        base_model: recorded; default ``base_dir``.
        base_fingerprint: recorded; default ``checkpoint_fingerprint(base_dir)``.
        method: recorded.
        data_hash: recorded.
        hyperparameters: recorded; the adapter's LoRA settings are added under "lora".
        drop_zero: leave out layers whose B·A is exactly zero.
        overwrite: replace a non-empty ``out_vector_dir``.
        chunk_bytes: fp32 bytes per block of rows.

    Returns:
        What was written.
    """
    started = time.perf_counter()
    base_dir = Path(base_dir).expanduser()
    out = Path(out_vector_dir).expanduser().absolute()
    _check_paths(out.resolve(), {"base model": base_dir, "adapter": Path(adapter_dir)})
    vio.check_writable_target(out, overwrite=overwrite)
    base = open_checkpoint(base_dir)
    arch, _ = model_architecture(base.root)
    source = LoraAdapterFiles(adapter_dir, arch.aliases if arch else None)
    params = model_parameters(base, arch)
    shapes = source.shapes()
    ops.check_applicable(
        _param_metas(params), {k: _meta(s) for k, s in shapes.items()}, arch.aliases if arch else None
    )
    prov = source.provenance()
    fields = {
        "kind": "lora",
        "base_model": base_model if base_model is not None else str(base_dir),
        "method": method,
        "data_hash": data_hash,
        "hyperparameters": {"lora": prov.get("lora", {}), **dict(hyperparameters or {})},
    }

    def produce(key: str, shape: tuple[int, ...]) -> Iterator[torch.Tensor]:
        for block in row_blocks(shape, chunk_bytes):
            yield source.block(key, block)

    names = {params[k].name: k for k in shapes}
    return _write_vector(
        out,
        _vector_layout(base, names, shapes),
        produce,
        sharded=base.sharded,
        order=_order(list(shapes), arch),
        metadata_fields=fields,
        fingerprint=lambda: _base_fingerprint(base, base_fingerprint),
        drop_zero=drop_zero,
        overwrite=overwrite,
        started=started,
    )
