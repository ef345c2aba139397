"""Finding and loading causal LMs: the embedded default, local Hugging Face directories and hub ids.

``resolve_model`` turns ``--model`` into a checked local directory (safetensors only, every weights file
checked before it is read), the converted embedded model (``models.embedded``) or a hub id (only when
meant: a mistyped path is "no such model directory", never a hub lookup); ``load_model`` loads it in
fp32 with its tokenizer and refuses a checkpoint ``AutoModelForCausalLM`` would load with random or
bidirectional parts (``check_causal_lm``). ``model_fingerprint`` is the content hash that vectors,
checkpoints and caches record to recognise a model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from flearning.errors import FlearnError
from flearning.io.safetensors import open_checkpoint
from flearning.models.embedded import DEFAULT_MODEL, EMBEDDED_MODELS, ensure_embedded

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def check_model_dir(path: Path) -> None:
    """A local model directory must have a config and safetensors weights, each weights file checked
    before transformers reads it (``open_checkpoint``: named ``*.safetensors``, a valid header covering
    the file, every shard an index or ``config.json`` names); pickled weights are refused unread, because
    unpickling runs arbitrary code. ``SafetensorsError`` (exit 2) names the bad file."""
    if not path.is_dir():
        raise FlearnError(f"{path}: model path is not a directory")
    if not (path / "config.json").is_file():
        raise FlearnError(f"{path}: not a Hugging Face model directory (no config.json)")
    open_checkpoint(path)


HUB_PREFIX = "hf:"
# A hub repository id as huggingface_hub validates it: [org/]name of word characters, '-' and '.'.
_HUB_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")


class HubId(str):
    """A ``--model`` resolved to a hub id (so resolving it again keeps it one)."""


def _hub_id(text: str) -> HubId:
    if not _HUB_ID.match(text) or ".." in text or "--" in text or len(text) > 96:
        raise FlearnError(
            f"'{HUB_PREFIX}{text}' is not a hub id (org/name of letters, digits, '-', '_', '.')"
        )
    return HubId(text)


def _why_a_path(text: str) -> str | None:
    """Why a ``--model`` that names nothing local is taken for a mistyped path and not a hub id, or None
    for a hub id. A hub id is ``org/name`` whose ``org`` is nothing local; anything that is written like a
    path (``/``, ``.``, ``~`` first, a backslash, several components, characters no hub id has) or whose
    first component exists here is a path."""
    if text.startswith(("/", ".", "~")) or "\\" in text:
        return "it is written as a path"
    first, _, rest = text.partition("/")
    if Path(first).expanduser().exists():
        return f"'{first}' exists here, so this is read as a path"
    if not rest or "/" in rest or not _HUB_ID.match(text):
        return "not a hub id of the form org/name either"
    return None


def resolve_model(spec: str | os.PathLike | None) -> str:
    """Turn ``--model`` into something ``from_pretrained`` accepts: a checked local directory, the
    converted embedded model, or a hub id (returned as is: it loads through the user's own Hugging Face
    cache or hub access).

    A hub id is one only when meant: ``hf:org/name`` always, ``org/name`` when nothing local is named
    ``org``. Anything else that does not exist is a mistyped path: "no such model directory" at once,
    never a hub lookup (``_why_a_path``).
    """
    if spec is None or str(spec) == "" or str(spec) in EMBEDDED_MODELS:
        return _checked_embedded(str(spec) if spec else DEFAULT_MODEL)
    if isinstance(spec, HubId):
        return spec
    text = str(spec)
    if text.startswith(HUB_PREFIX):
        return _hub_id(text.removeprefix(HUB_PREFIX))
    path = Path(text).expanduser()
    if path.exists():
        check_model_dir(path)
        return str(path)
    why = _why_a_path(text)
    if why is None:
        return HubId(text)
    known = ", ".join(EMBEDDED_MODELS)
    raise FlearnError(
        f"no such model directory: {text} (not found: not a local directory, not an embedded model ({known}); "
        f"{why}). A hub id is org/name, or {HUB_PREFIX}org/name to mean the hub."
    )


def _checked_embedded(name: str) -> str:
    """The embedded model's cache directory, its weights checked like any model directory's."""
    path = ensure_embedded(name)
    try:
        check_model_dir(path)
    except FlearnError as ex:
        raise FlearnError(
            f"{ex}. The converted {name} in the cache is damaged: delete {path} and it is converted again."
        ) from ex
    return str(path)


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
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(spec)  # a local directory's weights are checked here, before transformers
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
    except (OSError, SafetensorError) as ex:  # SafetensorError: a hub download the check did not see
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

    Tied parameters appear once, as in ``named_parameters()``. About 1 s for 135M fp32 parameters. A
    model sharded with FSDP2 gives the fingerprint of its whole weights (gathered one tensor at a time:
    every process must call this).
    """
    import torch

    from flearning.sharding import full

    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        t = full(tensor.detach()).contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (a tied embedding/lm_head counts once)."""
    return sum(p.numel() for p in model.parameters())
