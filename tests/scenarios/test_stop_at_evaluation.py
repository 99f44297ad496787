"""Stop at an evaluation step, and between two: every due evaluation happens exactly once.

A stop writes its checkpoint before anything else (under torchrun SIGTERM leaves 30 s), so an
evaluation due at the stop's step is recorded in that checkpoint and done first by the resume;
before, it was lost, and the stopped-and-resumed run's best FID differed from the uninterrupted
run's. Two cases on two gloo ranks, each against an uninterrupted run of the same settings:
- a STOP file written while the run starts, with an evaluation every 10 steps: the ranks stop at
  step 10, which is an evaluation step;
- SIGUSR1 to the training processes (Slurm's warning signal), with an evaluation every epoch of 16
  steps and at the end (step 30): the ranks stop at step 10 or 20, between two evaluations.
Each due evaluation appears once in metrics.jsonl and once in W&B (over both starts, at steps that
`wandb sync` keeps), with the uninterrupted run's FIDs, and the best checkpoint is the same.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.scenarios.harness import (
    best,
    env,
    evaluations,
    finish,
    recipe,
    start,
    train,
    wait_for,
    wandb_evaluations,
    wandb_runs,
    wandb_steps,
    workers,
)

pytestmark = pytest.mark.slow

SETTINGS = {
    "stop_file_on_an_evaluation_step": [
        "train.max_steps=30",
        "eval.every_steps=10",
        "ckpt.every_steps=5",
    ],
    "sigusr1_between_evaluations": [
        "train.max_steps=30",
        "eval.every_epochs=1",
        "ckpt.every_steps=5",
    ],
}


@pytest.mark.parametrize("case", list(SETTINGS))
def test_a_stop_then_resume_evaluates_each_due_step_once(tmp_path, case):
    cache, environ = tmp_path / "cache", env(tmp_path / "home")
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    train(recipe(reference, cache, *SETTINGS[case]), environ)

    proc = start(recipe(stopped, cache, *SETTINGS[case]), environ)
    if case.startswith("stop_file"):
        wait_for(stopped / ".run-lock.json", proc)  # the run is starting up
        (stopped / "STOP").touch()
    else:
        wait_for(stopped / "checkpoints" / "step-00000005", proc)  # training, signal handlers in place
        for pid in workers(proc.pid):
            os.kill(pid, signal.SIGUSR1)
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    step = json.loads((stopped / "status.json").read_text())["step"]
    on_evaluation_step = case.startswith("stop_file")
    if on_evaluation_step:
        assert step == 10 and f"stopped at step 10/30 ({stopped / 'STOP'} exists)" in out
    else:
        assert step in (10, 20) and f"stopped at step {step}/30 (SIGUSR1)" in out
    saved = json.loads((stopped / "checkpoints" / f"step-{step:08d}" / "train_state.json").read_text())
    assert saved["evaluation_due"] is on_evaluation_step
    assert all(s < step for s, _ in evaluations(stopped))  # the stop evaluated nothing

    resumed = train(recipe(stopped, cache, *SETTINGS[case]), environ).stdout
    assert ("its evaluation still due" in resumed) is on_evaluation_step
    assert "finished at step 30/30" in resumed

    expected = evaluations(reference)
    assert [s for s, _ in expected] == ([10, 20, 30] if on_evaluation_step else [16, 30])
    assert evaluations(stopped) == expected  # each once, with the uninterrupted run's scores
    assert best(stopped) == best(reference)

    runs = wandb_runs(stopped)
    assert len(runs) == 2 and runs[0].run_id == runs[1].run_id  # one W&B run over both starts
    assert wandb_evaluations(runs) == [(s * 16, fid) for s, fid in expected]
    steps = wandb_steps(runs)
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # every row survives `wandb sync`
    assert runs[1].summary["best/step"] == best(reference)["step"]
