"""Where a record goes: every sink receives the same `Record`, on the main process.

A record is one row of the run: where training stands (step, epoch, images seen) and its metrics by
their full names, `<section>/<name>` (`train/loss_D`, `opt/lr_G`, `perf/images_per_s`,
`samples/diversity`, `eval/fid`, ...). A metric gets that name where it is born (the loop,
`measurements.host_metrics`, the collector for the GAN step's tensors); no sink keeps a list of names.
The dashboards group charts by the section.

The sinks: `MetricsFile` (metrics.jsonl), the console (`console.Console.write`), and one dashboard
(`Dashboard` subclasses: W&B in monitor/wandb_sink.py, TensorBoard here, or `Dashboard` itself for
none), which `monitor/tracking.py` picks from its TRACKERS table. A new tracker is one `Dashboard`
subclass and one entry there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, is_tensorboard_available

from trainer.core.checkpoint import TrainState
from trainer.core.config import Config, flatten
from trainer.util.errors import ConfigError

STEP_METRIC = "images_seen"  # every dashboard's x-axis: comparable across batch sizes and process counts
# metrics.jsonl keeps the names it always had: a record name without its section, except these
JSONL_KEYS = {"eval/weights": "eval_weights", "eval/num_samples": "eval_num_samples", "eval/seconds": "eval_s"}


@dataclass(frozen=True)
class Record:
    """One row for every sink. `owed`: the evaluation a stop left for the resume (see WandbSink.write)."""

    step: int
    epoch: int
    images_seen: int
    values: dict[str, Any] = field(default_factory=dict)
    owed: bool = False

    @classmethod
    def at(cls, state: TrainState, values: Mapping[str, Any], owed: bool = False) -> Record:
        return cls(state.step, state.epoch, state.images_seen, dict(values), owed)


def jsonl_key(name: str) -> str:
    return JSONL_KEYS.get(name, name.split("/", 1)[-1])


class MetricsFile:
    """metrics.jsonl: one JSON line per record, a local copy of the run that needs no tracker."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: Record) -> None:
        row = {"step": record.step, "epoch": record.epoch, "images_seen": record.images_seen}
        row.update({jsonl_key(name): value for name, value in record.values.items()})
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


@dataclass(frozen=True)
class TrackerChoice:
    """Which tracker a run uses, why, and what the Accelerator needs for it: decided once, by `choose_tracker`."""

    kind: str  # a key of tracking.TRACKERS
    reason: str
    accelerator_kwargs: dict[str, Any] = field(default_factory=dict)
    mode: str | None = None  # W&B online | offline, on the main process (the one that logs)


class Dashboard:
    """No dashboard (log.tracker=none); the base of the ones that draw charts.

    Every method runs on the main process only; `tracking.Tracker` calls them and, when one raises,
    warns and goes on without the dashboard.
    """

    kind = "none"

    @classmethod
    def choose(cls, cfg: Config, environ: Mapping[str, str]) -> TrackerChoice:
        return TrackerChoice(cls.kind, f"log.tracker={cfg.log.tracker}")

    def __init__(self, cfg: Config, choice: TrackerChoice, accelerator: Accelerator) -> None:
        self.cfg, self.acc, self.why = cfg, accelerator, choice.reason
        self.run_dir = Path(cfg.run.dir)
        self.run_id: str | None = None  # the W&B run id (kept in checkpoints)

    def start(self, run_id: str | None, identity: dict[str, Any], config: dict[str, Any]) -> str | None:
        """Start (or, with `run_id`, continue) the dashboard's run; returns the id to keep in checkpoints."""
        return None

    def write(self, record: Record) -> None:
        pass

    def image(self, key: str, path: Path, record: Record, caption: str) -> None:
        pass

    def best(self, checkpoints: Path, best: dict[str, Any], new: bool) -> None:
        """The run's best checkpoint (best.json's record); `new`: it was just recorded."""

    def weights(self, files: dict[str, Path], state: TrainState, final: bool) -> None:
        """The end-of-run export."""

    def finish(self, requeue: bool = False) -> bool:
        """Close the run; returns whether a sweep will requeue it."""
        for tracker in self.acc.trackers:
            tracker.finish()
        self.acc.trackers = []
        return False

    def describe(self) -> str:
        return f"tracking: off ({self.why}); metrics go to {self.run_dir / 'metrics.jsonl'}"

    def summary(self) -> list[tuple[str, str]]:
        return [("tracking", f"off ({self.why})")]


class TensorBoardSink(Dashboard):
    """TensorBoard through Accelerate's tracker, in <run.dir>/tensorboard: scalars and images at images seen."""

    kind = "tensorboard"

    @classmethod
    def choose(cls, cfg: Config, environ: Mapping[str, str]) -> TrackerChoice:
        if not is_tensorboard_available():
            raise ConfigError(
                "log.tracker=tensorboard needs the tensorboard package: pip install tensorboard "
                "(or use log.tracker=wandb or none)"
            )
        # Accelerate writes to <logging_dir>/<project name>: <run.dir>/tensorboard
        kwargs = {"log_with": cls.kind, "project_config": ProjectConfiguration(logging_dir=cfg.run.dir)}
        return TrackerChoice(cls.kind, "log.tracker=tensorboard", kwargs)

    @property
    def location(self) -> Path:
        return self.run_dir / "tensorboard"

    def start(self, run_id: str | None, identity: dict[str, Any], config: dict[str, Any]) -> str | None:
        # TensorBoard's hparams take scalars and strings only
        hparams = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flatten(config).items()}
        self.acc.init_trackers("tensorboard", config=hparams)
        return run_id

    def write(self, record: Record) -> None:
        scalars = {name: value for name, value in record.values.items() if isinstance(value, (int, float))}
        self.acc.log(scalars, step=record.images_seen)

    def image(self, key: str, path: Path, record: Record, caption: str) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))[None]
        self.acc.get_tracker("tensorboard").log_images({key: pixels}, step=record.images_seen, dataformats="NHWC")

    def describe(self) -> str:
        return f"tracking: TensorBoard in {self.location}; view with: tensorboard --logdir {self.location}"

    def summary(self) -> list[tuple[str, str]]:
        return [("tracking", f"TensorBoard: tensorboard --logdir {self.location}")]
