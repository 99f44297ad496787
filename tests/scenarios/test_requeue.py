"""Requeue as a new Slurm job: one W&B run, with the name and group of its first start.

Two gloo ranks train 10 steps under SLURM_JOB_ID=4242 (a job whose time ran out); the same run
then continues under another job, SLURM_JOB_ID=5555 (resubmitted, or the next of a dependency
chain: job.sh's own requeue keeps the job id, tests/slurm covers it). The W&B
run keeps its id, its name (smoke-4242, chosen at the first start and kept in the checkpoints; it
used to become smoke-5555) and its group (run.name; it used to be the job id and move with it), and
its config lists the Slurm job of each start instead of holding only the last one.
"""

from __future__ import annotations

import json

import pytest

from tests.scenarios.harness import env, recipe, train, wandb_runs

pytestmark = pytest.mark.slow


def test_a_run_resumed_under_another_slurm_job_keeps_its_wandb_run_name_and_group(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"

    def args(steps: int) -> list[str]:
        return recipe(run_dir, cache, f"train.max_steps={steps}", "eval.every_epochs=null")

    first = env(tmp_path / "home", SLURM_JOB_ID="4242", SLURM_JOB_NAME="dcgan", SLURM_RESTART_COUNT="0")
    assert "finished at step 10/10" in train(args(10), first).stdout
    second = env(tmp_path / "home", SLURM_JOB_ID="5555", SLURM_JOB_NAME="dcgan", SLURM_RESTART_COUNT="0")
    assert "resumed from" in (out := train(args(20), second).stdout) and "finished at step 20/20" in out

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
