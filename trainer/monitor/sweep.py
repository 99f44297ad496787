"""Training runs started by a W&B sweep agent: each trial in a directory of its own, in the agent's W&B run.

W&B's own machinery does the sweeping; this module holds only what a trial does differently.
- `wandb sweep configs/sweeps/<name>.yaml` registers the search with the W&B server, whose
  controller proposes each trial's parameters (Bayesian search, hyperband early termination) from
  the metric the YAML names: `eval/fid` (METRIC), which the loop logs at every evaluation.
- `wandb agent <sweep>` takes a trial, writes its parameters to $WANDB_SWEEP_PARAM_PATH and runs
  the sweep's `command:` (`accelerate launch trainer/train.py ... ${args_no_hyphens}`) with
  WANDB_SWEEP_ID and WANDB_RUN_ID set. The trainer reads `key=value` and `--key=value` alike
  (core/config.py). `wandb.init` joins the agent's run by itself: it takes the run id, project and
  entity from the agent (ignoring, with a warning, any it is given) and the parameters from the file.

What the trainer adds (hooks: `loop.train`, `WandbSink.start`, `WandbSink.finish`):
- Its own run directory, `<run.dir>/<trial run id>` (`place`): trials never meet in one directory,
  and the run lock works per trial. A trial that W&B requeues comes back with the same run id, so
  it finds its directory, resumes from its newest checkpoint (run.resume=auto) and continues its
  W&B run.
- Requeue: a trial stopped through a job script's channel (a STOP file: `<run.dir>/STOP` or
  $DCGAN_STOP_FILE, see monitor/stopping.py; or SIGUSR1), which launch/slurm/sweep_array.sbatch
  uses before a time limit and on preemption, marks its W&B run preempting and finishes it with a
  non-zero exit code: W&B puts such a run back in the sweep's queue and the next agent gets it. A
  stop by SIGTERM or SIGINT alone (the agent ending a trial early for hyperband, a user) ends it.
- A W&B run name that says which trial it is (`wandb_sink.display_name`).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.core.config import Config
from trainer.monitor.stopping import STOP_FILE_ENV
from trainer.util.errors import ConfigError

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
