"""The knowledge vector of a LoRA adapter: ΔW = B·A·scaling per adapted linear layer.

Keys are the base model's parameter names (``model.layers.0.self_attn.q_proj.weight``), so a LoRA vector
applies to the plain model exactly like a full fine-tuning vector. Only plain LoRA on linear layers is
supported: variants (DoRA, aLoRA, ...), LoRA on embeddings/convolutions, ``lora_bias``, trained
``modules_to_save`` and initialisations that rewrite the base weights (PiSSA, OLoRA, CorDA, LoftQ) change
the model by something other than B·A·scaling, and are refused with the reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flearning.vectors.ops import VectorError, format_names

if TYPE_CHECKING:
    import torch

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
    return config


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
        with torch.no_grad():
            delta = b @ a
            if module.fan_in_fan_out:  # Conv1D stores the weight as (in, out)
                delta = delta.T
            delta = (delta * module.scaling[adapter_name]).contiguous()
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
    if config is None:
        return {}
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
