"""Checks that misbehave on purpose, injected with `--extra-check tests.gpu_check_fixtures:NAME[:cap]`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tools.gpu_check.runner import Context

SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]


def raises(ctx: Context) -> None:
    ctx.record(before_the_error=1)
    raise RuntimeError("boom on purpose")


def passes(ctx: Context) -> None:
    ctx.record(answer=42)


def sleeps_past_cap(ctx: Context) -> None:
    """Sleeps in the check itself, with a grandchild in its own session (as torchrun's workers are)."""
    grandchild = subprocess.Popen(SLEEP, start_new_session=True)
    Path(ctx.work, "grandchild.pid").write_text(str(grandchild.pid))
    ctx.record(started=True, grandchild_pid=grandchild.pid)
    time.sleep(600)


def hangs_in_command(ctx: Context) -> None:
    """A command that outlives the check's time: Context.run stops it and the check reports a timeout."""
    ctx.record(started=True)
    ctx.run(SLEEP, "sleeper")


def hogs(ctx: Context) -> None:
    """No cap of its own: it gets the rest of the budget, and sleeps past it."""
    time.sleep(600)


def never_reached(ctx: Context) -> None:
    """Placed after `hogs`: the budget is spent, so the runner must skip it."""
    ctx.record(ran=True)


def trains_past_cap(ctx: Context) -> None:
    """A training run that has logged three windows when the cap kills the check (as a slow compile would):
    the check recorded nothing itself; the report must still show how far the run got."""
    run_dir = Path(ctx.work) / "run"
    run_dir.mkdir()
    ctx.watch(run_dir)
    lines = [
        {"step": 50, "images_per_s": 100.0, "loss_D": 1.2, "loss_G": 0.9, "diversity": 0.61},
        {"step": 100, "images_per_s": 3000.0, "loss_D": 1.1, "loss_G": 1.0, "diversity": 0.62},
        {"step": 150, "images_per_s": 3200.0, "loss_D": 1.0, "loss_G": 1.1, "diversity": 0.64},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 2')
    time.sleep(600)


def leaves_a_process(ctx: Context) -> None:
    """Starts a command in its own session and returns without waiting for it (a leak the runner must clean)."""
    child = subprocess.Popen(SLEEP, start_new_session=True)
    ctx.record(leaked_pid=child.pid)
    time.sleep(600)
