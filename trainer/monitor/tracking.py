"""Experiment tracking on rank 0 through Accelerate's trackers: W&B (default), TensorBoard, or none.

The loop hands over plain numbers at log steps (already averaged across ranks by its meter) and
the paths of the sample grids it wrote; this module decides where they go. Every method may be
called on every rank: only the main process talks to a tracker (Accelerate's `init_trackers` and
`log` are main-process-only), and every decision that can fail is taken on the main process and
shared, so all ranks fail together instead of waiting for each other forever.

Everything is logged against the number of training images seen (W&B step, TensorBoard step and
W&B x-axis), which stays comparable across batch sizes and process counts.

W&B mode: `log.wandb_mode` if not `auto`, else the `WANDB_MODE` environment variable, else auto.
  online   needs credentials (WANDB_API_KEY, or the ~/.netrc entry `wandb login` writes); without
           them the run stops at start-up, before any data is read, with a one-line error.
  offline  writes <run.dir>/wandb/offline-run-*/, to upload later with `wandb sync`.
  auto     online with credentials, offline (with a note on how to sync) without.
A resumed run continues the same W&B run: its id is kept in every checkpoint's train state.
"""

from __future__ import annotations

import netrc
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, is_tensorboard_available, is_wandb_available

from trainer.core.checkpoint import TrainState
from trainer.core.config import Config, LogConfig, to_dict
from trainer.monitor.console import Console
from trainer.util.errors import ConfigError, TrackingError
from trainer.util.ranks import main_decides

# Dashboard section of every metric (W&B groups charts by the prefix before "/"); unknown names go to train/.
SECTIONS = {
    "loss_D": "train",
    "loss_G": "train",
    "D(x)": "train",
    "D(G(z))_before": "train",
    "D(G(z))_after": "train",
    "grad_norm_D": "train",
    "grad_norm_G": "train",
    "lr_D": "opt",
    "lr_G": "opt",
    "images_per_s": "perf",
    "gpu_mem_allocated_GiB": "perf",
    "gpu_mem_peak_GiB": "perf",
    "gpu_mem_reserved_GiB": "perf",
    "loss_scale": "amp",
    "skipped_steps_D": "amp",
    "skipped_steps_G": "amp",
    "fid": "eval",  # from the evaluator, every eval.every_epochs / eval.every_steps
    "is_mean": "eval",
    "is_std": "eval",
    "kid_mean": "eval",
    "kid_std": "eval",
}
STEP_METRIC = "images_seen"
WANDB_MODE_ALIASES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline"}


def wandb_credentials_found(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether `wandb.init` would find an API key without asking for one.

    Hand-written because wandb has no public, non-prompting check (`wandb.login()` prompts on a
    terminal); this mirrors where wandb looks: WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, then the
    netrc entry for the W&B host that `wandb login` writes.
    """
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    path = Path(environ.get("NETRC") or Path(environ.get("HOME", "~"), ".netrc")).expanduser()
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_wandb_mode(log: LogConfig, environ: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """(online | offline | disabled, why) for log.tracker=wandb. Raises TrackingError for online without credentials."""
    env_mode = environ.get("WANDB_MODE", "").strip().lower()
    if log.wandb_mode != "auto":
        mode, source = log.wandb_mode, f"log.wandb_mode={log.wandb_mode}"
    elif env_mode == "disabled":
        return "disabled", "WANDB_MODE=disabled"
    elif env_mode in WANDB_MODE_ALIASES:
        mode, source = WANDB_MODE_ALIASES[env_mode], f"WANDB_MODE={env_mode}"
    elif env_mode:
        raise TrackingError(f"WANDB_MODE={env_mode!r} is not one of online, offline, disabled; fix or unset it")
    elif wandb_credentials_found(environ):
        return "online", "W&B credentials found"
    else:
        return "offline", "no W&B credentials found (WANDB_API_KEY or `wandb login`)"
    if mode == "online" and not wandb_credentials_found(environ):
        # log.wandb_mode wins over WANDB_MODE, so only the config key fixes a config key
        offline = "log.wandb_mode=offline" + (" or WANDB_MODE=offline" if source.startswith("WANDB_MODE") else "")
        raise TrackingError(
            f"W&B online mode ({source}) needs credentials and none were found: run `wandb login` "
            f"(or set WANDB_API_KEY), or log offline with {offline} and upload later with `wandb sync`"
        )
    return mode, source


@dataclass(frozen=True)
class TrackerChoice:
    """Which tracker a run uses, why, and what the Accelerator needs for it: decided once, by `choose_tracker`."""

    kind: str  # wandb | tensorboard | none
    reason: str
    accelerator_kwargs: dict[str, Any] = field(default_factory=dict)
    mode: str | None = None  # W&B online | offline, on the main process (the one that logs)


def choose_tracker(cfg: Config, environ: Mapping[str, str] = os.environ) -> TrackerChoice:
    """The tracker of a training run, chosen before anything is written or read. Raises ConfigError when
    the chosen one is not installed, TrackingError for W&B online mode without credentials.

    The W&B mode is resolved where it is used, on the main process (global rank 0); the launcher
    stops the other ranks when it fails. Only training chooses one: evaluation and the benchmark build their Accelerator without it, so
    evaluating a run that was trained with TensorBoard does not need TensorBoard.
    """
    tracker = cfg.log.tracker
    if tracker == "tensorboard" and not is_tensorboard_available():
        raise ConfigError(
            "log.tracker=tensorboard needs the tensorboard package: pip install tensorboard "
            "(or use log.tracker=wandb or none)"
        )
    if tracker == "wandb" and not is_wandb_available():
        raise ConfigError("log.tracker=wandb needs the wandb package: pip install wandb (or use log.tracker=none)")
    env_mode = environ.get("WANDB_MODE", "").strip().lower()
    if tracker == "wandb" and cfg.log.wandb_mode == "auto" and env_mode == "disabled":
        # wandb's own off switch; Accelerate would otherwise start a no-op run
        return TrackerChoice("none", "WANDB_MODE=disabled")
    if tracker == "none":
        return TrackerChoice("none", "log.tracker=none")
    if tracker == "tensorboard":  # writes to <logging_dir>/<project name>: <run.dir>/tensorboard
        kwargs = {"log_with": tracker, "project_config": ProjectConfiguration(logging_dir=cfg.run.dir)}
        return TrackerChoice("tensorboard", "log.tracker=tensorboard", kwargs)
    if environ.get("RANK", "0") != "0":
        return TrackerChoice("wandb", "log.tracker=wandb", {"log_with": tracker})
    mode, why = resolve_wandb_mode(cfg.log, environ)  # not "disabled": handled above
    return TrackerChoice("wandb", why, {"log_with": tracker}, mode)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            # TensorBoard's hparams take scalars and strings only
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


class Tracker:
    """The run's tracker. Construct it before any data is read: it checks the W&B credentials."""

    def __init__(self, cfg: Config, choice: TrackerChoice, accelerator: Accelerator, console: Console) -> None:
        """`accelerator` must have been built with `choice.accelerator_kwargs`."""
        self.acc = accelerator
        self.console = console
        self.kind = choice.kind
        self.mode = choice.mode  # W&B: online | offline (main process)
        self.location: str | None = None  # for people: URL, offline directory or log directory
        self.sync_command: str | None = None  # offline W&B: how to upload
        self._why = choice.reason

    @property
    def active(self) -> bool:
        return self.kind != "none" and self.acc.is_main_process

    def start(self, cfg: Config, state: TrainState, continuing: bool, real_grid: Path) -> str | None:
        """Start the tracker run, or continue the W&B run `state.tracker_run_id` when `continuing`.

        Collective: every rank calls it and gets the W&B run id (None for other trackers), which the
        caller stores in the train state so that every checkpoint carries it. A new run also gets
        the grid of real images, once.
        """
        run_dir = Path(cfg.run.dir)
        run_id = state.tracker_run_id if continuing else None
        run_id = main_decides(self.acc, lambda: self._start_main(cfg, run_id, run_dir))
        if self.acc.is_main_process:
            self.console.print(self._describe(cfg, run_dir))
            if not continuing:
                self.log_image("real", real_grid, state, "real training images, as the model sees them")
        return run_id

    def _start_main(self, cfg: Config, run_id: str | None, run_dir: Path) -> str | None:
        config = {**to_dict(cfg), "launch": {"num_processes": self.acc.num_processes, "device": str(self.acc.device)}}
        if self.kind == "tensorboard":
            self.acc.init_trackers("tensorboard", config=_flatten(config))
            self.location = str(run_dir / "tensorboard")
            return run_id
        if self.kind != "wandb":
            return run_id
        init: dict[str, Any] = {
            "name": cfg.run.name,
            "dir": str(run_dir),  # <run.dir>/wandb/: next to the checkpoints it belongs to
            "mode": self.mode,
            "job_type": "train",
            "group": cfg.log.wandb_group or os.environ.get("SLURM_JOB_ID") or None,
            "tags": list(cfg.log.wandb_tags) or None,
        }
        if cfg.log.wandb_entity:
            init["entity"] = cfg.log.wandb_entity
        if run_id:
            init.update(id=run_id, resume="allow")  # same run, steps keep increasing
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.acc.init_trackers(cfg.log.wandb_project, config=config, init_kwargs={"wandb": init})
        except Exception as exc:  # network, permissions, a bad entity: wandb raises many kinds
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise TrackingError(
                f"W&B could not start the run ({reason}); check `wandb login` and log.wandb_entity/project, "
                "or log offline with log.wandb_mode=offline and upload later with `wandb sync`"
            ) from None
        run = self.acc.get_tracker("wandb", unwrap=True)
        # Charts use images seen as their x-axis, whatever the batch size or the number of processes.
        run.define_metric(STEP_METRIC)
        for section in sorted({*SECTIONS.values(), "samples"}):
            run.define_metric(f"{section}/*", step_metric=STEP_METRIC)
        run.define_metric("epoch", step_metric=STEP_METRIC)
        if run.offline:
            self.location = run.sync_dir
            # Every start of the run (resumes included) writes its own offline-run-* directory;
            # `wandb sync` uploads them in order into the one W&B run.
            self.sync_command = f"wandb sync {run_dir / 'wandb'}/offline-run-*"
        else:
            self.location = run.url
        return run.id

    def _describe(self, cfg: Config, run_dir: Path) -> str:
        if self.kind == "tensorboard":
            return f"tracking: TensorBoard in {self.location}; view with: tensorboard --logdir {self.location}"
        if self.kind == "none":
            return f"tracking: off ({self._why}); metrics go to {run_dir / 'metrics.jsonl'}"
        if self.mode == "online":
            return f"tracking: W&B run {self.location} ({self._why})"
        return f"tracking: W&B offline ({self._why}) in {self.location}; upload later with: {self.sync_command}"

    def summary(self) -> list[tuple[str, str]]:
        """Where the dashboard is, as rows of the end-of-run table."""
        if self.kind == "tensorboard":
            return [("tracking", f"TensorBoard: tensorboard --logdir {self.location}")]
        if self.kind == "none":
            return [("tracking", f"off ({self._why})")]
        if self.mode == "online":
            return [("tracking", f"W&B {self.location}")]
        return [("tracking", f"W&B offline: {self.location}"), ("upload with", str(self.sync_command))]

    def _guarded(self, what: str, action: Callable[[], None]) -> None:
        """Run a tracker call; if the tracker fails, warn once and go on without it.

        The tracker must never cost a checkpoint: on Slurm, a time limit or scancel sends SIGTERM
        to every process of the job, W&B's service process included, and the next log call would
        raise (ConnectionResetError) just before the trainer writes its stop checkpoint.
        """
        try:
            action()
        except Exception as exc:  # wandb and tensorboard raise many kinds
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            warnings.warn(
                f"the {self.kind} tracker failed while {what} ({type(exc).__name__}: {reason}); tracking stops "
                "for this start, training and checkpoints go on, and metrics.jsonl keeps every row",
                stacklevel=3,
            )
            self._why = f"failed while {what}"
            self.kind = "none"
            self.acc.trackers = []  # so that end_training does not call it again

    def finish(self) -> None:
        """Close the tracker run before `accelerator.end_training()`, tolerating a dead tracker."""
        if self.acc.trackers:
            self._guarded("finishing the run", lambda: [tracker.finish() for tracker in self.acc.trackers])
            self.acc.trackers = []

    def log_metrics(self, metrics: Mapping[str, float], state: TrainState) -> None:
        """One dashboard row at `state.images_seen`; names get their section prefix (train/, opt/, ...)."""
        if not self.active:
            return
        row: dict[str, Any] = {f"{SECTIONS.get(name, 'train')}/{name}": value for name, value in metrics.items()}
        row.update({STEP_METRIC: state.images_seen, "epoch": state.epoch})
        self._guarded("logging metrics", lambda: self.acc.log(row, step=state.images_seen))

    def log_image(self, name: str, path: Path, state: TrainState, caption: str) -> None:
        """The PNG the loop wrote, as `samples/<name>`: W&B's media slider steps through training."""
        if not self.active:
            return
        key = f"samples/{name}"
        if self.kind == "wandb":
            import wandb

            # With its x-axis value: otherwise W&B plots it at the last images_seen it was given.
            row = {key: wandb.Image(str(path), caption=caption), STEP_METRIC: state.images_seen, "epoch": state.epoch}
            self._guarded("logging an image", lambda: self.acc.log(row, step=state.images_seen))
        else:
            import numpy as np
            from PIL import Image

            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))[None]
            tensorboard = self.acc.get_tracker("tensorboard")
            self._guarded(
                "logging an image",
                lambda: tensorboard.log_images({key: pixels}, step=state.images_seen, dataformats="NHWC"),
            )
