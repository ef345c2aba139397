"""Knowledge vectors computed from and applied to model directories: the pipelines of ``flearn vector``.

``apply_to_directory`` is the in-memory twin of ``streaming.stream_apply``: load θ, apply λ·Δ, save θ'
with its tokenizer and ``flearn_vector_applied.json``. ``apply_vector`` and ``compute_vector`` choose
between the two paths: streamed for a sharded model, a sharded vector or a LoRA adapter directory
(``stream=None``), or as told.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from flearning.errors import FlearnError
from flearning.vectors.metadata import Provenance, write_applied_record
from flearning.vectors.ops import VectorError, check_scalar

if TYPE_CHECKING:
    from flearning.vectors.streaming import StreamResult
    from flearning.vectors.vector import KnowledgeVector

log = logging.getLogger(__name__)


def local_model_dir(spec: str | os.PathLike, stream: bool | None) -> Path | None:
    """The model directory to stream from, or None for the in-memory path: ``stream`` True or False, or
    (None) stream a local sharded model directory only."""
    if stream is False:
        return None
    from flearning.io.safetensors import is_sharded_checkpoint
    from flearning.models import resolve_model

    path = Path(resolve_model(spec))
    if not path.is_dir():
        if stream:
            raise FlearnError(f"streaming needs a local model directory; '{spec}' is not one")
        return None
    return path if stream or is_sharded_checkpoint(path) else None


def apply_to_directory(
    model: str | os.PathLike,
    vector_dir: str | os.PathLike,
    lam: float,
    out_dir: str | os.PathLike,
    *,
    check_base: bool = True,
    overwrite: bool = False,
) -> KnowledgeVector:
    """Write a new model θ + lam·Δ in memory: ``KnowledgeVector.apply_to`` on the loaded model (fp32),
    saved atomically with its tokenizer and what was applied. Returns the vector applied.

    ``model`` is a model directory or an embedded model name; the other arguments are ``stream_apply``'s.
    """
    from flearning.io.atomic import atomic_directory
    from flearning.io.output import check_output
    from flearning.models import load_model, resolve_model
    from flearning.vectors.vector import KnowledgeVector

    lam = check_scalar(lam, "lambda")
    vector = KnowledgeVector.load(vector_dir)  # cheap checks first, the model load is the slow part
    source = Path(resolve_model(model))
    rule = {"kind": "vector-apply", "overwrite": overwrite, "error": VectorError}
    out = check_output(out_dir, inputs={"model": source, "vector": vector_dir}, **rule)
    loaded, tokenizer = load_model(source)
    vector._apply(loaded, lam, check_base=check_base)  # λ was checked above
    with atomic_directory(out, **rule) as tmp:
        loaded.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source_record = {
            "vector": str(vector_dir),
            "vector_metadata": vector.metadata.model_dump(mode="json"),
        }
        write_applied_record(tmp, str(model), source_record, lam)
    return vector


def apply_vector(
    model: str | os.PathLike,
    vector_dir: str | os.PathLike,
    lam: float,
    out_dir: str | os.PathLike,
    *,
    check_base: bool = True,
    overwrite: bool = False,
    stream: bool | None = None,
) -> KnowledgeVector | StreamResult:
    """θ + lam·Δ written as a new model directory, streamed (``StreamResult``) or in memory (the vector).

    ``vector_dir`` is a knowledge-vector directory or a PEFT LoRA adapter directory (streamed only).
    ``stream=None`` streams a sharded model, a sharded vector or an adapter.
    """
    from flearning.vectors import lora
    from flearning.vectors.files import SHARDED_FORMAT_VERSION, read_record
    from flearning.vectors.streaming import stream_apply

    adapter = lora.is_lora_adapter(vector_dir)
    if adapter and stream is False:
        raise FlearnError(
            f"{vector_dir} is a LoRA adapter directory: apply it with --stream (or compute a vector "
            "first: flearn vector compute --lora-adapter)"
        )
    sharded_vector = not adapter and read_record(vector_dir)[1]["format_version"] == SHARDED_FORMAT_VERSION
    source = local_model_dir(model, True if (adapter or sharded_vector) and stream is None else stream)
    if source is not None:
        return stream_apply(source, vector_dir, lam, out_dir, check_base=check_base, overwrite=overwrite)
    return apply_to_directory(model, vector_dir, lam, out_dir, check_base=check_base, overwrite=overwrite)


def compute_vector(
    base: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    finetuned: str | os.PathLike | None = None,
    lora_adapter: str | os.PathLike | None = None,
    method: str | None = None,
    drop_zero: bool = True,
    overwrite: bool = False,
    stream: bool | None = None,
) -> KnowledgeVector | StreamResult:
    """The knowledge vector of a fine-tuning, saved in ``out_dir``: fine-tuned − base (``finetuned``) or
    B·A·scaling (``lora_adapter``; exactly one of the two). Streamed (``StreamResult``) for a sharded
    base (``stream=None``) or as told, else computed in memory (the vector)."""
    from flearning.io.output import check_output
    from flearning.vectors import lora
    from flearning.vectors.streaming import stream_difference, stream_lora_vector
    from flearning.vectors.vector import KnowledgeVector

    if (finetuned is None) == (lora_adapter is None):
        raise FlearnError(
            "give exactly one of --finetuned DIR (full fine-tuning) or --lora-adapter DIR (LoRA)"
        )
    inputs = {"base model": base, "fine-tuned model": finetuned, "adapter": lora_adapter}
    check_output(out_dir, kind="vector", inputs=inputs, overwrite=overwrite, error=VectorError)
    provenance = Provenance(
        base_model=str(base),
        method=method or ("ft" if finetuned is not None else "lora"),
        hyperparameters={"finetuned": str(finetuned)}
        if finetuned is not None
        else {"adapter": str(lora_adapter)},
    )
    options = {"drop_zero": drop_zero, "overwrite": overwrite}
    source = local_model_dir(base, stream)
    if source is not None:
        if finetuned is not None:
            return stream_difference(source, finetuned, out_dir, provenance, **options)
        return stream_lora_vector(source, lora_adapter, out_dir, provenance, **options)
    from flearning.models import load_model, model_fingerprint

    model, _ = load_model(base)
    provenance = dataclasses.replace(provenance, base_fingerprint=model_fingerprint(model))
    if finetuned is not None:
        tuned, _ = load_model(finetuned)
        vector = KnowledgeVector.from_models(model, tuned, provenance, drop_zero=drop_zero)
    else:
        peft_model = lora.load_adapter(model, lora_adapter)
        vector = KnowledgeVector.from_lora(peft_model, provenance=provenance, drop_zero=drop_zero)
    vector.save(out_dir, overwrite=overwrite)
    return vector
