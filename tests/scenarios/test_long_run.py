"""Long-run shape: the recipe's whole course on two ranks, scaled down.

Two gloo processes train 48 steps (3 epochs of 16) with an evaluation every 10 steps and at the end
(5 evaluations: the second one used to meet the other rank in a different collective), fixed-noise
grids every 10 steps and at epoch ends, and checkpoints every 10 steps with only 2 kept. Checks:
every due evaluation is in metrics.jsonl once; the best checkpoint is the lowest FID's and survived
rotation; the grids are there; the offline W&B run holds every FID row of metrics.jsonl at its images
seen, and its summary the lowest FID with best/step and best/fid from best.json. The plotting scripts
in docs/ draw the run from its metrics.jsonl.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from tests.conftest import REPO
from tests.scenarios.harness import best, env, evaluations, recipe, train, wandb_evaluations, wandb_runs

pytestmark = pytest.mark.slow


def test_several_evaluations_grids_rotation_and_one_wandb_run_on_two_ranks(tmp_path):
    run_dir = tmp_path / "run"
    args = recipe(run_dir, tmp_path / "cache", "train.epochs=3", "eval.every_steps=10", "ckpt.keep=2")
    out = train(args, env(tmp_path / "home")).stdout
    assert "(8 per process x 2)" in out and "finished at step 48/48" in out

    evals = evaluations(run_dir)
    assert [step for step, _ in evals] == [10, 20, 30, 40, 48]
    best_step, best_fid = min(evals, key=lambda e: e[1])
    record = best(run_dir)
    assert (record["step"], record["fid"], record["checkpoint"]) == (best_step, best_fid, f"step-{best_step:08d}")
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    # ckpt.keep=2: the newest two (40, and 48 at the end) plus the best, whatever step it was
    assert checkpoints == sorted({"step-00000040", "step-00000048", f"step-{best_step:08d}"})

    grids = sorted(p.name for p in (run_dir / "samples").glob("*.png"))
    expected = [f"epoch_{e:03d}.png" for e in (1, 2, 3)] + [f"step_{s:08d}.png" for s in (10, 20, 30, 40)]
    assert grids == sorted(["real.png", *expected])

    (run,) = wandb_runs(run_dir)
    assert run.exit_code == 0
    assert wandb_evaluations([run]) == [(step * 16, fid) for step, fid in evals]
    assert run.summary["eval/fid"]["min"] == best_fid
    assert (run.summary["best/step"], run.summary["best/fid"]) == (best_step, best_fid)
    assert run.summary["best/checkpoint"] == str((run_dir / "checkpoints" / record["checkpoint"]).resolve())

    # The plotting scripts on this run: every chart from the rows that have its key, epochs from the rows
    for script in ("plot_run.py", "plot_quality_curve.py"):
        out = tmp_path / f"{script}.png"
        done = subprocess.run(
            [sys.executable, str(REPO / "docs" / script), str(run_dir), str(out)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
        with Image.open(out) as image:
            assert image.size[0] > 800 and image.getextrema() != ((255, 255),) * 3
    table = [line for line in done.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [line.split(" | ")[:2] for line in table] == [  # 16 steps per epoch, from the rows
        ["| 0.62", "10"],
        ["| 1.25", "20"],
        ["| 1.88", "30"],
        ["| 2.50", "40"],
        ["| 3.00", "48"],
    ]
