"""What the scenario tests share: the recipe at tiny size on two gloo ranks, W&B offline, and the
records a run leaves (metrics.jsonl, best.json, the offline W&B run) read back.

Every run goes through `accelerate launch --multi_gpu --num_processes 2 trainer/train.py`, the users'
command, with TORCH_DISTRIBUTED_DEBUG=DETAIL (tests/conftest.py): ranks that call different
collectives fail with both calls named, and a run that hangs is killed by the harness timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import launch_command, read_metrics, run_command, smoke_args, trainer_env
from tests.wandb_offline import offline_run_files, read_offline_run

STANDIN = "tests.standin_extractor:StandInExtractor"
TIMEOUT_S = 240  # per run: a hang fails the test instead of blocking the suite


def recipe(run_dir: Path, cache: Path, *overrides: str) -> list[str]:
    """The smoke config (256 generated images, 16 steps of 16 per epoch) with evaluation by the stand-in
    extractor on few samples, W&B offline."""
    return smoke_args(
        run_dir,
        f"eval.feature_extractor={STANDIN}",
        f"eval.cache_dir={cache}",
        "eval.num_samples=64",
        "eval.batch_size=32",
        "eval.kid_subset_size=32",
        "eval.kid_subsets=5",
        "log.tracker=wandb",
        *overrides,
    )


def env(home: Path, **extra: str) -> dict[str, str]:
    """No W&B credentials (offline), no Slurm variables but the ones given."""
    environ = {k: v for k, v in trainer_env().items() if not k.startswith(("WANDB_", "SLURM_"))}
    home.mkdir(parents=True, exist_ok=True)
    environ.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), WANDB_MODE="offline", **extra)
    return environ


def train(args: list[str], environ: dict[str, str], processes: int = 2, check: bool = True):
    proc = run_command(launch_command(args, processes), environ, TIMEOUT_S)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def start(args: list[str], environ: dict[str, str], processes: int = 2) -> subprocess.Popen:
    return subprocess.Popen(
        launch_command(args, processes),
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended ({proc.returncode}) before {path} appeared:\n{proc.stdout.read()[-3000:]}"
            )
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"{path} did not appear within {timeout:.0f}s")
        time.sleep(0.05)


def finish(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"still running after {TIMEOUT_S}s, killed:\n{out[-3000:]}") from None
    return out


def workers(launcher: int) -> list[int]:
    """The training processes `accelerate launch` started (its child processes)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == launcher and b"train.py" in (stat.parent / "cmdline").read_bytes():
            found.append(int(stat.parent.name))
    return found


def evaluations(run_dir: Path) -> list[tuple[int, float]]:
    """(step, FID) of every evaluation row of metrics.jsonl, in order."""
    return [(r["step"], r["fid"]) for r in read_metrics(run_dir) if "fid" in r]


def best(run_dir: Path) -> dict:
    return json.loads((run_dir / "checkpoints" / "best.json").read_text())


def wandb_runs(run_dir: Path) -> list:
    """The offline W&B run of every start, oldest first."""
    return [read_offline_run(path) for path in offline_run_files(run_dir)]


def wandb_evaluations(runs: list) -> list[tuple[int, float]]:
    """(images seen, FID) of every W&B row holding a FID, over every start, in order."""
    return [(row["images_seen"], row["eval/fid"]) for run in runs for row in run.rows_with("eval/fid")]


def wandb_steps(runs: list) -> list[int]:
    """The W&B step of every row over every start: `wandb sync` keeps a row only above the last one."""
    return [row["_step"] for run in runs for row in run.history]
