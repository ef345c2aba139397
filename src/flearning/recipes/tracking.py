"""Experiment tracking (``report_to``) through accelerate's tracker classes: one run per command.

The trainer builds a fresh ``Accelerator`` for every stage, so the run's trackers are not an
Accelerator's: ``RunTracker`` starts accelerate's ``TensorBoardTracker``, ``WandBTracker``,
``MLflowTracker`` or ``TrackioTracker`` itself, once per run and on the main process only, and the
stages feed it through ``train``'s ``on_stats``. What it logs, at one global step counted across the
stages (so that every tracker sees it increase):

    <stage>/loss, <stage>/lr, <stage>/tokens_per_s, <stage>/epoch   each optimizer step (prime, forget, learn)
    lambda                                                         after the forget stage
    eval/before/<metric>, eval/after/<metric>                      the means (×100) of the evaluation

The bench logs the same under ``<dataset>/seed<k>/<method>[@λ]/`` (``RunTracker.scoped``). A tracker
whose library is missing is refused before any work (``check_trackers``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flearning.config import TRACKERS
from flearning.distributed import is_main_process, use_cpu
from flearning.errors import FlearnError

if TYPE_CHECKING:
    from flearning.training.trainer import StatsCallback, StepStats

log = logging.getLogger(__name__)

# The project (wandb, trackio) or experiment (mlflow) runs are grouped under; WANDB_PROJECT,
# TRACKIO_PROJECT and MLFLOW_EXPERIMENT_NAME choose another.
PROJECT = "f-learning"
# tracker name -> the package that provides it (what to install)
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def check_trackers(names: Sequence[str]) -> None:
    """Every tracker of ``report_to`` can start: its library is installed.

    Raises:
        FlearnError: naming each missing package and how to install it.
    """
    from accelerate.utils import (
        is_mlflow_available,
        is_tensorboard_available,
        is_trackio_available,
        is_wandb_available,
    )

    available = {
        "tensorboard": is_tensorboard_available,
        "wandb": is_wandb_available,
        "mlflow": is_mlflow_available,
        "trackio": is_trackio_available,
    }
    unknown = [name for name in names if name not in available]
    if unknown:  # the configuration refuses them first; this guards the Python API
        raise FlearnError(f"report_to: unknown trackers {unknown}; choose from {', '.join(TRACKERS)}")
    missing = [name for name in names if not available[name]()]
    if missing:
        packages = " ".join(PACKAGES[name] for name in missing)
        raise FlearnError(
            f"report_to: {', '.join(missing)} cannot log: the package{'s' if len(missing) > 1 else ''} "
            f"{packages} {'are' if len(missing) > 1 else 'is'} not installed. Install "
            f"{'them' if len(missing) > 1 else 'it'} (pip install {packages}) or remove "
            f"{'them' if len(missing) > 1 else 'it'} from report_to (--report-to)."
        )


def scalars(prefix: str, summary: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The means of an evaluation summary (``EvalResult.summary()``) as ``prefix/metric`` scalars;
    metrics without a value are left out."""
    return {
        f"{prefix}/{metric}": float(values["mean"])
        for metric, values in summary.items()
        if values.get("mean") is not None
    }


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """A run configuration as the flat scalars every tracker takes as hyper-parameters (``learn.lr``);
    lists as text, unset values left out."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif value is not None:
            out[name] = str(value)
    return out


class RunTracker:
    """The trackers of one run. Without trackers (``report_to`` empty) or on a process other than the
    main one, every method does nothing and ``stage`` gives no callback.

    Args:
        names: ``report_to``.
        run_name: the run's name (TensorBoard: its directory in ``logging_dir``; wandb, trackio, mlflow:
            the run's name in the project ``PROJECT``).
        logging_dir: where TensorBoard writes (``<logging_dir>/<run_name>/``) and wandb keeps its files
            (unless ``WANDB_DIR`` is set); mlflow's artifact location when given (mlflow and trackio
            otherwise use their own stores: ``MLFLOW_TRACKING_URI``, trackio's local database).
        config: the run's configuration, stored as its hyper-parameters (``flat_config``).
        mlflow_artifacts: pass ``logging_dir`` to mlflow as its artifact location (only a directory
            that stays: not a work directory that is removed at the end).
    """

    def __init__(
        self,
        names: Sequence[str] = (),
        *,
        run_name: str = "flearn",
        logging_dir: Path | None = None,
        config: Mapping[str, Any] | None = None,
        mlflow_artifacts: bool = False,
    ) -> None:
        self.trackers: list[Any] = []
        self.step = 0  # the global step: the last one logged, across stages
        self._base = 0  # the global step the current stage started after
        self.run_name = run_name
        self.logging_dir = logging_dir
        if not names or not is_main_process():
            return
        check_trackers(names)
        from accelerate import PartialState

        # accelerate's trackers log through its logger, which needs its process state: set up as the
        # trainer's Accelerator sets it up (distributed.use_cpu)
        PartialState(cpu=use_cpu())
        try:
            for name in dict.fromkeys(names):  # in order, once each
                tracker = _tracker(name, run_name, logging_dir, mlflow_artifacts)
                # the trackers are made on the main process only: accelerate need not check (it would
                # set up its process state to do so)
                tracker.main_process_only = False
                tracker.start()
                if config:
                    tracker.store_init_configuration(flat_config(config))
                self.trackers.append(tracker)
        except BaseException:
            self.finish()
            raise
        log.info(
            "tracking run %s with %s%s",
            run_name,
            ", ".join(names),
            f" (logs in {logging_dir})" if logging_dir is not None else "",
        )

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log(self, values: Mapping[str, float], step: int | None = None) -> None:
        """Log scalars at ``step`` (default: the current global step)."""
        if not self.trackers or not values:
            return
        step = self.step if step is None else step
        for tracker in self.trackers:
            tracker.log(dict(values), step=step)

    def stage(self, name: str) -> StatsCallback | None:
        """The ``on_stats`` callback of a training stage: its steps follow the steps logged so far, each
        as ``name/loss``, ``name/lr``, ``name/tokens_per_s`` and ``name/epoch``. None without trackers."""
        if not self.trackers:
            return None
        self._base = base = self.step
        last: list[tuple[int, float]] = []  # (tokens, seconds) of the previous step seen

        def on_stats(stats: StepStats) -> None:
            if last:  # the rate of this step
                tokens, seconds = stats.tokens - last[0][0], stats.seconds - last[0][1]
            else:  # the first step of this process (a resumed stage: all of it so far)
                tokens, seconds = stats.tokens, stats.seconds
            last[:] = [(stats.tokens, stats.seconds)]
            self.step = base + stats.step
            self.log(
                {
                    f"{name}/loss": stats.loss,
                    f"{name}/lr": stats.lr,
                    f"{name}/tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
                    f"{name}/epoch": stats.epoch,
                }
            )

        return on_stats

    def stage_done(self, steps: int | None) -> None:
        """The stage that started last took ``steps`` optimizer steps (also when it logged none: one
        read back from a finished earlier run), so the next one starts after them."""
        if self.trackers and steps is not None:
            self.step = max(self.step, self._base + steps)

    def scoped(self, prefix: str) -> ScopedTracker:
        """The same run, with every name under ``prefix/`` (the bench's runs)."""
        return ScopedTracker(self, prefix)

    def finish(self) -> None:
        """Close every tracker (idempotent); a tracker that fails to close is warned about."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            try:
                tracker.finish()
            except Exception as ex:  # the run's own result matters more than its log
                log.warning("could not close the %s tracker: %s", tracker.name, ex)


class ScopedTracker:
    """A ``RunTracker`` whose names are all under one prefix; it shares the run's global step."""

    def __init__(self, run: RunTracker, prefix: str) -> None:
        self.run, self.prefix = run, prefix.strip("/")

    def __bool__(self) -> bool:
        return bool(self.run)

    def log(self, values: Mapping[str, float], step: int | None = None) -> None:
        self.run.log({f"{self.prefix}/{k}": v for k, v in values.items()}, step=step)

    def stage(self, name: str) -> StatsCallback | None:
        return self.run.stage(f"{self.prefix}/{name}")

    def stage_done(self, steps: int | None) -> None:
        self.run.stage_done(steps)

    def scoped(self, prefix: str) -> ScopedTracker:
        return ScopedTracker(self.run, f"{self.prefix}/{prefix}")


NO_TRACKING = RunTracker()
Tracking = RunTracker | ScopedTracker


def _tracker(name: str, run_name: str, logging_dir: Path | None, mlflow_artifacts: bool):
    """accelerate's tracker of ``name`` for this run (not started)."""
    from accelerate import tracking

    if name == "tensorboard":
        if logging_dir is None:
            raise FlearnError("report_to tensorboard needs a logging directory (logging_dir, --logging-dir)")
        return tracking.TensorBoardTracker(run_name, str(logging_dir))
    if name == "wandb":
        kwargs: dict[str, Any] = {"name": run_name}
        if logging_dir is not None and not os.environ.get("WANDB_DIR"):
            Path(logging_dir).mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = str(logging_dir)
        return tracking.WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), **kwargs)
    if name == "trackio":
        return tracking.TrackioTracker(os.environ.get("TRACKIO_PROJECT", PROJECT), name=run_name)
    if name == "mlflow":
        artifacts = str(logging_dir) if mlflow_artifacts and logging_dir is not None else None
        return tracking.MLflowTracker(experiment_name=PROJECT, logging_dir=artifacts, run_name=run_name)
    raise FlearnError(f"report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
