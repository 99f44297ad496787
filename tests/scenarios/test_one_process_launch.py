"""A launch that is not what the user meant: `accelerate launch --num_processes 2 trainer/train.py`
without `--multi_gpu`, on a machine without GPUs.

Accelerate then starts its single-process launcher (no WORLD_SIZE, but the MASTER_ADDR it sets for
a multi-process launch), and the trainer used to train that one process without a word. It now
says so at start, naming --multi_gpu and the one-node Accelerate config, and trains the one process
(a warning, not an error: a MASTER_ADDR can also come from the user's own environment).
"""

from __future__ import annotations

import pytest

from tests.conftest import launch_command, run_command, smoke_args, trainer_env

pytestmark = pytest.mark.slow

QUIET = ["log.tracker=none"]


def test_a_launch_that_starts_one_process_instead_of_several_says_so(tmp_path):
    """`accelerate launch --num_processes 2` without --multi_gpu runs one process (on a CPU machine)."""
    command = launch_command(smoke_args(tmp_path / "run", "train.max_steps=2", *QUIET), processes=2)
    command.remove("--multi_gpu")
    proc = run_command(command, trainer_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(16 per process x 1)" in proc.stdout  # one process trained
    assert "warning: `accelerate launch` started ONE process" in proc.stderr and "--multi_gpu" in proc.stderr
