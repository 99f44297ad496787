"""Weights & Biases: the one module that knows it. Credentials, the mode, the run's name and group, the
live dashboard (`WandbSink`), its summary and model artifacts, sweeps, and `trainer.evaluate`'s
results added to the training run (`log_evaluation`).

W&B mode: `log.wandb_mode` if not `auto`, else the `WANDB_MODE` environment variable, else auto.
  online   needs credentials, found as W&B itself finds them (WANDB_API_KEY, an identity token,
           the netrc entry `wandb login` or `wandb login --host URL` writes, an api_key in W&B's
           settings file); without them the run stops at start-up, before any data is read.
  offline  writes <run.dir>/wandb/offline-run-*/, to upload later with `wandb sync`.
  auto     online with credentials, offline (with a note on how to sync) without; if the online
           start fails (no network on a compute node), a warning and offline (`start_or_fall_back`).
A resumed run continues the same W&B run: its id is kept in every checkpoint's train state, and
`trainer.evaluate` adds its results to that run too.

What answers "which model is best": the run summary keeps the lowest FID and KID and the highest IS
(`define_metric` summaries) and `best/fid`, `best/step`, `best/checkpoint` from the run's best.json;
with `log.wandb_artifacts` the generator weights become model artifacts (monitor/model_artifacts.py).
"""

from __future__ import annotations

import configparser
import copy
import json
import netrc
import os
import re
import secrets
import string
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from accelerate.utils import is_wandb_available

from trainer.core.checkpoint import CONFIG, TRAIN_STATE, TrainState, export_checkpoint_generators, generator_files
from trainer.core.config import Config, LogConfig
from trainer.monitor import model_artifacts
from trainer.monitor.sinks import STEP_METRIC, Dashboard, Record, TrackerChoice
from trainer.monitor.stopping import STOP_FILE_ENV
from trainer.util.errors import ConfigError, TrackingError
from trainer.util.ranks import launch_rank

WANDB_MODE_ALIASES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline"}
# Run-summary aggregates: the best value of a quality metric, beside its last one.
SUMMARIES = {"eval/fid": "min,last", "eval/kid_mean": "min,last", "eval/is_mean": "max,last"}
# The dashboard sections users know, charted from the start (any other is charted when first logged)
SECTIONS = ("train", "opt", "perf", "amp", "samples", "eval")
POSTHOC = "eval/posthoc"  # trainer.evaluate's rows in the training run
AUTO_ONLINE = "W&B credentials found"  # the reason of an auto choice of online: it may fall back to offline
DEFAULT_WANDB_HOST = "https://api.wandb.ai"
T = TypeVar("T")


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
    trial = current_trial(environ)
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


def start_or_fall_back(start: Callable[[str], T], mode: str, why: str, run_dir: Path) -> tuple[T, str, str]:
    """`start(mode)`, and when log.wandb_mode=auto chose online because credentials exist (`why` is
    AUTO_ONLINE) and that start fails, a warning and `start("offline")`: a compute node without a
    network is no reason to lose a run. Returns (what start returned, the mode, why). Other failures raise."""
    try:
        return start(mode), mode, why
    except Exception as exc:  # network, permissions, a bad entity: wandb raises many kinds
        if why != AUTO_ONLINE:
            raise
        import wandb

        warnings.warn(
            f"W&B could not start online ({_first_line(exc)[:200]}); logging offline instead "
            f"(log.wandb_mode=auto). Upload later with: wandb sync {run_dir / 'wandb'}/offline-run-*",
            stacklevel=3,
        )
        wandb.teardown()  # the failed attempt still holds the run id in W&B's service
        return start("offline"), "offline", f"the online start failed: {_first_line(exc)[:160]}"


class WandbSink(Dashboard):
    """The live W&B run, through Accelerate's tracker: rows and images at images seen, the best model
    in the summary and as artifacts, a sweep trial joining its agent's run."""

    kind = "wandb"

    @classmethod
    def choose(cls, cfg: Config, environ: Mapping[str, str]) -> TrackerChoice:
        """The W&B mode is resolved where it is used, on the main process (global rank 0); the launcher
        stops the other ranks when it fails."""
        if not is_wandb_available():
            raise ConfigError("log.tracker=wandb needs the wandb package: pip install wandb (or use log.tracker=none)")
        if cfg.log.wandb_mode == "auto" and environ.get("WANDB_MODE", "").strip().lower() == "disabled":
            # wandb's own off switch; Accelerate would otherwise start a no-op run
            return TrackerChoice(Dashboard.kind, "WANDB_MODE=disabled")
        if launch_rank(environ=environ) != 0:
            return TrackerChoice(cls.kind, "log.tracker=wandb", {"log_with": cls.kind})
        mode, why = resolve_wandb_mode(cfg.log, environ)  # not "disabled": handled above
        return TrackerChoice(cls.kind, why, {"log_with": cls.kind}, mode)

    def __init__(self, cfg: Config, choice: TrackerChoice, accelerator: Any) -> None:
        super().__init__(cfg, choice, accelerator)
        self.mode = choice.mode  # online | offline (main process)
        self.location: str | None = None  # the run's URL, or its offline directory
        self.sync_command: str | None = None  # offline: how to upload
        self.trial = current_trial()  # started by a W&B sweep agent: join its run
        self._artifacts: tuple[str, str] = ("upload", "")  # (upload | reference, why)
        self._sections = set(SECTIONS)  # charted against images seen; a new one is added when first logged

    @property
    def run(self) -> Any:
        return self.acc.get_tracker("wandb", unwrap=True)

    def start(self, run_id: str | None, identity: dict[str, Any], config: dict[str, Any]) -> str | None:
        cfg, run_dir = self.cfg, self.run_dir
        init: dict[str, Any] = {
            "name": identity["tracker_run_name"],
            "dir": str(run_dir),  # <run.dir>/wandb/: next to the checkpoints it belongs to
            "job_type": "train",
            "group": identity["tracker_group"],
            "tags": list(cfg.log.wandb_tags) or None,
            "id": run_id or new_run_id(),  # one id for an online attempt and its offline fallback
        }
        if cfg.log.wandb_entity:
            init["entity"] = cfg.log.wandb_entity
        if run_id:
            init["resume"] = "allow"  # same run, steps keep increasing
        if self.trial:
            init = join_agent_run(init)  # the agent's run id, project and entity
        project = None if self.trial else cfg.log.wandb_project  # a trial's project is the sweep's
        run_dir.mkdir(parents=True, exist_ok=True)

        def init_tracker(mode: str) -> None:
            try:
                self.acc.init_trackers(project, config=config, init_kwargs={"wandb": {**init, "mode": mode}})
            except Exception:
                self.acc.trackers = []  # Accelerate keeps a tracker whose start failed
                raise

        try:
            _, self.mode, self.why = start_or_fall_back(init_tracker, self.mode, self.why, run_dir)
        except Exception as exc:
            raise TrackingError(
                f"W&B could not start the run ({_first_line(exc)}); check `wandb login` and "
                "log.wandb_entity/project, or log offline with log.wandb_mode=offline and upload later "
                "with `wandb sync`"
            ) from None
        run = self.run
        define_charts(run, self._sections)
        run.define_metric("epoch", step_metric=STEP_METRIC)
        if run.offline:
            self.location = run.sync_dir
            # Every start of the run (resumes included) writes its own offline-run-* directory;
            # `wandb sync` uploads them in order into the one W&B run.
            self.sync_command = f"wandb sync {run_dir / 'wandb'}/offline-run-*"
        else:
            self.location = run.url
        self._artifacts = model_artifacts.storage(cfg.log.wandb_artifact_storage, run_dir)
        self.run_id = run.id
        return run.id

    def write(self, record: Record) -> None:
        """One row at `record.images_seen`. An owed evaluation's row goes one step later: the stopped
        start's last row holds that W&B step already, and W&B drops rows at or below a run's last step;
        its images_seen, the charts' x-axis, is the evaluated step's."""
        row = {**record.values, STEP_METRIC: record.images_seen, "epoch": record.epoch}
        new = {name.split("/")[0] for name in record.values if "/" in name} - self._sections
        if new:
            define_charts(self.run, sorted(new))
            self._sections |= new
        self.acc.log(row, step=record.images_seen + (1 if record.owed else 0))

    def image(self, key: str, path: Path, record: Record, caption: str) -> None:
        import wandb

        # With its x-axis value: otherwise W&B plots it at the last images_seen it was given.
        row = {key: wandb.Image(str(path), caption=caption), STEP_METRIC: record.images_seen, "epoch": record.epoch}
        self.acc.log(row, step=record.images_seen)

    def best(self, checkpoints: Path, best: dict[str, Any], new: bool) -> None:
        """best/fid, best/step, best/images_seen, best/checkpoint in the run summary; for a `new` best with
        log.wandb_artifacts=best|both, its generator as an artifact."""
        checkpoint = checkpoints / best["checkpoint"]
        images_seen = TrainState(step=best["step"], global_batch=self.cfg.train.batch_size).images_seen
        summary = self.run.summary
        summary["best/fid"], summary["best/step"] = best["fid"], best["step"]
        summary["best/checkpoint"], summary["best/images_seen"] = str(checkpoint.resolve()), images_seen
        if new and self.cfg.log.wandb_artifacts in ("best", "both"):
            metadata = {"fid": best["fid"], "checkpoint": str(checkpoint.resolve()), "weights": best.get("weights")}
            self._log_generator(checkpoint, best["step"], ["best", f"step-{best['step']}"], metadata, "best FID")

    def weights(self, files: dict[str, Path], state: TrainState, final: bool) -> None:
        """With log.wandb_artifacts=final|both the exported generator files as an artifact (alias final
        when training finished, step-<N> always)."""
        if self.cfg.log.wandb_artifacts in ("final", "both"):
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

        cfg, run_dir = self.cfg, self.run_dir
        how, why = self._artifacts
        images_seen = TrainState(step=step, global_batch=cfg.train.batch_size).images_seen
        metadata = {"model": vars(cfg.model), "step": step, "images_seen": images_seen, "storage": how, **extra}
        description = f"DCGAN generator of run {cfg.run.name}, step {step} ({what}); files {how}ed ({why})"
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
            self.run.log_artifact(artifact, aliases=aliases)  # upload mode: the files are staged by now

    def finish(self, requeue: bool = False) -> bool:
        """`requeue` (a run stopped early by its job script): a sweep trial's run is ended so that W&B puts
        it back in the sweep's queue."""
        if requeue and self.trial and self.acc.trackers:
            finish_for_requeue(self.run)
            self.acc.trackers = []
            return True
        return super().finish()

    def describe(self) -> str:
        if self.mode == "online":
            line = f"tracking: W&B run {self.location} ({self.why})"
        else:
            line = f"tracking: W&B offline ({self.why}) in {self.location}; upload later with: {self.sync_command}"
        return f"{line}; {describe(self.trial)}" if self.trial else line

    def summary(self) -> list[tuple[str, str]]:
        if self.mode == "online":
            return [("tracking", f"W&B {self.location}")]
        return [("tracking", f"W&B offline: {self.location}"), ("upload with", str(self.sync_command))]


def define_charts(run: Any, sections: Any, summaries_under: str = "eval") -> None:
    """Charts of `sections` against images seen, whatever the batch size or the number of processes; the
    run summary keeps the best FID / KID / IS (SUMMARIES, under `summaries_under`/) beside the last."""
    run.define_metric(STEP_METRIC)
    for section in sections:
        run.define_metric(f"{section}/*", step_metric=STEP_METRIC)
    for name, summary in SUMMARIES.items():
        run.define_metric(name.replace("eval/", f"{summaries_under}/", 1), step_metric=STEP_METRIC, summary=summary)


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

    state = TrainState.from_json(json.loads((Path(report["checkpoint"]) / TRAIN_STATE).read_text()))
    state.global_batch = state.global_batch or cfg.train.batch_size
    init: dict[str, Any] = {
        "id": target.run_id,
        "resume": "allow",
        "project": cfg.log.wandb_project,
        "dir": str(run_dir),
    }
    if cfg.log.wandb_entity:
        init["entity"] = cfg.log.wandb_entity
    try:
        run, _, _ = start_or_fall_back(lambda mode: wandb.init(**init, mode=mode), target.mode, target.why, run_dir)
        define_charts(run, [POSTHOC], summaries_under=POSTHOC)
        metrics = report["metrics"]
        row: dict[str, Any] = {
            f"{POSTHOC}/{key}": metrics[key] for key in ("fid", "is_mean", "is_std", "kid_mean", "kid_std")
        }
        row[f"{POSTHOC}/num_samples"] = metrics["num_samples"]
        earlier = [_report_row(r) for path, r in _reports(run_dir) if path.resolve() != out.resolve()]
        table = wandb.Table(columns=list(REPORT_COLUMNS), data=[*earlier, _report_row(report)])
        row[f"{POSTHOC}/reports"] = table  # every report in <run dir>/eval/, this one last
        row[STEP_METRIC] = state.images_seen
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


# ---- sweeps ---------------------------------------------------------------------------------------
# Training runs started by a W&B sweep agent: each trial in a directory of its own, in the agent's W&B run.
#
# W&B's own machinery does the sweeping; this module holds only what a trial does differently.
# - `wandb sweep configs/sweeps/<name>.yaml` registers the search with the W&B server, whose
#   controller proposes each trial's parameters (Bayesian search, hyperband early termination) from
#   the metric the YAML names: `eval/fid` (METRIC), which the loop logs at every evaluation.
# - `wandb agent <sweep>` takes a trial, writes its parameters to $WANDB_SWEEP_PARAM_PATH and runs
#   the sweep's `command:` (`accelerate launch trainer/train.py ... ${args_no_hyphens}`) with
#   WANDB_SWEEP_ID and WANDB_RUN_ID set. The trainer reads `key=value` and `--key=value` alike
#   (core/config.py). `wandb.init` joins the agent's run by itself: it takes the run id, project and
#   entity from the agent (ignoring, with a warning, any it is given) and the parameters from the file.
#
# What the trainer adds (hooks: `loop.train`, `WandbSink.start`, `WandbSink.finish`):
# - Its own run directory, `<run.dir>/<trial run id>` (`place`): trials never meet in one directory,
#   and the run lock works per trial. A trial that W&B requeues comes back with the same run id, so
#   it finds its directory, resumes from its newest checkpoint (run.resume=auto) and continues its
#   W&B run.
# - Requeue: a trial stopped through a job script's channel (a STOP file: `<run.dir>/STOP` or
#   $DCGAN_STOP_FILE, see monitor/stopping.py; or SIGUSR1), which launch/slurm/sweep_array.sbatch
#   uses before a time limit and on preemption, marks its W&B run preempting and finishes it with a
#   non-zero exit code: W&B puts such a run back in the sweep's queue and the next agent gets it. A
#   stop by SIGTERM or SIGINT alone (the agent ending a trial early for hyperband, a user) ends it.
# - A W&B run name that says which trial it is (`wandb_sink.display_name`).

# The sweep's metric (`metric.name` in configs/sweeps/*.yaml): the in-training FID, one history row
# per evaluation, which both the Bayesian search and hyperband read.
METRIC = "eval/fid"
# The W&B run's exit code for a trial to requeue: W&B requeues a run marked preempting that ends with
# any non-zero code; 75 is EX_TEMPFAIL ("try again later"). The process itself exits 0, as any clean stop.
REQUEUE_EXIT_CODE = 75
_RUN_ID = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Trial:
    """A run started by `wandb agent`: the sweep, the W&B run id it was given, and its parameters."""

    sweep_id: str
    run_id: str
    params: dict[str, Any] = field(default_factory=dict)  # {"train.lr": 0.0003, ...}, as the agent passed them


def _params(path: str | None) -> dict[str, Any]:
    """The trial's parameters from the agent's file ({key: {value: v}}); {} where it cannot be read."""
    if not path:
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(data, Mapping):
        return {}
    return {
        str(key): item["value"]
        for key, item in data.items()
        if not str(key).startswith("_") and isinstance(item, Mapping) and "value" in item
    }


def current_trial(environ: Mapping[str, str] = os.environ) -> Trial | None:
    """The trial this process runs, when a W&B agent started it (WANDB_SWEEP_ID and WANDB_RUN_ID set), else None."""
    sweep_id, run_id = environ.get("WANDB_SWEEP_ID", "").strip(), environ.get("WANDB_RUN_ID", "").strip()
    if not (sweep_id and run_id):
        return None
    if not _RUN_ID.fullmatch(run_id):
        raise ConfigError(
            f"WANDB_RUN_ID={run_id!r} (set by the W&B agent of sweep {sweep_id}) cannot name a run directory; "
            "W&B run ids are letters, digits, '-' and '_'"
        )
    return Trial(sweep_id, run_id, _params(environ.get("WANDB_SWEEP_PARAM_PATH")))


def place(cfg: Config, trial: Trial | None) -> Config:
    """The config a trial trains with: run.dir becomes `<run.dir>/<trial run id>` (unless it already ends
    in the run id, e.g. run.dir=runs/x/${oc.env:WANDB_RUN_ID}). Outside a sweep, `cfg` as it is."""
    if trial is None or Path(cfg.run.dir).name == trial.run_id:
        return cfg
    placed = copy.deepcopy(cfg)
    placed.run.dir = str(Path(cfg.run.dir) / trial.run_id)
    return placed


def join_agent_run(init: Mapping[str, Any]) -> dict[str, Any]:
    """`wandb.init`'s arguments for a trial: without id, project and entity, which W&B takes from the agent
    (it would ignore ours, with a warning each). The rest (name, dir, mode, resume, ...) stays."""
    return {key: value for key, value in init.items() if key not in ("id", "project", "entity")}


def requeue_wanted(stop_reason: str | None, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a trial that stopped early asks W&B to requeue it: the stop came through a job script's
    channel (a STOP file or SIGUSR1), or the job script's stop file exists now (it creates it when Slurm
    sends SIGTERM for a time limit or a preemption, a moment after the trainer got the same signal)."""
    if stop_reason is None:
        return False
    job_file = environ.get(STOP_FILE_ENV, "")
    return stop_reason == "SIGUSR1" or stop_reason.endswith(" exists") or bool(job_file and Path(job_file).exists())


def finish_for_requeue(run: Any) -> None:
    """End the trial's W&B run so that W&B requeues it: marked preempting, then finished with a non-zero code."""
    run.mark_preempting()
    run.finish(exit_code=REQUEUE_EXIT_CODE)


def describe(trial: Trial) -> str:
    return f"W&B sweep {trial.sweep_id}, trial {trial.run_id}"
