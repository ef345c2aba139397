"""Checkpoints of a training stage, so an interrupted stage resumes bit for bit.

A checkpoint holds everything the next optimizer step depends on (trainable parameters, optimizer and
scheduler state, random generators, data position), in safetensors and JSON only: no pickle, which is
why accelerate's ``save_state`` is not used. It is written atomically (``io.atomic``), so it is complete
or absent (layout: ``save_checkpoint``). Resuming checks its *identity* against the stage about to run
(configuration, data, starting model, library versions, processes) and names what differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flearning.errors import FlearnError

if TYPE_CHECKING:
    import torch

    from flearning.training.config import TrainConfig
    from flearning.training.dataset import Example

log = logging.getLogger(__name__)

FORMAT = "flearning-train-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"
JSON_FILE = "state.json"
_NAME = re.compile(r"^step-(\d{8})(-final)?$")
# A checkpoint of the same step as one being saved is moved aside under this prefix until the new one is
# in place; a process killed in between leaves it there, and it still counts while the new one is absent.
_ASIDE = ".old-"


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often a training stage saves its state.

    Args:
        directory: the stage's checkpoint directory (created when the first checkpoint is written).
        every: save after every ``every`` optimizer steps; 0 saves only at the end of the stage and
            when it is interrupted.
        resume: continue from the latest checkpoint in ``directory`` if there is one (refusing an
            incompatible one); False discards existing checkpoints and starts afresh.
        save_on_error: when the stage is interrupted (Ctrl-C or any exception except a diverged loss),
            save the state of the last completed optimizer step before re-raising.
    """

    directory: Path
    every: int = 100
    resume: bool = True
    save_on_error: bool = True

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError("Checkpointing.every must be >= 0")


@dataclass(frozen=True)
class StageIdentity:
    """What a stage's result depends on besides the code: checked before resuming."""

    config: dict[str, Any]  # TrainConfig as JSON
    data_hash: str  # sha256 of the encoded examples
    model_fingerprint: str  # flearning.models.model_fingerprint of the starting model
    versions: dict[str, str] = field(default_factory=dict)  # the code that computes the steps
    processes: int = 1  # data-parallel processes: which batches make a step, and the step count

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "data_hash": self.data_hash,
            "model_fingerprint": self.model_fingerprint,
            "versions": self.versions,
            "processes": self.processes,
        }


@dataclass
class Position:
    """Where the loop stands after ``step`` optimizer steps."""

    step: int = 0
    epoch: int = 0  # 0-based epoch in progress
    batches_done: int = 0  # micro-batches of ``epoch`` already consumed
    accelerator_step: int = 0  # accelerate's gradient-accumulation counter
    tokens: int = 0
    seconds: float = 0.0  # training time spent before this run (for throughput only)
    losses: list[float] = field(default_factory=list)
    # what an epoch-end check recorded after each complete epoch (``train``'s ``on_epoch_end``)
    epoch_log: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RngState:
    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor]
    python: Any  # random.getstate()
    numpy: Any  # numpy.random.get_state()


@dataclass
class Checkpoint:
    """A checkpoint read back from disk."""

    path: Path
    identity: dict[str, Any]
    position: Position
    complete: bool
    params: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None  # an optimizer state_dict, or None in a final checkpoint
    scheduler: dict[str, Any] | None
    rng: RngState
    param_names: list[str]


# ---- identity ----------------------------------------------------------------------------------------


def stage_identity(
    cfg: TrainConfig, examples: Sequence[Example], model: torch.nn.Module, *, processes: int = 1
) -> StageIdentity:
    """The identity of a stage about to train ``model`` (before any adapter is attached) on ``processes``
    data-parallel processes."""
    from flearning.models import model_fingerprint

    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.input_ids, e.labels], separators=(",", ":")).encode())
        h.update(b"\n")
    return StageIdentity(
        cfg.model_dump(mode="json"), h.hexdigest(), model_fingerprint(model), code_versions(), processes
    )


def code_versions() -> dict[str, str]:
    """Versions whose change could change a step's numbers (a resumed run must use the same ones)."""
    import importlib.metadata as md

    versions = {}
    for name in ("f-learning", "torch", "transformers", "peft", "accelerate"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def describe_differences(saved: Mapping[str, Any], current: Mapping[str, Any], limit: int = 8) -> list[str]:
    """``key: saved → current`` for every (dotted) key whose value differs."""
    a, b = _flatten(dict(saved)), _flatten(dict(current))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: {_short(a.get(key, '<absent>'))} → {_short(b.get(key, '<absent>'))}")
    if len(diffs) > limit:
        diffs = diffs[:limit] + [f"... and {len(diffs) - limit} more"]
    return diffs


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 1] + "…"


def check_identity(checkpoint: Checkpoint, current: StageIdentity) -> None:
    """Raise ``FlearnError`` naming everything in which ``checkpoint`` differs from the stage to run."""
    saved = checkpoint.identity
    problems = []
    config_diffs = describe_differences(saved.get("config", {}), current.config)
    if config_diffs:
        problems.append("a different training configuration (" + "; ".join(config_diffs) + ")")
    if saved.get("data_hash") != current.data_hash:
        problems.append(
            f"different training data (data hash {str(saved.get('data_hash'))[:12]}… in the checkpoint, "
            f"{current.data_hash[:12]}… now)"
        )
    version_diffs = describe_differences(saved.get("versions", {}), current.versions)
    if version_diffs:
        problems.append("other library versions (" + "; ".join(version_diffs) + ")")
    if saved.get("processes", 1) != current.processes:
        problems.append(
            f"{saved.get('processes', 1)} data-parallel process(es) ({current.processes} now: the batches of "
            "a step and the number of steps differ)"
        )
    if saved.get("model_fingerprint") != current.model_fingerprint:
        problems.append(
            f"a different starting model (model fingerprint {saved.get('model_fingerprint')} in the "
            f"checkpoint, {current.model_fingerprint} now)"
        )
    if problems:
        raise FlearnError(
            f"cannot resume from the checkpoint {checkpoint.path}: it was made with "
            + ", and ".join(problems)
            + f". Delete {checkpoint.path.parent} to start this stage afresh (flearn update: --restart)."
        )


# ---- random number generators ------------------------------------------------------------------------


def capture_rng() -> RngState:
    import numpy as np
    import torch

    cuda = [s.clone() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return RngState(torch.get_rng_state().clone(), cuda, random.getstate(), np.random.get_state())


def restore_rng(state: RngState) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state.torch_cpu)
    if state.torch_cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state.torch_cuda)
    random.setstate(state.python)
    np.random.set_state(state.numpy)


def _rng_to_json(state: RngState) -> dict[str, Any]:
    version, internal, gauss = state.python
    name, keys, pos, has_gauss, cached = state.numpy
    return {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {
            "name": name,
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }


def _rng_from_json(data: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> RngState:
    import numpy as np

    py = data["python"]
    npy = data["numpy"]
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng/cuda/"))]
    return RngState(
        torch_cpu=tensors["rng/torch"],
        torch_cuda=cuda,
        python=(py["version"], tuple(py["state"]), py["gauss_next"]),
        numpy=(
            npy["name"],
            np.asarray(npy["keys"], dtype=np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        ),
    )


# ---- optimizer state ---------------------------------------------------------------------------------


def _split_optimizer(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A torch optimizer state_dict as (tensors for safetensors, the rest for JSON)."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: Mapping[str, torch.Tensor], data: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer/"):
            _, index, key = name.split("/", 2)
            state.setdefault(int(index), {})[key] = tensor
    for index, values in data["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [dict(g) for g in data["param_groups"]]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])  # JSON has no tuples; torch keeps betas as one
    return {"state": state, "param_groups": groups}


# ---- files -------------------------------------------------------------------------------------------


def checkpoint_dirs(directory: Path) -> list[tuple[int, bool, Path]]:
    """(step, final, path) of the complete checkpoints in ``directory``, oldest first (one moved aside
    by an interrupted replacement counts while its replacement is absent)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        name = path.name
        if name.startswith(_ASIDE):
            name = name[len(_ASIDE) :]
            if (directory / name).exists():
                continue  # its replacement is in place
        match = _NAME.match(name)
        if match and (path / JSON_FILE).is_file():
            found.append((int(match.group(1)), bool(match.group(2)), path))
    return sorted(found)


def latest_checkpoint(directory: Path) -> Path | None:
    found = checkpoint_dirs(directory)
    return found[-1][2] if found else None


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    directory: Path,
    *,
    identity: StageIdentity,
    position: Position,
    params: Mapping[str, torch.Tensor],
    optimizer: Mapping[str, Any] | None,
    scheduler: Mapping[str, Any] | None,
    rng: RngState,
    complete: bool = False,
) -> Path:
    """Write one checkpoint atomically and remove the older ones of ``directory``.

    Layout (the batch order is a pure function of (seed, epoch), ``LengthGroupedBatches``, so the data
    position is two integers; a ``-final`` checkpoint marks a finished stage and has no optimizer state)::

        <directory>/step-00000012[-final]/
            model.safetensors   trainable parameters by name
            state.safetensors   optimizer tensors ("optimizer/<index>/<key>"), torch RNG states ("rng/...")
            state.json          identity, position, losses, optimizer groups, scheduler, Python/NumPy RNG

    It is written in a hidden ``.tmp-step-…`` directory and renamed into place; older checkpoints of the
    stage are removed only after the new one is in place.

    Args:
        directory: the stage's checkpoint directory.
        identity: what the stage depends on (checked when resuming).
        position: the loop's position after ``position.step`` optimizer steps.
        params: trainable parameters by name.
        optimizer: ``optimizer.state_dict()``; None for a final checkpoint.
        scheduler: ``scheduler.state_dict()`` (JSON-able), or None.
        rng: the generators' states at this step.
        complete: the stage has finished.
    Returns:
        The checkpoint's directory.
    Raises:
        FlearnError: the disk is full, read-only or not writable (the previous checkpoint is kept).
    """
    from safetensors.torch import save_file

    from flearning.io.atomic import replace_directory, staged_directory, write_errors_as_flearn

    directory = Path(directory)
    name = f"step-{position.step:08d}" + ("-final" if complete else "")
    target = directory / name
    with write_errors_as_flearn(directory, what="a training checkpoint"):
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".tmp-*"):  # left by a process killed while writing
            shutil.rmtree(stale, ignore_errors=True)
        with staged_directory(target, prefix=f".tmp-{name}-") as tmp:
            model_tensors = {k: v.detach().cpu().contiguous() for k, v in params.items()}
            save_file(model_tensors, str(tmp / MODEL_FILE), metadata={"format": FORMAT})
            state_tensors: dict[str, torch.Tensor] = {"rng/torch": rng.torch_cpu}
            for i, s in enumerate(rng.torch_cuda):
                state_tensors[f"rng/cuda/{i:03d}"] = s
            optimizer_json = None
            if optimizer is not None:
                opt_tensors, optimizer_json = _split_optimizer(optimizer)
                state_tensors.update(opt_tensors)
            save_file(state_tensors, str(tmp / STATE_FILE), metadata={"format": FORMAT})
            record = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "complete": complete,
                "identity": identity.to_json(),
                "position": position.__dict__,
                "param_names": list(params),
                "optimizer": optimizer_json,
                "scheduler": dict(scheduler) if scheduler is not None else None,
                "rng": _rng_to_json(rng),
            }
            (tmp / JSON_FILE).write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
            for f in (MODEL_FILE, STATE_FILE, JSON_FILE):
                _fsync_file(tmp / f)
            # the same step saved again (e.g. after a resume) replaces the old one, which waits aside under
            # a name checkpoint_dirs counts (and goes back if the rename fails): this step is always there
            replace_directory(tmp, target, aside=directory / f"{_ASIDE}{name}")
            _fsync_dir(directory)
    # only now that the new checkpoint is in place: the older ones (and one moved aside) go
    for _, _, old in checkpoint_dirs(directory):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    for aside in directory.glob(f"{_ASIDE}*"):
        shutil.rmtree(aside, ignore_errors=True)
    log.debug("checkpoint written: %s", target)
    return target


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint directory written by ``save_checkpoint`` (safetensors and JSON only).

    Raises:
        FlearnError: not a checkpoint of this format, or damaged.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        record = json.loads((path / JSON_FILE).read_text())
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise FlearnError(f"{path}: not a f-learning training checkpoint")
        if record.get("format_version") != FORMAT_VERSION:
            raise FlearnError(
                f"{path}: checkpoint format version {record.get('format_version')} is not supported "
                f"(this f-learning writes version {FORMAT_VERSION}); delete it to start the stage afresh"
            )
        params = load_file(str(path / MODEL_FILE))
        tensors = load_file(str(path / STATE_FILE))
        optimizer = _join_optimizer(tensors, record["optimizer"]) if record["optimizer"] is not None else None
        return Checkpoint(
            path=path,
            identity=record["identity"],
            position=Position(**record["position"]),
            complete=bool(record["complete"]),
            params=params,
            optimizer=optimizer,
            scheduler=record["scheduler"],
            rng=_rng_from_json(record["rng"], tensors),
            param_names=list(record["param_names"]),
        )
    except FlearnError:
        raise
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as ex:
        raise FlearnError(
            f"{path}: the checkpoint is damaged ({type(ex).__name__}: {ex}); delete {path.parent} to start "
            "this stage afresh"
        ) from ex


def discard_checkpoints(directory: Path) -> None:
    """Remove a stage's checkpoint directory (a fresh start, or a finished stage)."""
    shutil.rmtree(directory, ignore_errors=True)


def restore(saved: Checkpoint, named, optimizer, scheduler, accelerator, sharded: bool = False) -> None:
    """Load a checkpoint's parameters (into ``named``, the stage's trainable (name, parameter) pairs),
    optimizer, scheduler, accelerate counter and RNG states."""
    import torch

    from flearning.training.sharded_state import restore_sharded

    names = [n for n, _ in named]
    if names != saved.param_names or any(saved.params[n].shape != p.shape for n, p in named):
        missing = sorted(set(names) - set(saved.param_names))
        unexpected = sorted(set(saved.param_names) - set(names))
        raise FlearnError(
            f"cannot resume from the checkpoint {saved.path}: its parameters do not match the model's "
            f"trainable parameters (missing {missing[:5]}, unexpected {unexpected[:5]}, or other shapes)"
        )
    if sharded:  # each process keeps its rows of the saved whole tensors
        restore_sharded(saved.params, saved.optimizer, named, optimizer)
    else:
        with torch.no_grad():
            for name, p in named:
                p.copy_(saved.params[name])
        if saved.optimizer is not None:
            optimizer.load_state_dict(saved.optimizer)
    if saved.scheduler is not None:
        scheduler.load_state_dict(saved.scheduler)
    accelerator.step = saved.position.accelerator_step
    restore_rng(saved.rng)
