"""Experiment tracking on rank 0 through Accelerate's trackers: W&B (default), TensorBoard, or none.

The loop hands over plain numbers at log steps (already averaged across ranks by its meter) and
the paths of the sample grids it wrote; this module decides where they go. Every method may be
called on every rank: only the main process talks to a tracker (Accelerate's `init_trackers` and
`log` are main-process-only), and every decision that can fail is taken on the main process and
shared, so all ranks fail together instead of waiting for each other forever.

Everything is logged against the number of training images seen (W&B step, TensorBoard step and
W&B x-axis), which stays comparable across batch sizes and process counts.

W&B mode: `log.wandb_mode` if not `auto`, else the `WANDB_MODE` environment variable, else auto.
  online   needs credentials, found as W&B itself finds them (WANDB_API_KEY, an identity token,
           the netrc entry `wandb login` or `wandb login --host URL` writes, an api_key in W&B's
           settings file); without them the run stops at start-up, before any data is read.
  offline  writes <run.dir>/wandb/offline-run-*/, to upload later with `wandb sync`.
  auto     online with credentials, offline (with a note on how to sync) without; if the online
           start fails (no network on a compute node), a warning and offline.
A resumed run continues the same W&B run: its id is kept in every checkpoint's train state, and
`trainer.evaluate` adds its results to that run too (`log_evaluation`).

What answers "which model is best": the run summary keeps the lowest FID and KID and the highest IS
(`define_metric` summaries) and `best/fid`, `best/step`, `best/checkpoint` from the run's best.json;
with `log.wandb_artifacts` the generator weights become model artifacts (monitor/model_artifacts.py).
"""

from __future__ import annotations

import configparser
import json
import netrc
import os
import secrets
import string
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, is_tensorboard_available, is_wandb_available

from trainer.core.checkpoint import (
    CONFIG,
    TRAIN_STATE,
    TrainState,
    export_checkpoint_generators,
    generator_files,
    read_best,
)
from trainer.core.config import Config, LogConfig, flatten, to_dict
from trainer.monitor import model_artifacts, sweep
from trainer.monitor.console import Console
from trainer.util.errors import ConfigError, TrackingError
from trainer.util.ranks import launch_rank, main_decides

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
    "diversity": "samples",  # of the fixed-noise grid, relative to real images (monitor/diversity.py)
}
STEP_METRIC = "images_seen"
WANDB_MODE_ALIASES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline"}
# Run-summary aggregates: the best value of a quality metric, beside its last one.
SUMMARIES = {"eval/fid": "min,last", "eval/kid_mean": "min,last", "eval/is_mean": "max,last"}
POSTHOC = "eval/posthoc"  # trainer.evaluate's rows in the training run
AUTO_ONLINE = "W&B credentials found"  # the reason of an auto choice of online: it may fall back to offline
DEFAULT_WANDB_HOST = "https://api.wandb.ai"


def _credentials_by_hand(environ: Mapping[str, str]) -> bool:
    """Where W&B looks for credentials, for a wandb without its own non-prompting lookup (older than
    `wandb.sdk.lib.wbauth`): WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, the netrc entry for the host
    (WANDB_BASE_URL, else the base_url `wandb login --host` saved in W&B's settings file), then an
    api_key in that settings file."""
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    home = environ.get("HOME", "~")
    settings_file = Path(environ.get("WANDB_CONFIG_DIR") or Path(home, ".config", "wandb"), "settings").expanduser()
    settings = configparser.ConfigParser()
    try:
        settings.read(settings_file)
    except configparser.Error:
        pass
    saved = settings["default"] if settings.has_section("default") else {}
    host = urlsplit(environ.get("WANDB_BASE_URL") or saved.get("base_url") or DEFAULT_WANDB_HOST).netloc
    path = Path(environ.get("NETRC") or Path(home, ".netrc")).expanduser()
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        entry = None
    return bool(entry and entry[2]) or bool(saved.get("api_key"))


def wandb_credentials_found(environ: Mapping[str, str] | None = None) -> bool:
    """Whether `wandb.init` would find credentials without asking for them.

    With the process environment (`environ` None) W&B is asked itself, through the lookup `wandb.init`
    uses (environment, netrc entry for the configured host, settings files; `wandb login --host`
    included) without its prompt. An explicit `environ`, or a wandb without that lookup, gets
    `_credentials_by_hand`, which follows the same places.
    """
    if environ is not None:
        return _credentials_by_hand(environ)
    try:
        from wandb.errors import AuthenticationError
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth
    except ImportError:
        return _credentials_by_hand(os.environ)
    try:
        settings = wandb_setup.singleton().settings  # the settings files and WANDB_* variables
        auth = wbauth.authenticate_session(
            host=settings.base_url, source="dcgan-trainer", prompt=False, update_session=False
        )
    except AuthenticationError:  # found, but malformed: wandb.init will say what is wrong with it
        return True
    except Exception:  # noqa: BLE001  (a private API that may change: fall back to the same places by hand)
        return _credentials_by_hand(os.environ)
    return auth is not None


def resolve_wandb_mode(log: LogConfig, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(online | offline | disabled, why) for log.tracker=wandb. Raises TrackingError for online without credentials.

    `environ` None is the process environment (credentials asked of W&B itself).
    """
    env_mode = (os.environ if environ is None else environ).get("WANDB_MODE", "").strip().lower()
    if log.wandb_mode != "auto":
        mode, source = log.wandb_mode, f"log.wandb_mode={log.wandb_mode}"
    elif env_mode == "disabled":
        return "disabled", "WANDB_MODE=disabled"
    elif env_mode in WANDB_MODE_ALIASES:
        mode, source = WANDB_MODE_ALIASES[env_mode], f"WANDB_MODE={env_mode}"
    elif env_mode:
        raise TrackingError(f"WANDB_MODE={env_mode!r} is not one of online, offline, disabled; fix or unset it")
    elif wandb_credentials_found(environ):
        return "online", AUTO_ONLINE
    else:
        return "offline", "no W&B credentials found (WANDB_API_KEY, `wandb login`, W&B settings)"
    if mode == "online" and not wandb_credentials_found(environ):
        # log.wandb_mode wins over WANDB_MODE, so only the config key fixes a config key
        offline = "log.wandb_mode=offline" + (" or WANDB_MODE=offline" if source.startswith("WANDB_MODE") else "")
        raise TrackingError(
            f"W&B online mode ({source}) needs credentials and none were found: run `wandb login` "
            f"(`wandb login --host URL` for a W&B server; or set WANDB_API_KEY), or log offline with {offline} "
            "and upload later with `wandb sync`"
        )
    return mode, source


def slurm_job(environ: Mapping[str, str] = os.environ) -> dict[str, Any] | None:
    """The Slurm job this process runs in (for the run config and name), or None outside Slurm."""
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    array_job, array_task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    return {
        "job_id": job_id,
        "array_job_id": array_job,
        "array_task_id": array_task,
        # an array task is known as <array job>_<task>, the name squeue and sacct show
        "job": f"{array_job}_{array_task}" if array_job and array_task else job_id,
        "restart_count": int(environ.get("SLURM_RESTART_COUNT") or 0),
        "job_name": environ.get("SLURM_JOB_NAME"),
        "num_nodes": int(environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or 1),
    }


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_short(v) for v in value) + "]"
    return str(value)


NAME_LIMIT = 128  # W&B shows names in tables and chart legends: keep them to a line


def display_name(
    run_name: str,
    *,
    trial_id: str | None = None,
    seed: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    slurm_job: str | None = None,
) -> str:
    """The W&B run name: `run_name`, plus what tells apart the runs that share it.

    A sweep trial is `<run_name>/<trial_id>` (the last two parts of its run directory); any other run
    gets the Slurm job after a dash (`<array job>_<task>` for an array task). Then the `overrides` that
    make this run differ (a trial's parameters: keys without their section, values to 4 digits) and the
    seed when it is not 0 and not among them: `dcgan_cifar10/k3j9x2ab lr=0.0003102 betas.0=0.42`,
    `dcgan_cifar10-4240_3 seed=2`.
    """
    head = f"{run_name}/{trial_id}" if trial_id else f"{run_name}-{slurm_job}" if slurm_job else run_name
    parts = [f"{key.split('.', 1)[-1]}={_short(value)}" for key, value in (overrides or {}).items()]
    if seed and not any(key.split(".")[-1] == "seed" for key in overrides or {}):
        parts.append(f"seed={seed}")
    name = " ".join([head, *parts])
    return name if len(name) <= NAME_LIMIT else name[: NAME_LIMIT - 3] + "..."


def run_display_name(cfg: Config, environ: Mapping[str, str] = os.environ) -> str:
    """This run's W&B name (`display_name`): a sweep trial's id and parameters, the seed, the Slurm job.

    Decided at the run's first start and kept in its checkpoints (`run_identity`): a requeue as a new
    job keeps it.
    """
    trial = sweep.current_trial(environ)
    job = slurm_job(environ)
    return display_name(
        cfg.run.name,
        trial_id=trial.run_id if trial else None,
        seed=cfg.run.seed,
        overrides=trial.params if trial else None,
        slurm_job=job["job"] if job else None,
    )


def run_identity(cfg: Config, state: TrainState, continuing: bool, environ: Mapping[str, str] = os.environ) -> dict:
    """The W&B run's name and group, and the Slurm jobs of its starts, as the train state will keep them.

    A continued run keeps the name and group its first start chose (a requeue as a new Slurm job
    must not rename it or move it to another group) and adds this start's job to the list; a new run
    decides them now: the name from run.name and the job, the group log.wandb_group or run.name.
    """
    if continuing and state.tracker_run_name:
        name, group, jobs = state.tracker_run_name, state.tracker_group, list(state.slurm_jobs)
    else:
        name, group, jobs = run_display_name(cfg, environ), cfg.log.wandb_group or cfg.run.name, []
    job = slurm_job(environ)
    if job and (not jobs or jobs[-1] != job):
        jobs.append(job)
    return {"tracker_run_name": name, "tracker_group": group, "slurm_jobs": jobs}


def new_run_id() -> str:
    """A W&B run id (8 lowercase letters and digits, as wandb makes them), chosen before the run starts."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


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
    if launch_rank(environ=environ) != 0:
        return TrackerChoice("wandb", "log.tracker=wandb", {"log_with": tracker})
    mode, why = resolve_wandb_mode(cfg.log, environ)  # not "disabled": handled above
    return TrackerChoice("wandb", why, {"log_with": tracker}, mode)


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
        self.run_id: str | None = None
        self._why = choice.reason
        self.trial = sweep.current_trial()  # started by a W&B sweep agent: join its run
        self._cfg: Config | None = None
        self._artifacts: tuple[str, str] = ("upload", "")  # (upload | reference, why)

    @property
    def active(self) -> bool:
        return self.kind != "none" and self.acc.is_main_process

    def start(self, cfg: Config, state: TrainState, continuing: bool, real_grid: Path) -> str | None:
        """Start the tracker run, or continue the W&B run `state.tracker_run_id` when `continuing`.

        Collective: every rank calls it and gets the W&B run id (None for other trackers), which the
        caller stores in the train state so that every checkpoint carries it. A new run also gets
        the grid of real images, once; a run with a best checkpoint gets its best/* summary.
        """
        run_dir = Path(cfg.run.dir)
        self._cfg = cfg
        run_id = state.tracker_run_id if continuing else None
        identity = main_decides(self.acc, lambda: run_identity(cfg, state, continuing))
        vars(state).update(identity)  # kept in every checkpoint from now on
        run_id = main_decides(self.acc, lambda: self._start_main(cfg, run_id, run_dir, identity))
        self.run_id = run_id
        if self.acc.is_main_process:
            self.console.print(self._describe(cfg, run_dir))
            if not continuing:
                self.log_image("real", real_grid, state, "real training images, as the model sees them")
            self._set_best_summary(run_dir / "checkpoints", read_best(run_dir / "checkpoints"))
        return run_id

    def _init_wandb(self, cfg: Config, config: dict[str, Any], init: dict[str, Any]) -> None:
        # A sweep trial's project is the sweep's: W&B takes it from the agent.
        project = None if self.trial else cfg.log.wandb_project
        try:
            self.acc.init_trackers(project, config=config, init_kwargs={"wandb": init})
        except Exception:
            self.acc.trackers = []  # Accelerate keeps a tracker whose start failed
            raise

    def _start_main(self, cfg: Config, run_id: str | None, run_dir: Path, identity: dict[str, Any]) -> str | None:
        config: dict[str, Any] = {
            **to_dict(cfg),
            "launch": {"num_processes": self.acc.num_processes, "device": str(self.acc.device)},
        }
        if identity["slurm_jobs"]:
            # job id, array id, restart count of every start: which attempts of which jobs trained this run
            config["slurm"] = {"jobs": identity["slurm_jobs"]}
        if self.kind == "tensorboard":
            # TensorBoard's hparams take scalars and strings only
            hparams = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flatten(config).items()}
            self.acc.init_trackers("tensorboard", config=hparams)
            self.location = str(run_dir / "tensorboard")
            return run_id
        if self.kind != "wandb":
            return run_id

        init: dict[str, Any] = {
            "name": identity["tracker_run_name"],
            "dir": str(run_dir),  # <run.dir>/wandb/: next to the checkpoints it belongs to
            "mode": self.mode,
            "job_type": "train",
            "group": identity["tracker_group"],
            "tags": list(cfg.log.wandb_tags) or None,
            # one id for an online attempt and its offline fallback
            "id": run_id or new_run_id(),
        }
        if cfg.log.wandb_entity:
            init["entity"] = cfg.log.wandb_entity
        if run_id:
            init["resume"] = "allow"  # same run, steps keep increasing
        if self.trial:
            init = sweep.join_agent_run(init)  # the agent's run id, project and entity
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._init_wandb(cfg, config, init)
        except Exception as exc:  # network, permissions, a bad entity: wandb raises many kinds
            if self._why != AUTO_ONLINE:
                raise TrackingError(
                    f"W&B could not start the run ({_first_line(exc)}); check `wandb login` and "
                    "log.wandb_entity/project, or log offline with log.wandb_mode=offline and upload later "
                    "with `wandb sync`"
                ) from None
            # log.wandb_mode=auto chose online because credentials exist; a compute node without a
            # network is no reason to lose the run: log offline, to sync later.
            self.mode, self._why = "offline", f"the online start failed: {_first_line(exc)[:160]}"
            import wandb

            wandb.teardown()  # the failed attempt still holds the run id in W&B's service
            self._init_wandb(cfg, config, {**init, "mode": "offline"})
            warnings.warn(
                f"W&B could not start online ({_first_line(exc)[:200]}); logging offline instead "
                f"(log.wandb_mode=auto). Upload later with: wandb sync {run_dir / 'wandb'}/offline-run-*",
                stacklevel=2,
            )
        run = self.acc.get_tracker("wandb", unwrap=True)
        # Charts use images seen as their x-axis, whatever the batch size or the number of processes.
        run.define_metric(STEP_METRIC)
        for section in sorted({*SECTIONS.values(), "samples"}):
            run.define_metric(f"{section}/*", step_metric=STEP_METRIC)
        run.define_metric("epoch", step_metric=STEP_METRIC)
        for name, summary in SUMMARIES.items():  # the run summary keeps the best FID / KID / IS
            run.define_metric(name, step_metric=STEP_METRIC, summary=summary)
        if run.offline:
            self.location = run.sync_dir
            # Every start of the run (resumes included) writes its own offline-run-* directory;
            # `wandb sync` uploads them in order into the one W&B run.
            self.sync_command = f"wandb sync {run_dir / 'wandb'}/offline-run-*"
        else:
            self.location = run.url
        self._artifacts = model_artifacts.storage(cfg.log.wandb_artifact_storage, run_dir)
        return run.id

    # ---- which model is best: summary and artifacts (main process) ---------------------------------
    def _set_best_summary(self, checkpoints: Path, best: dict[str, Any] | None) -> None:
        """best/fid, best/step, best/images_seen, best/checkpoint in the W&B run summary, from best.json."""
        if self.kind != "wandb" or not self.acc.is_main_process or best is None:
            return
        run = self.acc.get_tracker("wandb", unwrap=True)

        def update() -> None:
            run.summary["best/fid"] = best["fid"]
            run.summary["best/step"] = best["step"]
            run.summary["best/checkpoint"] = str((checkpoints / best["checkpoint"]).resolve())
            if best.get("images_seen") is not None:
                run.summary["best/images_seen"] = best["images_seen"]

        self._guarded("updating the summary", update)

    def log_best(self, checkpoints: Path) -> None:
        """Main process, after a new best checkpoint was recorded in `checkpoints`/best.json: the
        summary's best/*, and with log.wandb_artifacts=best|both its generator as an artifact."""
        best = read_best(checkpoints)
        if best is None or not self.active:
            return
        best = {**best, "images_seen": best["step"] * self._cfg.train.batch_size}
        self._set_best_summary(checkpoints, best)
        if self.kind == "wandb" and self._cfg.log.wandb_artifacts in ("best", "both"):
            checkpoint = checkpoints / best["checkpoint"]
            metadata = {"fid": best["fid"], "checkpoint": str(checkpoint.resolve()), "weights": best.get("weights")}
            self._log_generator(checkpoint, best["step"], ["best", f"step-{best['step']}"], metadata, "best FID")

    def log_weights(self, run_dir: Path, state: TrainState, final: bool) -> None:
        """Main process, after the end-of-run export: with log.wandb_artifacts=final|both the exported
        generator files as an artifact (alias final when training finished, step-<N> always)."""
        if not (self.active and self.kind == "wandb" and self._cfg.log.wandb_artifacts in ("final", "both")):
            return
        files = {name: run_dir / name for name in ("generator.safetensors", "generator_ema.safetensors")}
        files = {name: path for name, path in files.items() if path.is_file()}
        aliases = (["final"] if final else []) + [f"step-{state.step}"]
        self._log_generator(None, state.step, aliases, {"final": final}, "end of run", files)

    def _log_generator(
        self,
        checkpoint: Path | None,
        step: int,
        aliases: list[str],
        extra: dict[str, Any],
        what: str,
        files: dict[str, Path] | None = None,
    ) -> None:
        import wandb

        cfg, run_dir = self._cfg, Path(self._cfg.run.dir)
        how, why = self._artifacts
        metadata = {
            "model": vars(cfg.model),
            "step": step,
            "images_seen": step * cfg.train.batch_size,
            "storage": how,
            **extra,
        }
        description = f"DCGAN generator of run {cfg.run.name}, step {step} ({what}); files {how}ed ({why})"

        def log() -> None:
            with tempfile.TemporaryDirectory(prefix="dcgan-artifact-") as tmp:
                chosen = files
                if chosen is None and checkpoint is not None:
                    chosen = (
                        generator_files(checkpoint)
                        if how == "reference"
                        else export_checkpoint_generators(checkpoint, Path(tmp), cfg.model, step)
                    )
                chosen = {**(chosen or {}), CONFIG: (checkpoint or run_dir) / CONFIG}
                artifact = model_artifacts.build(wandb, self.run_id, chosen, how, metadata, description)
                run = self.acc.get_tracker("wandb", unwrap=True)
                run.log_artifact(artifact, aliases=aliases)  # upload mode: the files are staged by now

        self._guarded("logging a model artifact", log)

    def _describe(self, cfg: Config, run_dir: Path) -> str:
        if self.kind == "wandb":
            line = self._describe_wandb()
            return f"{line}; {sweep.describe(self.trial)}" if self.trial else line
        if self.kind == "tensorboard":
            return f"tracking: TensorBoard in {self.location}; view with: tensorboard --logdir {self.location}"
        return f"tracking: off ({self._why}); metrics go to {run_dir / 'metrics.jsonl'}"

    def _describe_wandb(self) -> str:
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

    def finish(self, requeue: bool = False) -> bool:
        """Close the tracker run before `accelerator.end_training()`, tolerating a dead tracker.

        `requeue` (a run stopped early by its job script): a W&B sweep trial's run is ended so that W&B
        puts it back in the sweep's queue. Returns whether that was done (main process).
        """
        requeued = False
        if requeue and self.trial and self.kind == "wandb" and self.acc.trackers:
            run = self.acc.get_tracker("wandb", unwrap=True)
            self._guarded("finishing the run for a requeue", lambda: sweep.finish_for_requeue(run))
            requeued, self.acc.trackers = self.kind == "wandb", []  # kind is "none" if that failed
        if self.acc.trackers:
            self._guarded("finishing the run", lambda: [tracker.finish() for tracker in self.acc.trackers])
            self.acc.trackers = []
        return requeued

    def log_metrics(self, metrics: Mapping[str, float], state: TrainState, owed: bool = False) -> None:
        """One dashboard row at `state.images_seen`; names get their section prefix (train/, opt/, ...).

        `owed`: the evaluation a stop left for the resume. The stopped start's last row holds this W&B
        step already, and W&B drops rows at or below a run's last step, so the row goes one step later;
        its images_seen, the charts' x-axis, is the evaluated step's.
        """
        if not self.active:
            return
        row: dict[str, Any] = {f"{SECTIONS.get(name, 'train')}/{name}": value for name, value in metrics.items()}
        row.update({STEP_METRIC: state.images_seen, "epoch": state.epoch})
        step = state.images_seen + (1 if owed else 0)
        self._guarded("logging metrics", lambda: self.acc.log(row, step=step))

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


# ---- trainer.evaluate: its results in the training run ---------------------------------------------
@dataclass(frozen=True)
class EvaluationTarget:
    """Where `trainer.evaluate` logs: the checkpoint's W&B run (run_id None: nowhere, for `why`)."""

    run_id: str | None
    mode: str | None
    why: str


def evaluation_target(cfg: Config, checkpoint: Path) -> EvaluationTarget:
    """Decided before the evaluation runs, so that a W&B problem (online without credentials) stops it
    first. Raises TrackingError as training would."""
    state = json.loads((checkpoint / TRAIN_STATE).read_text())
    run_id = state.get("tracker_run_id")
    if cfg.log.tracker != "wandb":
        return EvaluationTarget(None, None, f"log.tracker={cfg.log.tracker}")
    if not run_id:
        return EvaluationTarget(None, None, "the checkpoint has no W&B run id (trained without W&B)")
    if not is_wandb_available():
        return EvaluationTarget(None, None, "wandb is not installed")
    mode, why = resolve_wandb_mode(cfg.log)
    if mode == "disabled":
        return EvaluationTarget(None, None, why)
    return EvaluationTarget(run_id, mode, why)


def _next_wandb_step(run_dir: Path) -> int:
    """A W&B step after every row the run has: its steps are images seen (metrics.jsonl holds the same
    rows) plus the steps of earlier evaluations (their reports in eval/). W&B drops rows whose step is
    not above the run's last one, offline ones included when they are synced."""
    last = 0
    try:
        with open(run_dir / "metrics.jsonl") as fh:
            for line in fh:
                try:
                    last = max(last, int(json.loads(line).get("images_seen", 0)))
                except (ValueError, TypeError, AttributeError):
                    continue
    except OSError:
        pass
    for _, report in _reports(run_dir):
        last = max(last, int((report.get("wandb") or {}).get("step") or 0))
    return last + 1


def _reports(run_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(path, report) of every evaluation report in <run_dir>/eval/."""
    reports = []
    for path in sorted((run_dir / "eval").glob("*.json")):
        try:
            reports.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    return reports


REPORT_COLUMNS = (
    "checkpoint",
    "step",
    "weights",
    "num_samples",
    "num_real",
    "fid",
    "is_mean",
    "is_std",
    "kid_mean",
    "kid_std",
)


def _report_row(report: Mapping[str, Any]) -> list[Any]:
    metrics = report.get("metrics", {})
    head = [Path(str(report.get("checkpoint", ""))).name, report.get("step"), report.get("weights")]
    return head + [metrics.get(key) for key in REPORT_COLUMNS[3:]]


def log_evaluation(
    target: EvaluationTarget, cfg: Config, run_dir: Path, report: Mapping[str, Any], out: Path
) -> dict[str, Any] | None:
    """Main process: `trainer.evaluate`'s results as one row of the training run, under eval/posthoc/,
    plotted at the checkpoint's images seen, with a table of every report in `<run_dir>/eval/`.

    Returns {"run_id", "step", "mode", "location"} for the report, or None if nothing was logged (a
    warning says why: an evaluation is never lost to a tracker problem).
    """
    if target.run_id is None:
        return None
    import wandb

    state = json.loads((Path(report["checkpoint"]) / TRAIN_STATE).read_text())
    images_seen = int(state["step"]) * int(state.get("global_batch") or cfg.train.batch_size)
    init: dict[str, Any] = {
        "id": target.run_id,
        "resume": "allow",
        "project": cfg.log.wandb_project,
        "dir": str(run_dir),
        "mode": target.mode,
    }
    if cfg.log.wandb_entity:
        init["entity"] = cfg.log.wandb_entity
    try:
        try:
            run = wandb.init(**init)
        except Exception as exc:
            if target.why != AUTO_ONLINE:
                raise
            warnings.warn(
                f"W&B could not start online ({_first_line(exc)[:200]}); logging offline instead "
                f"(log.wandb_mode=auto). Upload later with: wandb sync {run_dir / 'wandb'}/offline-run-*",
                stacklevel=2,
            )
            wandb.teardown()  # the failed attempt still holds the run id in W&B's service
            run = wandb.init(**{**init, "mode": "offline"})
        run.define_metric(STEP_METRIC)
        run.define_metric(f"{POSTHOC}/*", step_metric=STEP_METRIC)
        for name, summary in SUMMARIES.items():
            run.define_metric(name.replace("eval/", f"{POSTHOC}/"), step_metric=STEP_METRIC, summary=summary)
        metrics = report["metrics"]
        row: dict[str, Any] = {
            f"{POSTHOC}/{key}": metrics[key] for key in ("fid", "is_mean", "is_std", "kid_mean", "kid_std")
        }
        row[f"{POSTHOC}/num_samples"] = metrics["num_samples"]
        earlier = [_report_row(r) for path, r in _reports(run_dir) if path.resolve() != out.resolve()]
        table = wandb.Table(columns=list(REPORT_COLUMNS), data=[*earlier, _report_row(report)])
        row[f"{POSTHOC}/reports"] = table  # every report in <run dir>/eval/, this one last
        row[STEP_METRIC] = images_seen
        step = max(_next_wandb_step(run_dir), int(getattr(run, "step", 0) or 0))
        run.log(row, step=step)
        location = run.sync_dir if run.offline else run.url
        mode = "offline" if run.offline else "online"
        run.finish()
    except Exception as exc:  # noqa: BLE001  (the report on disk is what matters)
        warnings.warn(
            f"could not add the evaluation to W&B run {target.run_id} ({type(exc).__name__}: {_first_line(exc)}); "
            "the report is saved as usual",
            stacklevel=2,
        )
        return None
    return {"run_id": target.run_id, "step": step, "mode": mode, "location": str(location)}
