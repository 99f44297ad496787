"""Checks that misbehave on purpose, injected with `--extra-check tests.acceptance_fixtures:NAME[:cap]`."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from trainer.acceptance.runner import Context

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
