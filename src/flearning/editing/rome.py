"""ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT"): one fact written into
one layer's MLP output projection by a rank-one update.

For a request (prompt, subject, target_new) at ``layer`` (kmeng01/rome ``rome/rome_main.py``,
``compute_u.py``, ``compute_v.py``):

1. k* = the mean, over the prompt alone and after each context prefix, of the edited module's input at
   the subject's last token (``compute_u``, ``fact_token: subject_last``);
2. u = C⁻¹ k* with C = E[k kᵀ] over a corpus (``mom2_adjustment``; u = k* without it, as EasyEdit's
   ``hparams/ROME/llama-7b.yaml`` sets);
3. v* = the MLP output at the subject's last token of the prompt alone, plus the δ of ``values``
   (``compute_v``: Adam on NLL + KL + weight decay, clamped);
4. ΔW = (v* − W k − b) uᵀ / (uᵀ k), with k and W k + b the edited module's input and output at the
   subject's last token of the prompt alone. Then (W + ΔW) k + b = v* exactly.

Step 4 is what ``compute_v`` computes (``right_vector = (target - cur_output) / dot(cur_input,
left_vector)``, ``cur_input`` taken from ``request["prompt"]`` alone). The paper's eq. 2 writes the
same closed form with k* in both places, Λ = (v* − W k*) / ((C⁻¹k*)ᵀ k*); ``rome_update`` computes
either, and the code's choice is kept because v* is the output at the prompt alone.

Deviations from the reference: fixed context prefixes instead of texts sampled from the model
(``requests.CONTEXT_PREFIXES``), C from a local corpus (``covariance``), and the target tokenised as
``prompt + " " + target_new`` by the project's ``encode_pair``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flearning.editing.architectures import architecture_of, check_layers, to_parameter_layout
from flearning.editing.covariance import CovarianceSettings, second_moment
from flearning.editing.deltas import add_delta, apply_deltas, original_weights
from flearning.editing.requests import CONTEXT_PREFIXES, EditRequest, as_request, as_requests, key_sequences
from flearning.editing.tracing import IN, OUT, read_at_lookups
from flearning.editing.value_cache import ValueCache
from flearning.editing.values import Values, ValueSettings, optimise_values

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from flearning.data.records import KnowledgeRecord

    RequestLike = EditRequest | KnowledgeRecord | Mapping[str, Any]


@dataclass(frozen=True)
class RomeResult:
    """``deltas``: {parameter name: ΔW} in the parameter's layout. ``key``/``output`` are the edited
    module's input and output at the subject of the prompt alone, ``key_mean`` k* (averaged over the
    context prefixes), ``u`` C⁻¹k* (or k*), ``value`` v*; all float32, on the model's device."""

    deltas: dict[str, torch.Tensor]
    layer: int
    key: torch.Tensor
    key_mean: torch.Tensor
    output: torch.Tensor
    u: torch.Tensor
    value: torch.Tensor
    values: Values


def rome_update(residual: torch.Tensor, key: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """ROME's closed form ΔW = residual uᵀ / (uᵀ key), ``[out, in]`` in float64: the rank-one update
    with (W + ΔW) key = W key + residual that changes W x least for keys distributed as C when
    u = C⁻¹ key (paper, eq. 2)."""
    residual, key, u = residual.double(), key.double(), u.double()
    return residual[:, None] * u[None, :] / (u @ key)


def rome_edit(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    request: RequestLike,
    layer: int,
    *,
    covariance: torch.Tensor | CovarianceSettings | None = None,
    mom2_adjustment: bool = True,
    values: ValueSettings = ValueSettings(),
    prefixes: Sequence[str] = CONTEXT_PREFIXES,
    value_cache: ValueCache | None = None,
) -> RomeResult:
    """The ROME update writing ``request`` into ``layer`` (the paper edits layer 17 of GPT-2 XL, EasyEdit
    layer 5 of LLaMA-7B). The model is left unchanged.

    Args:
        covariance: C of the layer's keys (``[in, in]``), or how to compute it (default: the shipped
            WikiText sample, cached); unused without ``mom2_adjustment``.
        mom2_adjustment: u = C⁻¹k* (ROME's default); False: u = k* (EasyEdit's LLaMA setting).
        values: the v* optimisation's settings.
        prefixes: the context prefixes (the prompt alone always comes first).
        value_cache: where v* is kept between runs (``value_cache``); None: not kept.
    """
    import torch

    arch = architecture_of(model)
    (layer,) = check_layers(model, [layer], arch)
    request = as_request(request)
    module = arch.rewrite_name(layer)

    texts = 1 + len(prefixes)
    read = read_at_lookups(
        model, tokenizer, key_sequences(tokenizer, [request], prefixes), [(module, IN), (module, OUT)]
    )
    keys = read[(module, IN)]
    key, key_mean, output = keys[0], keys[:texts].mean(0), read[(module, OUT)][0]
    if mom2_adjustment:
        c = (
            covariance
            if isinstance(covariance, torch.Tensor)
            else _moment(model, tokenizer, module, covariance)
        )
        u = torch.linalg.solve(c.to(key.device, torch.float64), key_mean.double())
    else:
        u = key_mean.double()

    found = optimise_values(
        model,
        tokenizer,
        [request],
        arch.mlp_name(layer),
        prefixes=prefixes,
        settings=values,
        cache=value_cache,
    )
    value = found.target[0]
    weight = model.get_parameter(arch.weight_name(layer))
    delta = rome_update(value - output, key, u).to(weight.dtype)
    return RomeResult(
        deltas={arch.weight_name(layer): to_parameter_layout(delta, arch)},
        layer=layer,
        key=key,
        key_mean=key_mean,
        output=output,
        u=u.float(),
        value=value,
        values=found,
    )


def rome_edits(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Iterable[RequestLike],
    layer: int,
    *,
    covariance: torch.Tensor | CovarianceSettings | None = None,
    mom2_adjustment: bool = True,
    values: ValueSettings = ValueSettings(),
    prefixes: Sequence[str] = CONTEXT_PREFIXES,
    value_cache: ValueCache | None = None,
) -> tuple[dict[str, torch.Tensor], list[RomeResult]]:
    """Several requests one after the other (``apply_rome_to_model``): each is computed on the model
    holding the earlier ones. Returns the summed update and each request's result; the model is left
    unchanged. C is computed once, on the model as given."""
    import torch

    arch = architecture_of(model)
    (layer,) = check_layers(model, [layer], arch)
    requests = as_requests(requests)
    if mom2_adjustment and not isinstance(covariance, torch.Tensor):
        covariance = _moment(model, tokenizer, arch.rewrite_name(layer), covariance)
    total: dict[str, torch.Tensor] = {}
    results = []
    with original_weights(model, [arch.weight_name(layer)]):
        for request in requests:
            result = rome_edit(
                model,
                tokenizer,
                request,
                layer,
                covariance=covariance,
                mom2_adjustment=mom2_adjustment,
                values=values,
                prefixes=prefixes,
                value_cache=value_cache,
            )
            apply_deltas(model, result.deltas)
            for name, delta in result.deltas.items():
                add_delta(total, name, delta)
            results.append(result)
    return total, results


def _moment(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    module: str,
    settings: CovarianceSettings | None,
) -> torch.Tensor:
    return second_moment(model, tokenizer, module, settings or CovarianceSettings())
