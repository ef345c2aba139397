"""``model_fingerprint`` reproduced from safetensors files, and the base-model check of ``stream_apply``.

``flearning.models.model_fingerprint`` hashes the sorted ``state_dict()`` (both names of a tied weight),
shapes, dtypes and raw bytes of a model loaded by ``load_model`` (fp32). The files hold all of it, given
the tied names from the meta model, so ``checkpoint_fingerprint`` reproduces it exactly, one tensor at a
time. Where it cannot (no config, files transformers would rename on load) it says why.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flearning.errors import FlearnError, format_names
from flearning.io.safetensors import (
    CHUNK_BYTES,
    Checkpoint,
    TensorEntry,
    open_checkpoint,
    read_block,
    row_blocks,
    tensor_bytes,
)
from flearning.vectors.ops import VectorError
from flearning.vectors.streaming.names import Architecture, model_architecture

log = logging.getLogger(__name__)


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
    ckpt = open_checkpoint(model_dir)
    return _fingerprint(ckpt, *model_architecture(ckpt.root), as_stored=as_stored, chunk_bytes=chunk_bytes)


def _fingerprint(
    ckpt: Checkpoint, arch: Architecture | None, why: str, *, as_stored: bool, chunk_bytes: int = CHUNK_BYTES
) -> str:
    """``checkpoint_fingerprint`` of an open checkpoint whose architecture is known (or why not)."""
    import hashlib

    import torch

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
                h.update(tensor_bytes(read_block(entry, block).to(target)))
    return h.hexdigest()


def check_base(ckpt: Checkpoint, expected: str, base_model: str | None) -> None:
    """Raise like ``KnowledgeVector.check_fits`` unless the checkpoint is the vector's base."""
    try:
        arch, why = model_architecture(ckpt.root)  # built once for both fingerprints
        actual = _fingerprint(ckpt, arch, why, as_stored=False)
        if actual != expected and any(e.is_floating and e.dtype != "F32" for e in ckpt.entries.values()):
            # a vector computed from this model loaded in its own dtype (e.g. bf16)
            stored = _fingerprint(ckpt, arch, why, as_stored=True)
            actual = stored if stored == expected else actual
    except FlearnError as ex:  # the files cannot reproduce it (VectorError) or cannot be read
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


def recorded_fingerprint(ckpt: Checkpoint, given: str | None) -> str | None:
    """The base fingerprint a computed vector records: ``given``, else the files' (None, with a warning,
    where they cannot reproduce it)."""
    if given is not None:
        return given
    try:
        return checkpoint_fingerprint(ckpt.root)
    except FlearnError as ex:
        log.warning("the vector records no base fingerprint: %s", ex)
        return None
