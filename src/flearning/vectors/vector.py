"""``KnowledgeVector``: Δ = FT(θ, K) − θ as named fp32 tensors, with its provenance.

Keys are ``named_parameters()`` names of the plain (non-peft) model, so a tied embedding/lm_head is one
key. A vector may cover a subset of the parameters, each with the model's shape. F-Learning's forgetting
step θ' = θ − λ·Δ_old is ``forget(model, vector, lam)`` (or ``vector.apply_to(model, -lam)``). Every
constructor drops tensors that are exactly zero (``drop_zero=True``; lossless, the names are recorded):
pass ``drop_zero=False`` to keep them, e.g. to add vectors whose frozen sets differ.
"""

from __future__ import annotations

import logging
import math
import operator
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flearning.errors import format_names
from flearning.sharding import abs_max, gathered, is_dtensor
from flearning.vectors import ops
from flearning.vectors.metadata import (
    ALL_ZERO,
    Kind,
    Provenance,
    VectorMetadata,
    build_metadata,
    now,
    parse_metadata,
)
from flearning.vectors.ops import VectorError

if TYPE_CHECKING:
    from pathlib import Path

    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VectorStats:
    """Summary numbers of a vector."""

    num_tensors: int
    num_params: int
    norm: float
    max_abs: float
    rms: float


class KnowledgeVector:
    """Named fp32 deltas with metadata, and the algebra of task vectors (``-v``, ``v + w``, ``s * v``).

    Args:
        deltas: parameter name → delta (converted to contiguous fp32 on the CPU).
        metadata: provenance; ``base_fingerprint`` lets ``apply_to`` refuse another base model.
    """

    def __init__(self, deltas: Mapping[str, torch.Tensor], metadata: VectorMetadata) -> None:
        import torch

        if not deltas:
            raise VectorError("a knowledge vector needs at least one tensor")
        tensors: dict[str, torch.Tensor] = {}
        for key, tensor in deltas.items():
            if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
                raise VectorError(f"{key!r}: expected a str name and a tensor, got {type(tensor).__name__}")
            if not tensor.is_floating_point():
                raise VectorError(f"{key}: delta must be floating point, got {tensor.dtype}")
            tensors[key] = tensor.detach().to("cpu", torch.float32).contiguous()
        self.deltas: dict[str, torch.Tensor] = tensors
        self.metadata = metadata

    # -- constructors -------------------------------------------------------------------------------

    @classmethod
    def from_deltas(
        cls,
        deltas: Mapping[str, torch.Tensor],
        provenance: Provenance | None = None,
        *,
        kind: Kind = "full",
        drop_zero: bool = True,
    ) -> KnowledgeVector:
        """A vector from deltas computed elsewhere (e.g. θ* − θ kept during a recipe).

        Second names of tied tensors are dropped (keeping the first), as ``named_parameters()`` does.
        ``provenance`` is recorded as given (``base_fingerprint`` is checked by ``apply_to``); ``kind`` is
        "full", "lora" or "mixed"; ``drop_zero`` leaves out tensors that are exactly zero.
        """
        return cls._build(dict(ops.dedupe_shared(deltas)), provenance, kind=kind, drop_zero=drop_zero)

    @classmethod
    def from_state_dicts(
        cls,
        base: Mapping[str, torch.Tensor],
        finetuned: Mapping[str, torch.Tensor],
        provenance: Provenance | None = None,
        *,
        kind: Kind = "full",
        drop_zero: bool = True,
    ) -> KnowledgeVector:
        """Δ = finetuned − base over two state dicts with exactly the same keys and shapes.

        Second names of tied tensors (``lm_head.weight`` aliasing the embedding in a live
        ``state_dict()``) are dropped from both, keeping the first name as ``named_parameters()`` does.
        ``provenance``, ``kind`` and ``drop_zero`` as for ``from_deltas``.
        """
        deltas = ops.difference(*_untie(base, finetuned))
        return cls._build(deltas, provenance, kind=kind, drop_zero=drop_zero)

    @classmethod
    def from_models(
        cls,
        base: torch.nn.Module,
        finetuned: torch.nn.Module,
        provenance: Provenance | None = None,
        *,
        drop_zero: bool = True,
    ) -> KnowledgeVector:
        """Δ = finetuned − base over ``named_parameters()`` (tied weights once), in fp32; kind "full".

        Args:
            base: θ, a plain (non-peft) model.
            finetuned: FT(θ), same architecture.
            provenance: recorded; by default base model ``base.config._name_or_path`` (if set), method
                "ft" and fingerprint ``model_fingerprint(base)``.
            drop_zero: leave out tensors whose delta is exactly zero (frozen parameters).
        """
        from flearning.models import model_fingerprint

        deltas = ops.difference(dict(base.named_parameters()), dict(finetuned.named_parameters()))
        provenance = (provenance or Provenance()).with_defaults(
            base_model=lambda: name_or_path(base),
            base_fingerprint=lambda: model_fingerprint(base),
            method="ft",
        )
        return cls._build(deltas, provenance, kind="full", drop_zero=drop_zero)

    @classmethod
    def from_lora(
        cls,
        peft_model: torch.nn.Module,
        adapter_name: str = "default",
        provenance: Provenance | None = None,
        *,
        drop_zero: bool = True,
    ) -> KnowledgeVector:
        """Δ = B·A·scaling per adapted linear layer, keyed by the base parameter name; kind "lora".

        Args:
            peft_model: a ``PeftModel`` (or ``LoraModel``) with a plain LoRA adapter on linear layers.
            adapter_name: the adapter to read.
            provenance: recorded; by default base model the wrapped model's ``_name_or_path``, method
                "lora", and the fingerprint of the base weights under the wrapper (which equals
                ``model_fingerprint(θ)`` taken before wrapping). The adapter's LoRA settings are added to
                the hyperparameters under "lora".
            drop_zero: leave out layers whose B·A is exactly zero (an untrained adapter).
        """
        from flearning.vectors import lora

        deltas = lora.lora_deltas(peft_model, adapter_name)
        provenance = (provenance or Provenance()).with_defaults(
            base_model=lambda: name_or_path(lora.unwrap_peft(peft_model)),
            base_fingerprint=lambda: lora.base_fingerprint(peft_model),
            method="lora",
        )
        settings = {**lora.lora_hyperparameters(peft_model, adapter_name), **provenance.hyperparameters}
        return cls._build(deltas, provenance, kind="lora", drop_zero=drop_zero, hyperparameters=settings)

    @classmethod
    def _build(
        cls,
        deltas: dict[str, torch.Tensor],
        provenance: Provenance | None,
        *,
        kind: Kind,
        drop_zero: bool,
        hyperparameters: Mapping[str, Any] | None = None,
    ) -> KnowledgeVector:
        dropped: list[str] = []
        if drop_zero:
            deltas, dropped = ops.drop_zero(deltas)
            if not deltas:
                raise VectorError(ALL_ZERO)
        metadata = build_metadata(
            provenance, kind=kind, dropped_zero=dropped, hyperparameters=hyperparameters
        )
        return cls(deltas, metadata)

    # -- container protocol ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.deltas)

    def __iter__(self) -> Iterator[str]:
        return iter(self.deltas)

    def __contains__(self, key: object) -> bool:
        return key in self.deltas

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.deltas[key]

    def keys(self) -> list[str]:
        return list(self.deltas)

    @property
    def num_params(self) -> int:
        """Number of scalar entries over all tensors."""
        return sum(t.numel() for t in self.deltas.values())

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"KnowledgeVector(kind={m.kind!r}, tensors={len(self)}, params={self.num_params}, "
            f"norm={self.norm():.4g}, base={m.base_model!r})"
        )

    # -- algebra ----------------------------------------------------------------------------------------

    def _derived(self, deltas: dict[str, torch.Tensor], step: str, **updates: Any) -> KnowledgeVector:
        meta = self.metadata.model_copy(
            update={"history": [*self.metadata.history, step], "created": now(), **updates}
        )
        return KnowledgeVector(deltas, meta)

    def __neg__(self) -> KnowledgeVector:
        return self._derived({k: -t for k, t in self.deltas.items()}, "negate")

    def __mul__(self, scale: object) -> KnowledgeVector:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            return NotImplemented
        s = ops.check_scalar(scale, "scale")
        return self._derived({k: t * s for k, t in self.deltas.items()}, f"scale {s!r}")

    __rmul__ = __mul__

    def __truediv__(self, scale: object) -> KnowledgeVector:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            return NotImplemented
        s = ops.check_scalar(scale, "divisor")
        if s == 0:
            raise VectorError("cannot divide a knowledge vector by zero")
        return self._derived({k: t / s for k, t in self.deltas.items()}, f"divide {s!r}")

    def _check_compatible(self, other: KnowledgeVector) -> None:
        a, b = self.metadata.base_fingerprint, other.metadata.base_fingerprint
        if a != b:
            raise VectorError(
                f"the vectors come from different base models (fingerprints {a} and {b}; "
                f"bases {self.metadata.base_model!r} and {other.metadata.base_model!r})"
            )
        ops.check_same_layout(self.deltas, other.deltas, names=("the first vector", "the second vector"))

    def _combined(self, other: KnowledgeVector, op: Callable[[Any, Any], Any], step: str) -> KnowledgeVector:
        """``op`` of the two vectors key by key; the kind is "mixed" and the data hash None where they
        differ."""
        self._check_compatible(other)
        kind = self.metadata.kind if self.metadata.kind == other.metadata.kind else "mixed"
        data_hash = self.metadata.data_hash if self.metadata.data_hash == other.metadata.data_hash else None
        deltas = {k: op(t, other.deltas[k]) for k, t in self.deltas.items()}
        return self._derived(deltas, f"{step} ({_describe(other)})", kind=kind, data_hash=data_hash)

    def __add__(self, other: object) -> KnowledgeVector:
        if not isinstance(other, KnowledgeVector):
            return NotImplemented
        return self._combined(other, operator.add, "add")

    def __radd__(self, other: object) -> KnowledgeVector:
        if isinstance(other, int) and other == 0:  # lets sum([v, w]) work
            return self
        return NotImplemented

    def __sub__(self, other: object) -> KnowledgeVector:
        if not isinstance(other, KnowledgeVector):
            return NotImplemented
        return self._combined(other, operator.sub, "subtract")

    # -- numbers ----------------------------------------------------------------------------------------

    def norm(self) -> float:
        """The L2 norm of all deltas together."""
        return ops.global_norm(self.deltas.values())

    def tensor_norms(self) -> dict[str, float]:
        """name → L2 norm of that tensor's delta, in key order."""
        return {k: ops.global_norm([t]) for k, t in self.deltas.items()}

    def stats(self) -> VectorStats:
        """Count, norm, largest magnitude and root mean square of the deltas."""
        n = self.num_params
        norm = self.norm()
        max_abs = max(abs_max(t) for t in self.deltas.values() if t.numel()) if n else 0.0
        return VectorStats(len(self), n, norm, max_abs, norm / math.sqrt(n) if n else 0.0)

    # -- applying -----------------------------------------------------------------------------------------

    def check_fits(self, model: torch.nn.Module, *, check_base: bool = True) -> None:
        """Raise ``VectorError`` unless this vector can be applied to ``model``.

        Args:
            model: a plain (non-peft) model.
            check_base: also require the model's fingerprint to equal the vector's base fingerprint
                (skipped if the vector has none).
        """
        if getattr(model, "peft_config", None) or any(
            ".base_layer." in n for n, _ in model.named_parameters()
        ):
            # Parameter names inside a peft wrapper differ, and live adapters would sit on top anyway.
            raise VectorError(
                "the model carries peft adapters; apply a vector to the plain model "
                "(merge_and_unload() or unload() the adapters first)"
            )
        ops.check_applicable(dict(model.named_parameters()), self.deltas, ops.parameter_aliases(model))
        if check_base and self.metadata.base_fingerprint:
            from flearning.models import model_fingerprint

            actual = model_fingerprint(model)
            if actual != self.metadata.base_fingerprint:
                raise VectorError(
                    f"the vector was computed from another base model: its base "
                    f"{self.metadata.base_model!r} has fingerprint {self.metadata.base_fingerprint}, this "
                    f"model has {actual}. A model already changed by a vector also differs from its base. "
                    "Pass check_base=False (CLI: --no-check-base) to apply it anyway."
                )

    def apply_to(
        self, model: torch.nn.Module, lam: float = 1.0, *, check_base: bool = True
    ) -> torch.nn.Module:
        """θ ← θ + lam·Δ in place; forgetting is a negative ``lam``.

        All new tensors are computed (in fp32, cast back to each parameter's dtype) and checked to be
        finite before any is written, so on an error the model is unchanged. Memory: one extra copy of
        the touched parameters while applying.

        Args:
            model: a plain (non-peft) model whose parameters include every key of the vector.
            lam: the finite scale λ.
            check_base: refuse a model whose fingerprint differs from the vector's base fingerprint.

        Returns:
            The same model, updated.
        """
        return self._apply(model, ops.check_scalar(lam, "lambda"), check_base=check_base)

    def _apply(self, model: torch.nn.Module, lam: float, *, check_base: bool) -> torch.nn.Module:
        """``apply_to`` with ``lam`` already checked (λ is checked once, where it enters)."""
        import torch

        self.check_fits(model, check_base=check_base)
        params = dict(model.named_parameters())
        new_values = ops.updated_values(params, self.deltas, lam)
        with torch.no_grad():
            for key, value in new_values.items():
                params[key].copy_(value)
        log.debug("applied %s with lambda=%s to %d tensors", self, lam, len(new_values))
        return model

    # -- FSDP2 ---------------------------------------------------------------------------------------------

    @property
    def sharded(self) -> bool:
        """Whether the deltas are FSDP2 shards (each process holds its rows; see ``consolidated``)."""
        return any(is_dtensor(t) for t in self.deltas.values())

    def consolidated(self) -> KnowledgeVector | None:
        """The whole vector on the main process, gathered one tensor at a time (every process must call
        it); None on the other processes. A vector of whole tensors is returned as it is."""
        if not self.sharded:
            return self
        whole = dict(gathered(self.deltas.items()))
        return type(self)(whole, self.metadata) if whole else None

    # -- files ------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``path/vector.safetensors`` and ``path/vector.json`` atomically.

        Args:
            path: the directory to create; must not exist or be empty unless ``overwrite``.
            overwrite: replace an existing non-empty directory.

        Returns:
            The directory.
        """
        from flearning.vectors.files import save_vector

        return save_vector(self.deltas, self.metadata.model_dump(mode="json"), path, overwrite=overwrite)

    def save_sharded(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path | None:
        """Write the vector in the sharded format: one safetensors file per decoder block and one for the
        other tensors (``files.save_sharded_vector``; read by ``load``, ``flearn vector`` and streaming
        apply like a vector ``vectors.streaming`` wrote).

        Under FSDP2 (``sharded``) every process must call it: each group is gathered onto the main
        process, written and let go before the next, so the main process never holds the whole vector;
        a failure on the main process is raised on every process once all have taken part in every
        gather. Otherwise it is written from the whole tensors, by whoever calls it.

        Args:
            path: the directory to create; must not exist or be empty unless ``overwrite``.
            overwrite: replace an earlier knowledge vector there.

        Returns:
            The directory (None on the processes that are not the main one).
        """
        from flearning.distributed import MainProcessFailed, is_main_process, same_on_every_process
        from flearning.vectors.files import block_groups, save_sharded_vector

        groups = block_groups(self.deltas)
        meta = self.metadata.model_dump(mode="json")
        if not self.sharded:
            parts = ({k: self.deltas[k] for k in names} for names in groups)
            return save_sharded_vector(parts, meta, path, order=list(self.deltas), overwrite=overwrite)
        # one group at a time: the main process gets each group whole, the others an empty dict
        parts = (dict(gathered((k, self.deltas[k]) for k in names)) for names in groups)
        written, error = None, None
        if is_main_process():
            try:
                written = save_sharded_vector(parts, meta, path, order=list(self.deltas), overwrite=overwrite)
            except Exception as ex:  # the others are still gathering: take part to the end, then tell them
                error = ex
        for _ in parts:  # the other processes (and the main one after a failure) finish every gather
            pass
        failed = same_on_every_process(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if failed is not None:
            raise MainProcessFailed(
                f"the main process failed to write the vector, so this one stops: {failed}"
            )
        return written

    @classmethod
    def load(cls, path: str | os.PathLike) -> KnowledgeVector:
        """Read a vector directory written by ``save`` (safetensors only), verifying keys, shapes and checksum.

        Args:
            path: the directory.

        Returns:
            The vector.
        """
        from flearning.vectors.files import load_vector

        deltas, meta = load_vector(path)
        return cls(deltas, parse_metadata(path, meta))


def forget(
    model: torch.nn.Module, vector: KnowledgeVector, lam: float, *, check_base: bool = True
) -> torch.nn.Module:
    """F-Learning's forgetting step θ' = θ − lam·Δ_old, in place.

    Args:
        model: θ, the model the vector was computed from.
        vector: Δ_old.
        lam: how much to forget (the paper uses 0.1–3).
        check_base: refuse a model that is not the vector's base.

    Returns:
        The same model, updated.
    """
    return vector._apply(model, -ops.check_scalar(lam, "lambda"), check_base=check_base)


def save_difference_sharded(
    finetuned: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    provenance: Provenance | None,
    path: str | os.PathLike,
    *,
    kind: Kind = "full",
    overwrite: bool = False,
) -> Path:
    """Δ = finetuned − base in the sharded format, computed and written a block at a time: the files of
    ``KnowledgeVector.from_deltas(Δ, provenance, kind=kind).save_sharded(path)`` (same values, zero
    tensors dropped and named), without ever holding the whole Δ.

    Args:
        finetuned: name → whole tensor (θ*), in parameter order, tied weights once.
        base: name → whole tensor (θ), with every name of ``finetuned``.
        provenance: recorded as given.
        path: the directory to create.
        kind: "full", "lora" or "mixed".
        overwrite: replace an earlier knowledge vector there.

    Returns:
        The directory.
    """
    from flearning.vectors.files import block_groups, save_sharded_vector

    dropped: list[str] = []

    def parts() -> Iterator[dict[str, torch.Tensor]]:
        for names in block_groups(finetuned):
            # the expression of update's consolidated θ* − θ
            kept, zero = ops.drop_zero({k: finetuned[k].detach().float() - base[k].float() for k in names})
            dropped.extend(zero)
            yield {k: t.to("cpu").contiguous() for k, t in kept.items()}
            del kept  # before the next group is computed: one group at a time

    def metadata() -> dict[str, Any]:
        if len(dropped) == len(finetuned):
            raise VectorError(ALL_ZERO)
        zero = set(dropped)  # named in parameter order, as from_deltas does
        return build_metadata(
            provenance, kind=kind, dropped_zero=[k for k in finetuned if k in zero]
        ).model_dump(mode="json")

    return save_sharded_vector(parts(), metadata, path, order=list(finetuned), overwrite=overwrite)


def name_or_path(model: torch.nn.Module) -> str | None:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return str(name) if name else None


def _untie(
    base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Drop second names of tied tensors from both state dicts (a saved file often omits them anyway);
    a name tied in one and independent in the other is a real difference and an error."""
    base_d, ft_d = ops.dedupe_shared(base), ops.dedupe_shared(finetuned)
    tied = (set(base) - set(base_d)) | (set(finetuned) - set(ft_d))
    mixed = sorted(k for k in tied if k in base_d or k in ft_d)
    if mixed:
        raise VectorError(
            "tied in one state dict and an independent tensor in the other:" + format_names(mixed)
        )
    return base_d, ft_d


def _describe(vector: KnowledgeVector) -> str:
    m = vector.metadata
    return f"kind={m.kind}, method={m.method}, created={m.created}"
