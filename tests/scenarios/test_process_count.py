"""Another number of processes on resume (2 -> 1 -> 2), as clusters hand back fewer GPUs after a requeue.

The data order (global batches, each rank its slice) and the noise (one seed per step for the whole
global batch, each rank its slice) are the same for any process count; BatchNorm is the rest. On
the CPU there is no SyncBatchNorm, so each of two processes normalises over its own half of the
batch, and one process over all of it: a resume on another count changes the training. It is
refused, naming both counts and the override, with nothing written; with run.resume_changes=allow it
goes on, says why it differs, and every checkpoint records the count that wrote it. (With
SyncBatchNorm on both sides it resumes with a note: docs/reliability.md.)
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import read_metrics
from tests.scenarios.harness import env, recipe, train, wandb_runs

pytestmark = pytest.mark.slow


def _written_by(run_dir, step: int) -> tuple[int, bool]:
    state = json.loads((run_dir / "checkpoints" / f"step-{step:08d}" / "train_state.json").read_text())
    return state["num_processes"], state["sync_bn"]


def _snapshot(directory):
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in directory.rglob("*")}


def test_resume_on_another_number_of_processes_is_refused_unless_allowed(tmp_path):
    run_dir, environ = tmp_path / "run", env(tmp_path / "home")

    def args(steps: int, *more: str) -> list[str]:
        return recipe(run_dir, tmp_path / "cache", f"train.max_steps={steps}", "eval.every_epochs=null", *more)

    train(args(10), environ, processes=2)
    assert _written_by(run_dir, 10) == (2, False)

    before = _snapshot(run_dir)
    refused = train(args(20), environ, processes=1, check=False)
    assert refused.returncode == 2, refused.stderr[-3000:]
    (error,) = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert "written by 2 processes, this run has 1" in error and "run.resume_changes=allow" in error
    assert _snapshot(run_dir) == before  # refused before anything was written

    one = train(args(20, "run.resume_changes=allow"), environ, processes=1).stdout
    assert "resuming with another number of processes (run.resume_changes=allow)" in one
    assert "(16 per process x 1)" in one and "finished at step 20/20" in one
    assert _written_by(run_dir, 20) == (1, False)

    two = train(args(30, "run.resume_changes=allow"), environ, processes=2).stdout
    assert "written by 1 process, this run has 2" in two and "finished at step 30/30" in two
    assert _written_by(run_dir, 30) == (2, False)

    assert [r["step"] for r in read_metrics(run_dir)] == [5, 10, 15, 20, 25, 30]
    runs = wandb_runs(run_dir)
    assert len(runs) == 3 and {run.run_id for run in runs} == {runs[0].run_id}
    assert [run.config["launch"]["num_processes"] for run in runs] == [2, 1, 2]
