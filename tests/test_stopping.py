"""Clean stops: SIGINT, SIGUSR1 and SIGTERM, a second Ctrl-C, and the STOP file.

In process, the signals are raised in the test process itself against a real StopRequest; the
slow tests send SIGINT and SIGUSR1 to a running trainer (SIGTERM and the STOP file, with a resume
that must match an uninterrupted run, are in tests/test_checkpoint.py).
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from accelerate import Accelerator

from tests.conftest import smoke_args, start_trainer
from tests.test_training import _wait_for
from trainer.monitor.stopping import STOP_FILE, StopRequest

SIGNALS = [signal.SIGINT, signal.SIGUSR1, signal.SIGTERM]


@pytest.fixture
def stop(tmp_path):
    request = StopRequest(tmp_path, Accelerator(cpu=True), check_every=10)
    try:
        yield request
    finally:
        request.close()


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_a_signal_stops_at_the_next_agreed_step_and_the_handlers_are_restored(tmp_path, sig):
    before = {s: signal.getsignal(s) for s in SIGNALS}
    stop = StopRequest(tmp_path, Accelerator(cpu=True), check_every=10)
    try:
        assert not stop.should_stop(10)
        signal.raise_signal(sig)
        assert stop.reason == sig.name and not stop.agreed
        assert not stop.should_stop(13)  # the ranks compare notes every 10 steps only
        assert stop.should_stop(20) and stop.agreed
    finally:
        stop.close()
    assert {s: signal.getsignal(s) for s in SIGNALS} == before


def test_a_second_ctrl_c_stops_at_once(stop):
    signal.raise_signal(signal.SIGINT)
    assert stop.reason == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)  # no checkpoint: the user insists


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=lambda s: s.name)
def test_repeated_other_signals_just_keep_the_stop_request(stop, sig):
    """Slurm may send its warning signal, then SIGTERM: the run still stops cleanly, with its checkpoint."""
    signal.raise_signal(signal.SIGUSR1)
    signal.raise_signal(sig)
    assert stop.reason == sig.name and stop.should_stop(10)


def test_stop_file_is_stale_at_start_and_consumed_at_the_end(tmp_path):
    stop_file = tmp_path / STOP_FILE
    stop_file.touch()
    os.utime(stop_file, (time.time() - 3600, time.time() - 3600))  # left from an earlier job: not for this one
    stop = StopRequest(tmp_path, Accelerator(cpu=True), check_every=10, started=time.time() - 60)
    try:
        assert not stop_file.exists() and not stop.should_stop(10)
        stop_file.touch()
        assert stop.should_stop(20) and stop.reason == f"{stop_file} exists"
    finally:
        stop.close()
    assert not stop_file.exists()


def test_a_stop_file_written_while_the_start_prepares_is_for_this_start(tmp_path):
    """Packing data or reference statistics can take minutes: a STOP written meanwhile is honoured."""
    (tmp_path / STOP_FILE).touch()
    stop = StopRequest(tmp_path, Accelerator(cpu=True), check_every=10, started=time.time() - 60)
    try:
        assert (tmp_path / STOP_FILE).exists() and stop.should_stop(10)
    finally:
        stop.close()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR1], ids=lambda s: s.name)
def test_signal_to_the_trainer_itself_stops_cleanly_with_a_checkpoint(tmp_path, sig):
    """SIGINT is Ctrl-C; SIGUSR1 is Slurm's warning signal (`--signal=USR1@...`) sent to the trainer."""
    run_dir = tmp_path / "run"
    args = ["data.fake_size=1024", "train.epochs=1", "ckpt.every_steps=8", "ckpt.keep=50", "log.tracker=none"]
    proc = start_trainer(smoke_args(run_dir, *args))
    try:
        _wait_for(run_dir / "checkpoints" / "step-00000008", proc, timeout=120)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    stop_line = next(line for line in out.splitlines() if line.startswith("stopped at step"))
    assert f"({sig.name}); run the same command to resume" in stop_line
    step = int(stop_line.split()[3].split("/")[0])
    assert step % 10 == 0 and step < 64, stop_line
    assert (run_dir / "checkpoints" / f"step-{step:08d}" / "manifest.json").is_file()
    assert (run_dir / "generator.safetensors").is_file()
