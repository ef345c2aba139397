"""AlphaEdit (Fang et al., ICLR 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing for Language
Models"): MEMIT's update projected onto the null space of the preserved keys.

The preserved keys K0 are summarised by C = E[k kᵀ] (the same second moment as MEMIT's). P projects onto
the span of C's eigenvectors whose eigenvalues are below ``nullspace_threshold`` (jianghoucheng/AlphaEdit
``experiments/evaluate.py::get_project``: an SVD of C, singular values below the threshold, P = U Uᵀ;
here ``eigh``, the same for a symmetric positive semi-definite C). Then, per layer, in MEMIT's loop
(``AlphaEdit/AlphaEdit_main.py``; the z optimisation, keys and residuals as ``memit``):

    ΔWᵀ = (P (K Kᵀ + K_p K_pᵀ) + α I)⁻¹ P K Rᵀ          (α: ``L2``; K_p K_pᵀ: the keys of earlier edits)

which is the paper's closed form ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹ transposed (P is symmetric).
ΔW = (stuff) P, so ΔW k0 ≈ 0 for a preserved key: P k0 is small when k0 lies where C is large. Note
that C enters only through P: the solve has no λC term.

Sequential editing: the reference keeps ``cache_c``, the running Σ K Kᵀ of every earlier batch's keys
(recomputed on the edited model after all layers are updated). ``alphaedit_edit`` takes it as
``previous_keys`` and returns it updated as ``keys_moment``; one batch on its own needs neither.

Defaults: ``nullspace_threshold`` 2e-2 and ``L2`` 10 and the z optimisation of AlphaEdit's
``hparams/AlphaEdit/Llama3-8B.json`` (v_lr 0.1, v_weight_decay 0.5, clamp_norm_factor 0.75; EasyEdit's
``llama3-8b.yaml`` uses L2 = 1). The threshold is absolute, so it depends on the scale of the model's
keys. Deviations as ``memit``'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flearning.editing.architectures import architecture_of, check_layers
from flearning.editing.covariance import CovarianceSettings
from flearning.editing.memit import layer_moments, spread_over_layers
from flearning.editing.requests import CONTEXT_PREFIXES, EditRequest, as_requests
from flearning.editing.value_cache import ValueCache
from flearning.editing.values import Values, ValueSettings, optimise_values
from flearning.errors import FlearnError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from flearning.data.records import KnowledgeRecord

    RequestLike = EditRequest | KnowledgeRecord | Mapping[str, Any]

NULLSPACE_THRESHOLD = 2e-2
L2 = 10.0
ALPHAEDIT_VALUES = ValueSettings(lr=1e-1, weight_decay=0.5, clamp_norm_factor=0.75)


@dataclass(frozen=True)
class AlphaEditResult:
    """``deltas``: {parameter name: ΔW} in the parameter's layout; ``projections`` P per layer;
    ``keys_moment`` per layer: ``previous_keys`` + K Kᵀ of this batch's keys on the edited model (pass it
    to the next batch, after applying these deltas)."""

    deltas: dict[str, torch.Tensor]
    layers: list[int]
    targets: torch.Tensor
    keys: dict[int, torch.Tensor]
    residuals: dict[int, torch.Tensor]
    projections: dict[int, torch.Tensor]
    keys_moment: dict[int, torch.Tensor]
    values: Values


def null_space_projection(covariance: torch.Tensor, threshold: float = NULLSPACE_THRESHOLD) -> torch.Tensor:
    """P = U Uᵀ over the eigenvectors U of C with eigenvalues below ``threshold``, ``[in, in]`` float64.

    Raises:
        FlearnError: no eigenvalue is below the threshold (every update would be zero).
    """
    import torch

    eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
    small = eigenvalues < threshold
    if not bool(small.any()):
        raise FlearnError(
            f"AlphaEdit: no eigenvalue of the key covariance is below nullspace_threshold {threshold:g} (the "
            f"smallest is {float(eigenvalues[0]):.3g}), so the null space is empty and no edit can be "
            "written: raise the threshold"
        )
    u = eigenvectors[:, small]
    return u @ u.T


def alphaedit_update(
    residuals: torch.Tensor,
    keys: torch.Tensor,
    projection: torch.Tensor,
    previous_keys: torch.Tensor | None = None,
    l2: float = L2,
) -> torch.Tensor:
    """ΔW ``[out, in]`` float64 from ``residuals`` ``[n, out]`` and ``keys`` ``[n, in]`` (rows: requests),
    solving (P (K Kᵀ + K_p K_pᵀ) + α I) X = P K Rᵀ as ``AlphaEdit_main.py`` does; ΔW = Xᵀ."""
    import torch

    k = keys.double().T  # [in, n]
    r = residuals.double().T  # [out, n]
    p = projection.to(k.device, torch.float64)
    moment = k @ k.T
    if previous_keys is not None:
        moment = moment + previous_keys.to(k.device, torch.float64)
    eye = torch.eye(k.shape[0], dtype=torch.float64, device=k.device)
    x = torch.linalg.solve(p @ moment + l2 * eye, p @ k @ r.T)  # [in, out]
    return x.T


def alphaedit_edit(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Iterable[RequestLike],
    layers: Sequence[int],
    *,
    nullspace_threshold: float = NULLSPACE_THRESHOLD,
    l2: float = L2,
    covariance: Mapping[int, torch.Tensor] | CovarianceSettings | None = None,
    projections: Mapping[int, torch.Tensor] | None = None,
    previous_keys: Mapping[int, torch.Tensor] | None = None,
    values: ValueSettings = ALPHAEDIT_VALUES,
    prefixes: Sequence[str] = CONTEXT_PREFIXES,
    value_cache: ValueCache | None = None,
) -> AlphaEditResult:
    """The AlphaEdit update writing all ``requests`` into ``layers`` (AlphaEdit's Llama3-8B: 4 to 8). The
    model is left unchanged.

    Args:
        nullspace_threshold: eigenvalues of C below it span the null space (absolute).
        l2: α, the ridge term.
        covariance: {layer: C}, or how to compute every C (default: the shipped WikiText sample, cached);
            not needed when ``projections`` are given.
        projections: {layer: P} computed earlier (P depends only on C and the threshold).
        previous_keys: {layer: Σ K Kᵀ} of earlier batches (a previous result's ``keys_moment``).
        values: the z optimisation's settings.
        prefixes: the context prefixes (the prompt alone always comes first).
        value_cache: where each z is kept between runs (``value_cache``); None: not kept.
    """
    import torch

    arch = architecture_of(model)
    layers = check_layers(model, layers, arch)
    requests = as_requests(requests)
    if projections is None:
        moments = layer_moments(model, tokenizer, arch, layers, covariance)
        projections = {layer: null_space_projection(moments[layer], nullspace_threshold) for layer in layers}
    else:
        projections = {layer: projections[layer] for layer in layers}
    previous = dict(previous_keys or {})
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
        return alphaedit_update(residual, keys, projections[layer], previous.get(layer), l2)

    done = spread_over_layers(
        model, tokenizer, arch, requests, layers, found.target, solve, prefixes=prefixes, final_keys=True
    )
    moment = {}
    for layer in layers:
        k = done.final_keys[layer].double().T
        before = previous.get(layer)
        moment[layer] = k @ k.T + (before.to(k.device, torch.float64) if before is not None else 0)
    return AlphaEditResult(
        deltas=done.deltas,
        layers=layers,
        targets=found.target,
        keys=done.keys,
        residuals=done.residuals,
        projections=projections,
        keys_moment=moment,
        values=found,
    )
