"""The run's sinks: one record, written to metrics.jsonl, the dashboard and the console.

`choose_tracker` picks the dashboard from TRACKERS (log.tracker) before anything is written or
read; `Tracker` starts it and hands every record to every sink (monitor/sinks.py). Every method may
be called on every rank: only the main process writes (Accelerate's `init_trackers` and `log` are
main-process-only), and every decision that can fail is taken on the main process and shared, so all
ranks fail together instead of waiting for each other forever.

A dashboard must never cost a checkpoint: when one fails (on Slurm, a time limit or scancel sends
SIGTERM to W&B's service process too, and the next call raises just before the stop checkpoint),
a warning says so and training goes on without it; metrics.jsonl keeps every row.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from accelerate import Accelerator

from trainer.core.checkpoint import TrainState, read_best
from trainer.core.config import Config, to_dict
from trainer.monitor.console import Console
from trainer.monitor.sinks import Dashboard, MetricsFile, Record, TensorBoardSink, TrackerChoice
from trainer.monitor.wandb_sink import WandbSink, run_identity
from trainer.util.ranks import main_decides

# log.tracker -> its dashboard. A new tracker is a Dashboard subclass, added here and to log.tracker's choices.
TRACKERS: dict[str, type[Dashboard]] = {"wandb": WandbSink, "tensorboard": TensorBoardSink, "none": Dashboard}
T = TypeVar("T")


def choose_tracker(cfg: Config, environ: Mapping[str, str] = os.environ) -> TrackerChoice:
    """The tracker of a training run, chosen before anything is written or read. Raises ConfigError when
    the chosen one is not installed, TrackingError for W&B online mode without credentials.

    Only training chooses one: evaluation and the benchmark build their Accelerator without it, so
    evaluating a run that was trained with TensorBoard does not need TensorBoard.
    """
    return TRACKERS[cfg.log.tracker].choose(cfg, environ)


class Tracker:
    """The run's sinks. Construct it before any data is read: choosing it checked the W&B credentials."""

    def __init__(self, cfg: Config, choice: TrackerChoice, accelerator: Accelerator, console: Console) -> None:
        """`accelerator` must have been built with `choice.accelerator_kwargs`."""
        self.acc = accelerator
        self.console = console
        self.dashboard = TRACKERS[choice.kind](cfg, choice, accelerator)
        self.metrics_file = MetricsFile(Path(cfg.run.dir) / "metrics.jsonl")

    def start(self, cfg: Config, state: TrainState, continuing: bool, real_grid: Path) -> str | None:
        """Start the dashboard's run, or continue the W&B run `state.tracker_run_id` when `continuing`.

        Collective: every rank calls it and gets the W&B run id (None for other trackers), which the
        caller stores in the train state so that every checkpoint carries it. A new run also gets
        the grid of real images, once; a run with a best checkpoint gets its best/* summary.
        """
        run_dir = Path(cfg.run.dir)
        run_id = state.tracker_run_id if continuing else None
        identity = main_decides(self.acc, lambda: run_identity(cfg, state, continuing))
        vars(state).update(identity)  # kept in every checkpoint from now on
        config: dict[str, Any] = {
            **to_dict(cfg),
            "launch": {"num_processes": self.acc.num_processes, "device": str(self.acc.device)},
        }
        if identity["slurm_jobs"]:
            # job id, array id, restart count of every start: which attempts of which jobs trained this run
            config["slurm"] = {"jobs": identity["slurm_jobs"]}
        run_id = main_decides(self.acc, lambda: self.dashboard.start(run_id, identity, config))
        if self.acc.is_main_process:
            self.console.print(self.dashboard.describe())
            if not continuing:
                self.log_image("real", real_grid, state, "real training images, as the model sees them")
            best = read_best(run_dir / "checkpoints")
            if best is not None:
                self._guarded("updating the summary", lambda: self.dashboard.best(run_dir / "checkpoints", best, False))
        return run_id

    # ---- main process -------------------------------------------------------------------------
    def write(self, values: Mapping[str, Any], state: TrainState, owed: bool = False) -> None:
        """One record to every sink: metrics.jsonl first (its write errors stop the run, see loop.py),
        then the dashboard, then the console. Names carry their section: `train/loss_D`, `eval/fid`."""
        record = Record.at(state, values, owed)
        self.metrics_file.write(record)
        self._guarded("logging metrics", lambda: self.dashboard.write(record))
        self.console.write(record)

    def log_image(self, name: str, path: Path, state: TrainState, caption: str) -> None:
        """The PNG the loop wrote, as `samples/<name>`: W&B's media slider steps through training."""
        record = Record.at(state, {})
        self._guarded("logging an image", lambda: self.dashboard.image(f"samples/{name}", path, record, caption))

    def log_best(self, checkpoints: Path) -> None:
        """After a new best checkpoint was recorded in `checkpoints`/best.json: the summary's best/*, and
        with log.wandb_artifacts=best|both its generator as an artifact."""
        best = read_best(checkpoints)
        if best is not None:
            self._guarded("logging the best model", lambda: self.dashboard.best(checkpoints, best, True))

    def log_weights(self, run_dir: Path, state: TrainState, final: bool) -> None:
        """After the end-of-run export: with log.wandb_artifacts=final|both the exported generator files
        as an artifact (alias final when training finished, step-<N> always)."""
        files = {name: run_dir / name for name in ("generator.safetensors", "generator_ema.safetensors")}
        files = {name: path for name, path in files.items() if path.is_file()}
        self._guarded("logging a model artifact", lambda: self.dashboard.weights(files, state, final))

    def summary(self) -> list[tuple[str, str]]:
        """Where the dashboard is, as rows of the end-of-run table."""
        return self.dashboard.summary()

    def finish(self, requeue: bool = False) -> bool:
        """Close the dashboard's run before `accelerator.end_training()`, tolerating a dead tracker.

        `requeue` (a run stopped early by its job script): a W&B sweep trial's run is ended so that W&B
        puts it back in the sweep's queue. Returns whether that was done (main process).
        """
        return bool(self._guarded("finishing the run", lambda: self.dashboard.finish(requeue)))

    def _guarded(self, what: str, action: Callable[[], T]) -> T | None:
        """Run a dashboard call on the main process; if the dashboard fails, warn once and go on without it."""
        if not self.acc.is_main_process:
            return None
        try:
            return action()
        except Exception as exc:  # wandb and tensorboard raise many kinds
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            warnings.warn(
                f"the {self.dashboard.kind} tracker failed while {what} ({type(exc).__name__}: {reason}); tracking "
                "stops for this start, training and checkpoints go on, and metrics.jsonl keeps every row",
                stacklevel=3,
            )
            cfg = self.dashboard.cfg
            self.dashboard = Dashboard(cfg, TrackerChoice(Dashboard.kind, f"failed while {what}"), self.acc)
            self.acc.trackers = []  # so that end_training does not call it again
            return None
