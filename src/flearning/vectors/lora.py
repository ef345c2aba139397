"""The knowledge vector of a LoRA adapter: ΔW = B·A·scaling per adapted linear layer, keyed by the base
model's parameter names, so it applies to the plain model like a full fine-tuning vector.

The one home of LoRA handling, for a live peft model (``lora_deltas``) and for an adapter directory read
from its files (``read_adapter_config``, ``layer_scaling``, ``lora_delta``; streamed by
``streaming.sources``). Only plain LoRA on linear layers: variants (DoRA, ...), LoRA on embeddings,
``lora_bias``, ``modules_to_save`` and inits that rewrite the base (PiSSA, LoftQ, ...) are refused.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flearning.errors import format_names
from flearning.io.safetensors import read_shard_header, refuse_pickles
from flearning.vectors.ops import VectorError

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Initialisations that move the principal components out of the base weight: the adapter then
# does not describe the change from the original model.
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq")
_PEFT_PREFIXES = ("base_model.model.",)


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a ``PeftModel`` / ``LoraModel`` (or the model itself).

    Args:
        model: a ``PeftModel``, a ``LoraModel`` or a model with injected adapters.

    Returns:
        The module whose parameter names match the plain base model's.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        return model.get_base_model()
    if isinstance(model, BaseTuner):
        return model.model
    return model


def base_name(name: str) -> str:
    """Map a name inside a peft-wrapped model to the plain model's name.

    Args:
        name: e.g. ``base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight``.

    Returns:
        e.g. ``model.layers.0.self_attn.q_proj.weight``.
    """
    for prefix in _PEFT_PREFIXES:
        name = name.removeprefix(prefix)
    return name.replace(".base_layer.", ".").removesuffix(".base_layer")


def lora_config(model: torch.nn.Module, adapter_name: str) -> Any | None:
    """The ``LoraConfig`` of ``adapter_name``, checked; ``None`` if the model carries no configs.

    Args:
        model: a peft-wrapped model.
        adapter_name: the adapter to read.

    Returns:
        The config object, or ``None`` for a model with injected adapters and no ``peft_config``.
    """
    from peft import PeftType

    configs = getattr(model, "peft_config", None)
    if not configs:
        return None
    if adapter_name not in configs:
        raise VectorError(f"no adapter named '{adapter_name}'; the model has: {', '.join(sorted(configs))}")
    config = configs[adapter_name]
    if config.peft_type != PeftType.LORA:
        raise VectorError(f"adapter '{adapter_name}' is {config.peft_type.value}, not LoRA")
    check_config(config, adapter_name)
    return config


def check_config(config: Any, adapter_name: str) -> None:
    """Refuse (``VectorError``, every reason listed) a ``LoraConfig`` whose change is not B·A·scaling."""
    problems = []
    init = config.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        problems.append(
            f"init_lora_weights='{init}' rewrites the base weights at initialisation, so B·A·scaling is not "
            "the change from the base model"
        )
    if config.use_dora:
        problems.append(
            "DoRA (use_dora=True) rescales each column by a learned magnitude; its change is not B·A·scaling"
        )
    if config.modules_to_save:
        problems.append(
            f"modules_to_save={sorted(config.modules_to_save)} are fully trained copies, not low-rank deltas"
        )
    if getattr(config, "trainable_token_indices", None):
        problems.append("trainable_token_indices trains embedding rows outside LoRA")
    if getattr(config, "target_parameters", None):
        problems.append("target_parameters (LoRA on raw nn.Parameters) is not supported")
    if getattr(config, "lora_bias", False):
        problems.append("lora_bias=True also changes the biases; train with lora_bias=False")
    if problems:
        raise VectorError(
            f"cannot build a knowledge vector from adapter '{adapter_name}':" + format_names(problems)
        )


def lora_deltas(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """ΔW = B·A·scaling in fp32 for every linear layer adapted by ``adapter_name``.

    Matches peft's ``get_delta_weight`` (including the ``fan_in_fan_out`` transposition of GPT-2 style
    ``Conv1D`` layers) but always in fp32. A tied base weight (e.g. ``lm_head`` sharing the embedding) is
    keyed by the name ``named_parameters()`` gives the shared tensor, as merging would change both.

    Args:
        model: a ``PeftModel``, ``LoraModel`` or model with injected LoRA layers.
        adapter_name: which adapter.

    Returns:
        base parameter name → fp32 delta of the base weight's shape, in module order.
    """
    import torch
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    lora_config(model, adapter_name)
    root = unwrap_peft(model)
    canonical = {
        id(p): base_name(n) for n, p in reversed(list(root.named_parameters(remove_duplicate=False)))
    }

    problems: list[str] = []
    out: dict[str, torch.Tensor] = {}
    for name, module in root.named_modules():
        # modules_to_save / trainable tokens: fully trained copies, not low-rank deltas.
        if isinstance(module, AuxiliaryTrainingWrapper) and adapter_name in getattr(module, "_adapters", ()):
            problems.append(f"{name}: {type(module).__name__} (fully trained module), not a LoRA layer")
            continue
        if not isinstance(module, LoraLayer):
            continue
        if adapter_name in module.lora_embedding_A:
            problems.append(f"{name}: LoRA on an embedding layer is not supported (only linear layers)")
            continue
        if adapter_name not in module.lora_A:
            continue
        if not isinstance(module, LoraLinear):
            problems.append(f"{name}: {type(module).__name__} is not supported (only LoRA on linear layers)")
            continue
        if module.use_dora.get(adapter_name) or adapter_name in module.lora_magnitude_vector:
            problems.append(f"{name}: DoRA layer; its change is not B·A·scaling")
            continue
        variant = module.lora_variant.get(adapter_name)
        if variant is not None:
            problems.append(f"{name}: LoRA variant {type(variant).__name__} is not supported")
            continue
        if module.lora_bias.get(adapter_name):
            problems.append(f"{name}: lora_bias=True also changes the bias")
            continue
        if adapter_name in module.merged_adapters:
            problems.append(f"{name}: the adapter is merged into the base weight; unmerge it first")
            continue
        weight = module.get_base_layer().weight
        key = canonical.get(id(weight), base_name(f"{name}.weight"))
        a = module.lora_A[adapter_name].weight.detach().to("cpu", torch.float32)
        b = module.lora_B[adapter_name].weight.detach().to("cpu", torch.float32)
        delta = lora_delta(a, b, module.scaling[adapter_name], module.fan_in_fan_out)
        if tuple(delta.shape) != tuple(weight.shape):
            problems.append(
                f"{name}: B·A has shape {tuple(delta.shape)}, the base weight {tuple(weight.shape)}"
            )
            continue
        if key in out:
            problems.append(f"{name}: a second LoRA layer on the tied weight {key}")
            continue
        out[key] = delta
    if problems:
        raise VectorError(
            f"cannot build a knowledge vector from adapter '{adapter_name}':" + format_names(problems)
        )
    if not out:
        raise VectorError(f"adapter '{adapter_name}' adapts no linear layer of this model")
    return out


class _BaseWeightsView:
    """Just enough of a module for ``model_fingerprint``: the base weights under the plain names."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def merge_adapter(model: torch.nn.Module, adapter_name: str = "default") -> torch.nn.Module:
    """The plain model with the adapter merged into its weights (peft's ``merge_and_unload``).

    On a model sharded with FSDP2 peft cannot add B·A to a weight it holds only rows of: there the
    delta ΔW = B·A·scaling (``lora_deltas``, the adapter's factors are whole on every process) is formed,
    the adapter removed, and each process adds its rows of ΔW to its shard, in fp32 as peft does.
    """
    import torch

    from flearning.sharding import is_sharded
    from flearning.vectors.ops import updated_values

    if not is_sharded(unwrap_peft(model)):
        return model.merge_and_unload()
    deltas = lora_deltas(model, adapter_name)
    plain = model.unload()
    params = dict(plain.named_parameters())
    with torch.no_grad():
        for key, value in updated_values(params, deltas, 1.0).items():
            params[key].copy_(value)
    return plain


def base_fingerprint(model: torch.nn.Module) -> str:
    """``model_fingerprint`` of the base model under a peft wrapper, without unloading the adapters.

    Adapter tensors are left out and ``.base_layer`` is removed from the names, so the result equals
    ``model_fingerprint(base)`` taken before wrapping (as long as the wrapper left the base weights alone,
    which ``lora_config`` makes sure of).

    Args:
        model: a ``PeftModel``, ``LoraModel`` or model with injected LoRA layers.

    Returns:
        The fingerprint string.
    """
    from peft.tuners.lora.layer import LoraLayer

    from flearning.models import model_fingerprint

    adapter_parts = set(LoraLayer.adapter_layer_names)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in unwrap_peft(model).state_dict().items():
        if adapter_parts.intersection(name.split(".")):
            continue
        key = base_name(name)
        if key in state:
            raise VectorError(f"two base tensors map to the name {key}; pass base_fingerprint explicitly")
        state[key] = tensor
    return model_fingerprint(_BaseWeightsView(state))  # type: ignore[arg-type]


def lora_hyperparameters(model: torch.nn.Module, adapter_name: str) -> dict[str, Any]:
    """The adapter's LoRA settings worth recording next to the vector (JSON-friendly).

    Args:
        model: a peft-wrapped model.
        adapter_name: which adapter.

    Returns:
        ``{"lora": {...}}``, or ``{}`` when the model carries no config.
    """
    config = lora_config(model, adapter_name)
    return {} if config is None else config_hyperparameters(config, adapter_name)


def config_hyperparameters(config: Any, adapter_name: str = "default") -> dict[str, Any]:
    """``{"lora": {...}}``: the settings of a ``LoraConfig`` worth recording next to the vector."""
    targets = config.target_modules
    if isinstance(targets, (set, list, tuple)):
        targets = sorted(targets)
    return {
        "lora": {
            "adapter_name": adapter_name,
            "r": config.r,
            "lora_alpha": config.lora_alpha,
            "use_rslora": bool(config.use_rslora),
            "target_modules": targets,
            "fan_in_fan_out": bool(config.fan_in_fan_out),
            "rank_pattern": dict(config.rank_pattern or {}),
            "alpha_pattern": dict(config.alpha_pattern or {}),
        }
    }


def lora_delta(
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """ΔW = B·A·scaling in fp32 (``(B·A)ᵀ`` for ``fan_in_fan_out``: GPT-2 style ``Conv1D`` stores the
    weight as (in, out)), or only its rows ``rows`` (start, stop), computed without the others."""
    import torch

    with torch.no_grad():
        if rows is None:
            delta = (b @ a).T if fan_in_fan_out else b @ a
        else:  # rows of (B·A)ᵀ are columns of B·A
            start, stop = rows
            delta = (b @ a[:, start:stop]).T if fan_in_fan_out else b[start:stop] @ a
        return (delta * scaling).contiguous()


def layer_scaling(config: Any, module: str) -> tuple[int, float]:
    """(r, scaling) of the layer ``module`` as peft sets them: ``rank_pattern``/``alpha_pattern`` resolved
    by peft's own ``get_pattern_key``, scaling α/r (α/√r with ``use_rslora``)."""
    from peft.utils.other import get_pattern_key

    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    return r, alpha / math.sqrt(r) if config.use_rslora else alpha / r


def is_lora_adapter(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PEFT adapter directory (has ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def check_adapter_dir(path: str | os.PathLike) -> Path:
    """``path`` as a PEFT adapter directory with safetensors weights: pickled weights are refused unread,
    and ``adapter_model.safetensors`` is checked (a valid header covering the file) before peft or the
    streamed reader opens it (``SafetensorsError`` naming the file)."""
    path = Path(path).expanduser()
    if not is_lora_adapter(path):
        raise VectorError(f"{path}: not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    if not (path / ADAPTER_WEIGHTS).is_file():
        refuse_pickles(path, "the adapter is", error=VectorError)
        raise VectorError(f"{path}: no {ADAPTER_WEIGHTS}")
    read_shard_header(path / ADAPTER_WEIGHTS)
    return path


def read_adapter_config(adapter_dir: Path) -> Any:
    """The ``LoraConfig`` of an adapter directory, refused (with reasons) where B·A·scaling is not its
    whole change: ``check_config``'s reasons, and the LoRA variants that only the config names."""
    import dataclasses

    from peft import LoraConfig

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
    check_config(config, "default")  # the refusals for a live peft model (DoRA, PiSSA-like inits, ...)
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


def key_refusal(name: str) -> str:
    """Why a tensor of an adapter file that is not ``*.lora_A.weight``/``*.lora_B.weight`` is refused."""
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


def load_adapter(model: torch.nn.Module, adapter_dir: str | os.PathLike) -> torch.nn.Module:
    """``model`` wrapped with the LoRA adapter in ``adapter_dir`` (safetensors only), for ``from_lora``."""
    from peft import PeftModel

    adapter_dir = check_adapter_dir(adapter_dir)
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (ValueError, KeyError, RuntimeError, OSError) as ex:
        raise VectorError(f"{adapter_dir}: cannot load the adapter onto the base model: {ex}") from ex
