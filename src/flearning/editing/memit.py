"""MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer"): a batch of facts spread over the
MLP output projections of a range of layers.

As ``execute_memit`` (kmeng01/memit ``memit/memit_main.py``, ``compute_ks.py``, ``compute_z.py``):

1. z_i = the residual stream (decoder block output) of the LAST edited layer at request i's subject,
   plus the δ_i of ``values`` (``compute_z``: the loss of ROME's v*), for every request at once;
2. for each layer l, lowest first, on the model holding the updates of the layers below it:
   K = each request's key at l (``compute_ks``: the mean of the prompt alone's key and the mean of the
   prefixed prompts' keys), R = (z − the current block output of the last layer at the prompt alone)
   / (number of layers left, l included), and

       ΔW_l = R Kᵀ (λ C_l + K Kᵀ)⁻¹          (λ: ``mom2_update_weight``; solved in float64)

Requests are rows: K ``[n, in]``, R ``[n, out]``; ΔW in the math layout ``[out, in]``.

With one request and one layer, Sherman–Morrison gives R kᵀ (λC + k kᵀ)⁻¹ = R (C⁻¹k)ᵀ / (λ + kᵀC⁻¹k):
ROME's closed form (``rome.rome_update`` with u = C⁻¹k) as λ → 0 (tested).

Deviations: fixed context prefixes (``requests.CONTEXT_PREFIXES``); every C_l is computed (or read from
the cache) on the model as given, before any layer is updated (MEMIT's statistics are usually the ones
precomputed on the unedited model); the z loss uses the model's own logits instead of recomputing
``ln_f`` and the unembedding from the last block (the same numbers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flearning.editing.architectures import (
    Architecture,
    architecture_of,
    check_layers,
    to_parameter_layout,
)
from flearning.editing.covariance import CovarianceSettings, second_moments
from flearning.editing.deltas import apply_deltas, original_weights
from flearning.editing.requests import CONTEXT_PREFIXES, EditRequest, as_requests, key_sequences
from flearning.editing.tracing import IN, OUT, read_at_lookups
from flearning.editing.value_cache import ValueCache
from flearning.editing.values import Values, ValueSettings, optimise_values

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from flearning.data.records import KnowledgeRecord

    RequestLike = EditRequest | KnowledgeRecord | Mapping[str, Any]
    # (layer index, position in the layer list, K [n, in], R [n, out]) -> ΔW [out, in] in float64
    Solver = Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor]

MOM2_UPDATE_WEIGHT = 15000.0  # MEMIT's GPT-J hparams and EasyEdit's hparams/MEMIT/llama-7b.yaml


@dataclass(frozen=True)
class LayerUpdates:
    """What spreading z over the layers did: ``deltas`` {parameter name: ΔW} (parameter layout); per
    layer index the keys K (``[n, in]``) and the residuals z − current output (``[n, out]``, before the
    division by the layers left) at the time of its update; ``final_keys`` each layer's keys once every
    layer is updated (only when asked)."""

    deltas: dict[str, torch.Tensor]
    keys: dict[int, torch.Tensor]
    residuals: dict[int, torch.Tensor]
    final_keys: dict[int, torch.Tensor]


@dataclass(frozen=True)
class MemitResult:
    """``deltas``: {parameter name: ΔW} in the parameter's layout; ``targets`` z (``[n, hidden]``)."""

    deltas: dict[str, torch.Tensor]
    layers: list[int]
    targets: torch.Tensor
    keys: dict[int, torch.Tensor]
    residuals: dict[int, torch.Tensor]
    values: Values


def memit_update(
    residuals: torch.Tensor, keys: torch.Tensor, covariance: torch.Tensor, mom2_update_weight: float
) -> torch.Tensor:
    """ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ in float64, ``[out, in]``: the least-squares update that writes each
    key's residual while keeping W's outputs on keys distributed as C (the MEMIT paper's closed form).

    ``residuals`` ``[n, out]``, ``keys`` ``[n, in]``: one row per request.
    """
    import torch

    k = keys.double().T  # [in, n]
    r = residuals.double().T  # [out, n]
    c = covariance.to(k.device, torch.float64)
    adjusted = torch.linalg.solve(mom2_update_weight * c + k @ k.T, k)  # (λC + KKᵀ)⁻¹ K, [in, n]
    return r @ adjusted.T


def mean_keys(keys: torch.Tensor, texts: int) -> torch.Tensor:
    """Per request, MEMIT's key: the mean of the prompt alone's key and of the prefixed prompts' mean
    (``compute_ks`` averages within each group of context templates, then over the groups).

    ``keys`` ``[n * texts, in]``, request-major with the prompt alone first.
    """
    grouped = keys.reshape(-1, texts, keys.shape[-1])
    if texts == 1:
        return grouped[:, 0]
    return (grouped[:, 0] + grouped[:, 1:].mean(1)) / 2


def spread_over_layers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    arch: Architecture,
    requests: Sequence[EditRequest],
    layers: list[int],
    targets: torch.Tensor,
    solve: Solver,
    *,
    prefixes: Sequence[str],
    final_keys: bool = False,
) -> LayerUpdates:
    """MEMIT's loop over ``layers`` (sorted): keys and residuals on the model holding the updates so far,
    ``solve`` for ΔW_l, applied before the next layer. The model is restored on return."""
    texts = 1 + len(prefixes)
    z_module = arch.block_name(layers[-1])
    sequences = key_sequences(tokenizer, requests, prefixes)
    bare = list(range(0, len(sequences), texts))
    deltas, keys_at, residuals = {}, {}, {}
    finals: dict[int, torch.Tensor] = {}
    with original_weights(model, [arch.weight_name(layer) for layer in layers]):
        for i, layer in enumerate(layers):
            module = arch.rewrite_name(layer)
            read = read_at_lookups(model, tokenizer, sequences, [(module, IN), (z_module, OUT)])
            keys = mean_keys(read[(module, IN)], texts)
            residual = targets - read[(z_module, OUT)][bare]
            delta = solve(layer, i, keys, residual / (len(layers) - i))
            weight = model.get_parameter(arch.weight_name(layer))
            deltas[arch.weight_name(layer)] = to_parameter_layout(delta.to(weight.dtype), arch)
            apply_deltas(model, {arch.weight_name(layer): deltas[arch.weight_name(layer)]})
            keys_at[layer], residuals[layer] = keys, residual
        if final_keys:
            modules = [arch.rewrite_name(layer) for layer in layers]
            read = read_at_lookups(model, tokenizer, sequences, [(m, IN) for m in modules])
            finals = {
                layer: mean_keys(read[(m, IN)], texts) for layer, m in zip(layers, modules, strict=True)
            }
    return LayerUpdates(deltas=deltas, keys=keys_at, residuals=residuals, final_keys=finals)


def layer_moments(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    arch: Architecture,
    layers: list[int],
    covariance: Mapping[int, torch.Tensor] | CovarianceSettings | None,
) -> dict[int, torch.Tensor]:
    """C of each layer: given ({layer: C}), or computed in one pass (cached) from the settings."""
    if isinstance(covariance, Mapping):
        missing = [layer for layer in layers if layer not in covariance]
        if missing:
            raise ValueError(f"no covariance given for layers {missing}")
        return {layer: covariance[layer] for layer in layers}
    modules = [arch.rewrite_name(layer) for layer in layers]
    found = second_moments(model, tokenizer, modules, covariance or CovarianceSettings())
    return {layer: found[m] for layer, m in zip(layers, modules, strict=True)}


def memit_edit(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Iterable[RequestLike],
    layers: Sequence[int],
    *,
    mom2_update_weight: float = MOM2_UPDATE_WEIGHT,
    covariance: Mapping[int, torch.Tensor] | CovarianceSettings | None = None,
    values: ValueSettings = ValueSettings(),
    prefixes: Sequence[str] = CONTEXT_PREFIXES,
    value_cache: ValueCache | None = None,
) -> MemitResult:
    """The MEMIT update writing all ``requests`` into ``layers`` (EasyEdit's LLaMA-7B: 4 to 8). The model
    is left unchanged.

    Args:
        mom2_update_weight: λ, the weight of the preserved keys' second moment.
        covariance: {layer: C}, or how to compute every C (default: the shipped WikiText sample, cached).
        values: the z optimisation's settings.
        prefixes: the context prefixes (the prompt alone always comes first).
        value_cache: where each z is kept between runs (``value_cache``); None: not kept.
    """
    arch = architecture_of(model)
    layers = check_layers(model, layers, arch)
    requests = as_requests(requests)
    moments = layer_moments(model, tokenizer, arch, layers, covariance)
    found = optimise_values(
        model,
        tokenizer,
        requests,
        arch.block_name(layers[-1]),
        prefixes=prefixes,
        settings=values,
        cache=value_cache,
    )

    def solve(layer: int, i: int, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return memit_update(residual, keys, moments[layer], mom2_update_weight)

    done = spread_over_layers(
        model, tokenizer, arch, requests, layers, found.target, solve, prefixes=prefixes
    )
    return MemitResult(
        deltas=done.deltas,
        layers=layers,
        targets=found.target,
        keys=done.keys,
        residuals=done.residuals,
        values=found,
    )
