"""Where streamed deltas come from: a knowledge-vector directory or a PEFT LoRA adapter directory.

A ``DeltaSource`` gives Δ for a set of parameter names a block of rows at a time, in fp32, and checks its
files against their recorded checksums. The LoRA math and config handling are ``vectors.lora``'s.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from flearning.errors import format_names
from flearning.io.safetensors import Checkpoint, TensorEntry, open_checkpoint, read_block, read_shard_header
from flearning.vectors import files as vio
from flearning.vectors import lora
from flearning.vectors.metadata import VectorMetadata, parse_metadata
from flearning.vectors.ops import VectorError
from flearning.vectors.streaming.names import (
    Architecture,
    architecture_of,
    check_applicable,
    model_parameters,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class DeltaSource:
    """Δ for a set of parameter names, produced a block of rows at a time in fp32."""

    description: str = ""
    metadata: VectorMetadata | None = None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """canonical parameter name → shape of Δ."""
        raise NotImplementedError

    def block(self, name: str, block: tuple[int, int] | None) -> torch.Tensor:
        """Rows ``block`` of Δ[name] in fp32."""
        raise NotImplementedError

    def verify(self) -> None:
        """Check the files against their recorded checksums (before anything is written)."""

    def provenance(self) -> dict[str, Any]:
        return {}


class VectorFiles(DeltaSource):
    """A knowledge-vector directory (one file or sharded, written by ``KnowledgeVector.save`` or
    ``stream_difference``), read lazily."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path, record = vio.read_record(path)
        self.files = vio.tensor_files(self.path, record)
        self.metadata = parse_metadata(self.path, record["metadata"])
        described = record["tensors"]
        weight_map = record.get("weight_map") or dict.fromkeys(described, vio.TENSORS_FILE)
        self.entries: dict[str, TensorEntry] = {}
        problems: list[str] = []
        for name in self.files:
            for entry in read_shard_header(self.path / name).entries:
                if entry.name in self.entries:
                    problems.append(f"{entry.name}: in two files")
                elif entry.name not in described:
                    problems.append(f"{entry.name}: in {name}, not described in {vio.META_FILE}")
                elif weight_map.get(entry.name) != name:
                    problems.append(
                        f"{entry.name}: in {name}, {vio.META_FILE} places it in {weight_map.get(entry.name)}"
                    )
                self.entries[entry.name] = entry
        for key, info in described.items():
            entry = self.entries.get(key)
            shape = info.get("shape") if isinstance(info, dict) else None
            if entry is None:
                problems.append(f"{key}: described in {vio.META_FILE}, missing from {weight_map.get(key)}")
            elif shape != list(entry.shape):
                problems.append(
                    f"{key}: shape {list(entry.shape)} in {entry.file.name}, {shape} in {vio.META_FILE}"
                )
            elif entry.dtype != "F32":
                problems.append(f"{key}: dtype {entry.dtype}, expected F32")
        if problems:
            raise VectorError(
                f"{self.path}: the files do not match ({len(problems)} problems):" + format_names(problems)
            )
        self.order = list(described)
        self.description = f"{self.metadata.kind} vector {self.path}"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.entries[k].shape for k in self.order}

    def block(self, name: str, block: tuple[int, int] | None) -> torch.Tensor:
        return read_block(self.entries[name], block)

    def verify(self) -> None:
        for name, sha in self.files.items():
            vio.verify_checksum(self.path, name, sha)

    def provenance(self) -> dict[str, Any]:
        assert self.metadata is not None
        return {"vector": str(self.path), "vector_metadata": self.metadata.model_dump(mode="json")}


@dataclass
class _LoraLayer:
    a: TensorEntry
    b: TensorEntry
    scaling: float
    fan_in_fan_out: bool
    shape: tuple[int, ...]


_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


class LoraAdapterFiles(DeltaSource):
    """A PEFT LoRA adapter directory: Δ = B·A·scaling per adapted linear layer, computed per block.

    The math, the config checks and the per-layer scaling are ``vectors.lora``'s (``lora_delta``,
    ``read_adapter_config``, ``layer_scaling``), keyed by the base parameter name.

    Args:
        path: the directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
        aliases: the base model's tied names → canonical names (a LoRA on a tied lm_head changes the
            shared embedding, as merging would).
    """

    def __init__(self, path: str | os.PathLike, aliases: Mapping[str, str] | None = None) -> None:
        self.path = lora.check_adapter_dir(path)
        config = self.config = lora.read_adapter_config(self.path)
        aliases = aliases or {}
        parts: dict[str, dict[str, TensorEntry]] = {}
        problems: list[str] = []
        for entry in read_shard_header(self.path / lora.ADAPTER_WEIGHTS).entries:
            match = _LORA_KEY.match(entry.name)
            if match is None:
                problems.append(f"{entry.name}: {lora.key_refusal(entry.name)}")
                continue
            parts.setdefault(match["module"], {})[match["part"]] = entry
        self.layers: dict[str, _LoraLayer] = {}
        for module_key, pair in parts.items():
            module = lora.base_name(module_key)
            if set(pair) != {"A", "B"}:
                problems.append(f"{module}: has lora_{''.join(pair)} only")
                continue
            a, b = pair["A"], pair["B"]
            if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
                problems.append(
                    f"{module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not multiply"
                )
                continue
            r, scaling = lora.layer_scaling(config, module)
            if r != a.shape[0]:
                problems.append(f"{module}: adapter_config gives r={r}, lora_A has {a.shape[0]} rows")
                continue
            shape = (b.shape[0], a.shape[1])
            if config.fan_in_fan_out:
                shape = shape[::-1]
            weight = f"{module}.weight"
            key = aliases.get(weight, weight)
            if key in self.layers:
                problems.append(f"{module}: a second LoRA layer on the tied weight {key}")
                continue
            self.layers[key] = _LoraLayer(a, b, scaling, bool(config.fan_in_fan_out), shape)
        if problems:
            raise VectorError(f"cannot apply adapter {self.path}:" + format_names(problems))
        if not self.layers:
            raise VectorError(f"adapter {self.path} adapts no linear layer")
        self._cached: tuple[str, torch.Tensor, torch.Tensor] | None = None
        self.description = f"LoRA adapter {self.path} (r={config.r}, alpha={config.lora_alpha})"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: layer.shape for k, layer in self.layers.items()}

    def block(self, name: str, block: tuple[int, int] | None) -> torch.Tensor:
        import torch

        layer = self.layers[name]
        if self._cached is None or self._cached[0] != name:
            self._cached = None  # release the previous layer's factors first
            a = read_block(layer.a, None).to(torch.float32)
            b = read_block(layer.b, None).to(torch.float32)
            self._cached = (name, a, b)
        _, a, b = self._cached
        rows = block if block is not None else (0, layer.shape[0])
        return lora.lora_delta(a, b, layer.scaling, layer.fan_in_fan_out, rows)

    def provenance(self) -> dict[str, Any]:
        return {
            "adapter": str(self.path),
            "adapter_base_model": self.config.base_model_name_or_path,
            **lora.config_hyperparameters(self.config),
        }


def open_delta_source(path: str | os.PathLike, aliases: Mapping[str, str] | None = None) -> DeltaSource:
    """A knowledge-vector directory or a PEFT LoRA adapter directory (``aliases``: the base model's tied
    names, used for adapters), opened for streaming."""
    if lora.is_lora_adapter(path):
        return LoraAdapterFiles(path, aliases)
    return VectorFiles(path)


class Paired(NamedTuple):
    """A model's files and a delta source that fits them (every key a floating parameter, same shape)."""

    ckpt: Checkpoint
    arch: Architecture | None
    source: DeltaSource
    params: dict[str, TensorEntry]
    shapes: dict[str, tuple[int, ...]]


def open_paired(
    model_dir: str | os.PathLike, open_source: Callable[[Mapping[str, str] | None], DeltaSource]
) -> Paired:
    """Open the model's checkpoint and, with its tied names, the delta source (``open_source(aliases)``),
    and check that Δ applies to it (``check_applicable``): where streamed apply and LoRA vectors start."""
    ckpt = open_checkpoint(model_dir)
    arch = architecture_of(ckpt)
    source = open_source(arch.aliases if arch else None)
    params = model_parameters(ckpt, arch)
    shapes = source.shapes()
    check_applicable(params, shapes, arch)
    return Paired(ckpt, arch, source, params, shapes)
