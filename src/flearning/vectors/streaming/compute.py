"""``stream_difference`` and ``stream_lora_vector``: a knowledge vector computed from files, not models.

The vector has the base's shard layout: from a sharded base, ``vector-0000i-of-0000n.safetensors`` holds
the deltas of the tensors in the model's shard i (``vectors.files``); from a single-file base it is the
ordinary ``vector.safetensors``. Each tensor is computed once and written once (``ShardWriter``), while
the base fingerprint and each finished shard's sha256 are computed in the background.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flearning.errors import format_names
from flearning.io import safetensors as st
from flearning.io.atomic import atomic_directory
from flearning.io.output import check_output
from flearning.vectors import files as vio
from flearning.vectors import ops
from flearning.vectors.metadata import ALL_ZERO, Kind, Provenance, build_metadata
from flearning.vectors.ops import VectorError
from flearning.vectors.streaming.blocks import Background, BlockBuffers, StreamResult, difference_block
from flearning.vectors.streaming.fingerprint import recorded_fingerprint
from flearning.vectors.streaming.names import (
    architecture_of,
    in_parameter_order,
    meta_tensor,
    model_parameters,
)
from flearning.vectors.streaming.sources import LoraAdapterFiles, open_paired

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Layout = list[list[tuple[str, tuple[int, ...]]]]  # per output shard: (Δ key, shape) in file order


def stream_difference(
    base_dir: str | os.PathLike,
    finetuned_dir: str | os.PathLike,
    out_vector_dir: str | os.PathLike,
    provenance: Provenance | None = None,
    *,
    drop_zero: bool = True,
    overwrite: bool = False,
    chunk_bytes: int = st.CHUNK_BYTES,
) -> StreamResult:
    """Δ = fine-tuned − base from two safetensors checkpoints, written as a knowledge-vector directory.

    Same result as ``KnowledgeVector.from_models(base, finetuned)`` (keys, order, values bit for bit,
    zero deltas dropped, fingerprint), without loading either model.

    Args:
        base_dir: θ's model directory.
        finetuned_dir: FT(θ)'s model directory (same tensor names and shapes).
        out_vector_dir: the vector directory to create.
        provenance: recorded; by default base model ``base_dir``, method "ft", and the fingerprint
            ``checkpoint_fingerprint(base_dir)`` (None, with a warning, where the files cannot reproduce
            ``model_fingerprint``).
        drop_zero: leave out tensors whose delta is exactly zero.
        overwrite: replace an earlier knowledge vector in ``out_vector_dir`` (``io.output``'s rule).
        chunk_bytes: fp32 bytes per block of rows.

    Returns:
        What was written (with the norm and largest |Δ|).
    """
    started = time.perf_counter()
    base_dir, finetuned_dir = Path(base_dir).expanduser(), Path(finetuned_dir).expanduser()
    out = _check_out(out_vector_dir, {"base model": base_dir, "fine-tuned model": finetuned_dir}, overwrite)
    base, tuned = st.open_checkpoint(base_dir), st.open_checkpoint(finetuned_dir)
    arch = architecture_of(base)
    # each side with its own config: tied in one and untied in the other is a difference, not a rename
    base_params = model_parameters(base, arch)
    tuned_params = model_parameters(tuned, architecture_of(tuned))
    ops.check_same_layout(
        {k: meta_tensor(e.shape) for k, e in base_params.items()},
        {k: meta_tensor(e.shape) for k, e in tuned_params.items()},
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
        for block in st.row_blocks(shape, chunk_bytes):
            b, f = st.read_block(b_entry, block), st.read_block(f_entry, block)
            delta = difference_block(b, f, buffers)
            del b, f  # before the next block is read
            yield delta

    provenance = (provenance or Provenance()).with_defaults(base_model=str(base_dir), method="ft")
    names = {e.name: k for k, e in base_params.items()}
    return _write_vector(
        out,
        _vector_layout(base, names, {k: e.shape for k, e in base_params.items()}),
        produce,
        sharded=base.sharded,
        order=in_parameter_order(list(base_params), arch),
        kind="full",
        provenance=provenance,
        fingerprint=lambda: recorded_fingerprint(base, provenance.base_fingerprint),
        drop_zero=drop_zero,
        overwrite=overwrite,
        started=started,
    )


def stream_lora_vector(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_vector_dir: str | os.PathLike,
    provenance: Provenance | None = None,
    *,
    drop_zero: bool = True,
    overwrite: bool = False,
    chunk_bytes: int = st.CHUNK_BYTES,
) -> StreamResult:
    """Δ = B·A·scaling of a LoRA adapter trained on ``base_dir``, written in the base's shard layout.

    Same deltas as ``KnowledgeVector.from_lora`` (within matmul rounding: B·A is computed a block of rows
    at a time), keyed by base parameter names; only the base's headers and config are read (and its
    weights once, for the fingerprint).

    Args:
        base_dir: θ's model directory.
        adapter_dir: the PEFT adapter directory.
        out_vector_dir: the vector directory to create.
        provenance: recorded; by default base model ``base_dir``, method "lora", the fingerprint
            ``checkpoint_fingerprint(base_dir)``. The adapter's LoRA settings are added to the
            hyperparameters under "lora".
        drop_zero: leave out layers whose B·A is exactly zero.
        overwrite: replace an earlier knowledge vector in ``out_vector_dir`` (``io.output``'s rule).
        chunk_bytes: fp32 bytes per block of rows.

    Returns:
        What was written.
    """
    started = time.perf_counter()
    base_dir = Path(base_dir).expanduser()
    out = _check_out(out_vector_dir, {"base model": base_dir, "adapter": Path(adapter_dir)}, overwrite)
    base, arch, source, params, shapes = open_paired(base_dir, partial(LoraAdapterFiles, adapter_dir))
    provenance = (provenance or Provenance()).with_defaults(base_model=str(base_dir), method="lora")
    lora_settings = {"lora": source.provenance().get("lora", {}), **dict(provenance.hyperparameters)}

    def produce(key: str, shape: tuple[int, ...]) -> Iterator[torch.Tensor]:
        for block in st.row_blocks(shape, chunk_bytes):
            yield source.block(key, block)

    names = {params[k].name: k for k in shapes}
    return _write_vector(
        out,
        _vector_layout(base, names, shapes),
        produce,
        sharded=base.sharded,
        order=in_parameter_order(list(shapes), arch),
        kind="lora",
        provenance=provenance,
        hyperparameters=lora_settings,
        fingerprint=lambda: recorded_fingerprint(base, provenance.base_fingerprint),
        drop_zero=drop_zero,
        overwrite=overwrite,
        started=started,
    )


def _check_out(out_vector_dir: str | os.PathLike, inputs: Mapping[str, Path], overwrite: bool) -> Path:
    return check_output(out_vector_dir, kind="vector", inputs=inputs, overwrite=overwrite, error=VectorError)


def _vector_layout(
    ckpt: st.Checkpoint, names: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]
) -> Layout:
    """Per model shard, the Δ keys of its tensors in offset order (``names``: file name → Δ key)."""
    return [
        [(names[e.name], shapes[names[e.name]]) for e in shard.entries if e.name in names]
        for shard in ckpt.shards
    ]


def _write_vector(
    out: Path,
    layout: Layout,
    produce: Callable[[str, tuple[int, ...]], Iterator[torch.Tensor]],
    *,
    sharded: bool,
    order: list[str],
    kind: Kind,
    provenance: Provenance,
    fingerprint: Callable[[], str | None],
    drop_zero: bool,
    overwrite: bool,
    started: float,
    hyperparameters: Mapping[str, Any] | None = None,
) -> StreamResult:
    """Write a vector directory shard by shard; ``produce(name, shape)`` yields Δ's row blocks in fp32."""
    import dataclasses

    import torch

    sum_sq, max_abs, dropped = 0.0, 0.0, []
    tensors: dict[str, tuple[int, ...]] = {}  # kept: name → shape
    weight_map: dict[str, str] = {}
    shards: dict[str, Any] = {}
    with (
        Background() as background,
        atomic_directory(out, overwrite=overwrite, kind="vector", error=VectorError) as tmp,
    ):
        base_fingerprint = background.submit(fingerprint)
        for i, planned in enumerate(layout, start=1):
            background.raise_failed()
            name = vio.shard_file_name(i, len(layout)) if sharded else vio.TENSORS_FILE
            writer = st.ShardWriter(tmp / name, planned, metadata={"format": vio.FORMAT})
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
                        tensors[key] = shape
                        weight_map[key] = name
                    else:
                        dropped.append(key)
                writer.finish()
            except BaseException:
                writer.abort()
                raise
            shards[name] = background.submit(vio.sha256_file, tmp / name)
            log.info("wrote %s", name)
        if not tensors:
            raise VectorError(ALL_ZERO)
        shards = {name: future.result() for name, future in shards.items()}
        dropped_set = set(dropped)
        metadata = build_metadata(
            dataclasses.replace(provenance, base_fingerprint=base_fingerprint.result()),
            kind=kind,
            dropped_zero=[k for k in order if k in dropped_set],
            hyperparameters=hyperparameters,
        )
        shapes = {k: tensors[k] for k in order if k in tensors}
        files = {"shards": shards, "weight_map": weight_map} if sharded else {}
        record = vio.vector_record(
            metadata.model_dump(mode="json"),
            shapes,
            sha256=None if sharded else shards[vio.TENSORS_FILE],
            **files,
        )
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
