"""Requeue as a new Slurm job: one W&B run, with the name and group of its first start.

Two gloo ranks start under SLURM_JOB_ID=4242 and stop (a STOP file written while the run starts,
as job.sh writes it on Slurm's warning signal); the same command then resumes under another job,
SLURM_JOB_ID=5555 (a job resubmitted after the first was cancelled, or a dependency chain). The W&B
run keeps its id, its name (smoke-4242, chosen at the first start and kept in the checkpoints; it
used to become smoke-5555) and its group (run.name; it used to be the job id and move with it), and
its config lists the Slurm job of each start instead of holding only the last one.
"""

from __future__ import annotations

import json

import pytest

from tests.scenarios.harness import env, finish, recipe, start, train, wait_for, wandb_runs

pytestmark = pytest.mark.slow


def test_a_run_resumed_under_another_slurm_job_keeps_its_wandb_run_name_and_group(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    args = recipe(run_dir, cache, "train.max_steps=20", "eval.every_epochs=null")
    first = env(tmp_path / "home", SLURM_JOB_ID="4242", SLURM_JOB_NAME="dcgan", SLURM_RESTART_COUNT="0")
    proc = start(args, first)
    wait_for(run_dir / ".run-lock.json", proc)
    (run_dir / "STOP").touch()
    out = finish(proc)
    assert proc.returncode == 0 and "stopped at step 10/20" in out, out[-3000:]

    second = env(tmp_path / "home", SLURM_JOB_ID="5555", SLURM_JOB_NAME="dcgan", SLURM_RESTART_COUNT="0")
    assert "finished at step 20/20" in train(args, second).stdout

    runs = wandb_runs(run_dir)
    assert len(runs) == 2
    assert {run.run_id for run in runs} == {runs[0].run_id}
    assert [(run.name, run.group) for run in runs] == [("smoke-4242", "smoke")] * 2
    jobs = runs[1].config["slurm"]["jobs"]
    assert [(job["job_id"], job["restart_count"], job["job_name"]) for job in jobs] == [
        ("4242", 0, "dcgan"),
        ("5555", 0, "dcgan"),
    ]
    assert runs[0].config["slurm"]["jobs"] == jobs[:1]
    state = json.loads((run_dir / "checkpoints" / "step-00000020" / "train_state.json").read_text())
    assert (state["tracker_run_name"], state["tracker_group"], state["slurm_jobs"]) == ("smoke-4242", "smoke", jobs)
