"""Tensor names: the files' names against ``named_parameters()``.

Vectors are keyed by ``named_parameters()`` names, so a tied embedding/lm_head is one key; the files
store a tied weight once and omit its second name. The architecture is built from ``config.json`` on the
``meta`` device (no memory, no remote code) to learn the tied names, the parameter order and the
``state_dict`` names; without a loadable config the file names are used as they are.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flearning.io.safetensors import Checkpoint, TensorEntry
from flearning.vectors import ops

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Architecture:
    """Names of a model built on the meta device from ``config.json``."""

    state_names: tuple[str, ...]  # state_dict() order, both names of a tied weight
    parameters: tuple[str, ...]  # named_parameters() order, tied weights once
    aliases: dict[str, str]  # every parameter name → its named_parameters() name
    shapes: dict[str, tuple[int, ...]]


def model_architecture(path: str | os.PathLike) -> tuple[Architecture | None, str]:
    """Build the model of ``path/config.json`` on the meta device to learn its parameter names.

    Returns (the names, "") or (None, why not); nothing is allocated and no remote code is run.
    """
    root = Path(path)
    if not (root / "config.json").is_file():
        return None, f"{root} has no config.json"
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        config = AutoConfig.from_pretrained(root)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception as ex:  # any failure only means the names cannot be derived
        return None, f"transformers cannot build the model of {root / 'config.json'} ({ex})"
    state = model.state_dict()
    return (
        Architecture(
            state_names=tuple(state),
            parameters=tuple(dict(model.named_parameters())),
            aliases=ops.parameter_aliases(model),
            shapes={k: tuple(v.shape) for k, v in state.items()},
        ),
        "",
    )


def architecture_of(ckpt: Checkpoint) -> Architecture | None:
    """``model_architecture`` of a checkpoint, logging why the file names are used when it fails."""
    arch, why = model_architecture(ckpt.root)
    if arch is None:
        log.info("parameter names from the file names only: %s", why)
    return arch


def parameter_entries(ckpt: Checkpoint, arch: Architecture | None) -> dict[str, TensorEntry]:
    """The checkpoint's tensors under their ``named_parameters()`` names (a tied weight once), in file
    order; with no architecture, under the file names."""
    out: dict[str, TensorEntry] = {}
    aliases = arch.aliases if arch else {}
    for name, entry in ckpt.entries.items():
        out.setdefault(aliases.get(name, name), entry)
    return out


def in_parameter_order(names: list[str], arch: Architecture | None) -> list[str]:
    """``names`` in ``named_parameters()`` order where known (what in-memory vectors use), else as given."""
    if arch is None:
        return list(names)
    rank = {n: i for i, n in enumerate(arch.state_names)}
    position = {n: i for i, n in enumerate(names)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), position[n]))


def model_parameters(ckpt: Checkpoint, arch: Architecture | None) -> dict[str, TensorEntry]:
    """Like ``parameter_entries``, restricted to ``named_parameters()`` where the architecture is known
    (persistent buffers are not parameters, as for ``KnowledgeVector.apply_to``)."""
    entries = parameter_entries(ckpt, arch)
    if arch is None:
        return entries
    parameters = set(arch.parameters)
    return {k: e for k, e in entries.items() if k in parameters}


def meta_tensor(shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
    """A shape/dtype stand-in (fp32 by default) that allocates nothing."""
    import torch

    return torch.empty(shape, dtype=dtype or torch.float32, device="meta")


def check_applicable(
    params: Mapping[str, TensorEntry], shapes: Mapping[str, tuple[int, ...]], arch: Architecture | None
) -> None:
    """``ops.check_applicable`` on stand-ins: Δ of ``shapes`` fits the stored parameters ``params``
    (non-floating tensors stand in as int64, which the check refuses)."""
    import torch

    ops.check_applicable(
        {
            k: meta_tensor(e.shape, e.torch_dtype() if e.is_floating else torch.int64)
            for k, e in params.items()
        },
        {k: meta_tensor(s) for k, s in shapes.items()},
        arch.aliases if arch else None,
    )
