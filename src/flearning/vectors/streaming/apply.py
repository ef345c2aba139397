"""``stream_apply``: a new model θ + λ·Δ written from safetensors files, a block of rows at a time.

The output has the input's shard layout, file for file: each shard is rewritten with its header verbatim
(θ + λ·Δ cast back to the stored dtype), untouched tensors are copied byte for byte, and the other files
(config, tokenizer, ...) are copied. Nothing becomes visible unless every check passes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path

from flearning.errors import format_names
from flearning.io import safetensors as st
from flearning.io.atomic import atomic_directory
from flearning.io.output import check_output
from flearning.vectors.metadata import PROVENANCE_FILE, write_applied_record
from flearning.vectors.ops import VectorError, check_scalar
from flearning.vectors.streaming.blocks import Background, BlockBuffers, StreamResult, updated_block
from flearning.vectors.streaming.fingerprint import check_base as check_base_model
from flearning.vectors.streaming.sources import DeltaSource, open_delta_source, open_paired

log = logging.getLogger(__name__)


def stream_apply(
    model_dir: str | os.PathLike,
    vector_dir: str | os.PathLike,
    lam: float,
    out_dir: str | os.PathLike,
    *,
    check_base: bool = True,
    overwrite: bool = False,
    chunk_bytes: int = st.CHUNK_BYTES,
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
        overwrite: replace an earlier ``vector apply`` output in ``out_dir`` (``io.output``'s rule).
        chunk_bytes: fp32 bytes per block of rows (memory is a few blocks).

    Returns:
        What was written.
    """
    started = time.perf_counter()
    lam = check_scalar(lam, "lambda")
    model_dir, vector_dir = Path(model_dir).expanduser(), Path(vector_dir).expanduser()
    rule = {"kind": "vector-apply", "overwrite": overwrite, "error": VectorError}
    out = check_output(out_dir, inputs={"model": model_dir, "vector": vector_dir}, **rule)

    ckpt, _, source, params, delta_shapes = open_paired(model_dir, partial(open_delta_source, vector_dir))
    meta = source.metadata

    updates = {params[k].name: k for k in delta_shapes}  # file name → Δ key
    buffers = BlockBuffers()
    written = 0
    with Background() as background, atomic_directory(out, **rule) as tmp:
        if check_base and meta is not None and meta.base_fingerprint:
            background.submit(check_base_model, ckpt, meta.base_fingerprint, meta.base_model)
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
            (tmp / st.INDEX_FILE).write_text(json.dumps(ckpt.index, indent=2, sort_keys=True) + "\n")
        write_applied_record(tmp, str(model_dir), source.provenance(), lam, streamed=True)
    return StreamResult(
        path=out,
        num_tensors=len(delta_shapes),
        num_params=sum(math.prod(s) for s in delta_shapes.values()),
        num_shards=len(ckpt.shards),
        bytes_written=written,
        seconds=time.perf_counter() - started,
    )


def _apply_shard(
    shard: st.ShardFile,
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
                st.copy_range(src.fileno(), dst.fileno(), entry.start, entry.nbytes)
                continue
            not_finite = 0
            for block in st.row_blocks(entry.shape, chunk_bytes):
                theta = st.read_block(entry, block)
                delta = source.block(key, block)
                new, count = updated_block(theta, delta, lam, buffers)
                not_finite += count
                st.write_all(dst, st.tensor_bytes(new))
                del theta, delta, new
            if not_finite:
                bad.append(f"{key}: {not_finite} of {entry.numel} values not finite")
        if dst.tell() != shard.size:
            raise VectorError(f"{target}: wrote {dst.tell()} bytes, expected {shard.size}")
    return bad


def _copy_other_files(ckpt: st.Checkpoint, tmp: Path) -> None:
    """Config, tokenizer, generation config, README ...: everything but the weights being rewritten."""
    skip = ckpt.weight_files() | {PROVENANCE_FILE}
    for path in sorted(ckpt.root.iterdir()):
        name = path.name
        if name in skip or name.startswith("."):
            continue
        if path.suffix in st.PICKLE_SUFFIXES or name.endswith((".safetensors", ".safetensors.index.json")):
            log.warning("not copied: %s (other weights than the ones being updated would be stale)", name)
            continue
        if path.is_dir():
            shutil.copytree(path, tmp / name)
        else:
            shutil.copy2(path, tmp / name)
