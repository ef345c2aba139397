"""The ``<out>.partial`` work directory through which an interrupted ``flearn update`` resumes.

It holds ``identity.json`` (what the run depends on), ``forget/`` and ``learn/`` (each stage's checkpoints;
a ``-final`` one once learning is done) and ``knowledge_vector/`` + ``forget.json`` (Δ_old and its loss
trace once the forget stage is done). Rerunning the same command resumes from there and writes the same
model as an uninterrupted run; the directory is removed once the output is in place. One made by
another run (other data, model, method, λ or stage settings) is refused, naming what differs;
``--restart`` discards it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from flearning.config import StagePlan
from flearning.distributed import is_main_process, launched_processes
from flearning.errors import FlearnError
from flearning.methods import Method

ResumeMode = Literal["auto", "resume", "restart"]
WORK_FORMAT = "flearning-update-work"

log = logging.getLogger(__name__)


def work_dir_for(out: Path) -> Path:
    """Where an update to ``out`` keeps its finished stages until the output is in place."""
    out = Path(out)
    return out.parent / f"{out.name}.partial"


def output_of(work: Path) -> Path:
    """The output whose work directory ``work`` is (``work_dir_for``'s inverse)."""
    return work.parent / work.name.removesuffix(".partial")


def check_work_dir_path(out: Path) -> None:
    """Refuse a file where the work directory of ``out`` would go (before anything is trained)."""
    work = work_dir_for(out)
    if work.exists() and not work.is_dir():
        raise FlearnError(
            f"{work}: exists and is not a directory (it is where an update keeps its finished stages); "
            "remove it"
        )


def pairs_hash(pairs: Sequence[tuple[str, str]]) -> str:
    return hashlib.sha256(
        json.dumps(list(pairs), ensure_ascii=False).encode("utf-8", "surrogatepass")
    ).hexdigest()


def stages_json(method: Method, plan: StagePlan) -> dict[str, Any]:
    """Both stages' settings as JSON (the forget stage's only for a method that forgets), and when the
    learning stage stops (``learn_stop``: None for a fixed schedule). A method with an editor has no
    learning stage (``learn`` None) and its edit step's settings as ``edit``."""
    stages = {
        "forget": plan.forget.model_dump(mode="json") if method.forget and plan.forget else None,
        "learn": plan.learn.model_dump(mode="json") if plan.learn is not None else None,
        "learn_stop": plan.stop.to_json() if plan.stop is not None else None,
    }
    if method.editor is not None and plan.edit is not None:
        stages["edit"] = plan.edit.to_json()
    return stages


def run_identity(
    method: Method,
    plan: StagePlan,
    base_fingerprint: str,
    old_pairs: Sequence[tuple[str, str]],
    new_pairs: Sequence[tuple[str, str]],
    subjects: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """Everything the trained model depends on (not where it is written, nor how it is evaluated);
    ``subjects``: the new facts' subjects, which an editor's result depends on too."""
    from flearning.training.checkpoint import code_versions

    data = {"old": pairs_hash(old_pairs), "new": pairs_hash(new_pairs)}
    if method.editor is not None and subjects is not None:
        data["subjects"] = hashlib.sha256(json.dumps(list(subjects), ensure_ascii=False).encode()).hexdigest()
    return {
        "format": WORK_FORMAT,
        "method": method.name,
        "lambda": plan.lam if method.forget else None,
        "stages": stages_json(method, plan),
        "model_fingerprint": base_fingerprint,
        "data": data,
        "processes": launched_processes(),  # a step's batches depend on it
        "versions": code_versions(),
    }


def open_work_dir(out: Path, identity: dict[str, Any], resume: ResumeMode) -> Path:
    """The ``<out>.partial`` work directory of this run: reused when it holds the same run, created when
    absent; one made by another run is refused (``auto``, ``resume``) or discarded (``restart``).
    Called holding the output's lock (``UpdateRecipe._setup_output``), let go of when this fails.

    A directory of that name that f-learning did not make is never deleted.
    """
    from flearning.io.output import release_output

    try:
        return _open_work_dir(out, identity, resume)
    except BaseException:
        release_output(out)  # the run ends here
        raise


def _open_work_dir(out: Path, identity: dict[str, Any], resume: ResumeMode) -> Path:
    from flearning.io.atomic import atomic_write_text
    from flearning.training.checkpoint import describe_differences

    work = work_dir_for(out)
    if work.exists():
        try:
            saved = json.loads((work / "identity.json").read_text())
            ours = isinstance(saved, dict) and saved.get("format") == WORK_FORMAT
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise FlearnError(
                f"{work} exists but is not the work directory of an interrupted flearn update (no valid "
                "identity.json); it is left alone: move or remove it, or choose another --out"
            )
        if resume == "restart" or not _has_progress(work):
            log.info(
                "discarding %s (%s)", work, "--restart" if resume == "restart" else "nothing finished in it"
            )
            shutil.rmtree(work)
        elif saved != identity:
            raise FlearnError(
                f"{work} holds an interrupted update of a different run "
                f"({'; '.join(describe_differences(saved, identity))}). Rerun it with the settings it was made "
                "with to resume it, or pass --restart to discard it and start afresh."
            )
        else:
            log.info("resuming the interrupted update kept in %s", work)
            return work
    if resume == "resume":
        raise FlearnError(
            f"nothing to resume: {work} does not exist or holds no finished step "
            "(run without --resume to start)"
        )
    work.mkdir(parents=True)
    atomic_write_text(work / "identity.json", json.dumps(identity, indent=2) + "\n")
    return work


def close_after_failure(work: Path, *, resumable: bool) -> None:
    """After a failed run, keep ``work`` for a rerun when it holds finished work and the failure may not
    recur (an interruption, a full disk); discard it otherwise (a diverged loss, non-finite weights:
    rerunning the same command would fail the same way, and a changed setting cannot reuse the stages).
    Either way the output's lock is let go: the next run may start."""
    from flearning.io.output import release_output

    try:
        _close_after_failure(work, resumable=resumable)
    finally:
        release_output(output_of(work))


def _close_after_failure(work: Path, *, resumable: bool) -> None:
    if not work.is_dir() or not is_main_process():
        return
    if resumable and _has_progress(work):
        log.warning(
            "the finished training stages are kept in %s: run the same command again to resume "
            "(or pass --restart to start afresh)",
            work,
        )
    else:
        shutil.rmtree(work, ignore_errors=True)


def _has_progress(work: Path) -> bool:
    """Whether ``work`` holds anything a rerun can reuse (a checkpoint or a finished stage)."""
    from flearning.training.checkpoint import checkpoint_dirs

    return (work / "knowledge_vector").is_dir() or any(
        checkpoint_dirs(work / stage) for stage in ("forget", "learn")
    )
