"""One writer per run directory, and workers that die with their launcher."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import run_trainer, smoke_args, start_trainer
from trainer.monitor.run_lock import LOCK_FILE, RunDirectoryBusy, RunLock


def _write_lock(run_dir: Path, **owner) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    path.write_text(
        json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "pid_started": "", "started": "x", **owner})
    )
    return path


def test_a_live_owner_keeps_the_lock_and_is_named(tmp_path):
    first = RunLock(tmp_path).acquire()
    try:
        with pytest.raises(RunDirectoryBusy) as info:
            RunLock(tmp_path).acquire()
        message = str(info.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in message and "another run.name" in message
    finally:
        first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    RunLock(tmp_path).acquire().release()  # free again


def test_a_dead_owner_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, pid=dead.pid)
    lock = RunLock(tmp_path).acquire()
    assert lock.took_over is not None and lock.took_over.pid == dead.pid
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_reused_pid_is_not_the_owner(tmp_path):
    _write_lock(tmp_path, pid=os.getpid(), pid_started="1")  # this pid, but a process started at another time
    lock = RunLock(tmp_path).acquire()
    assert lock.took_over is not None
    lock.release()


def test_another_host_counts_as_alive_until_its_heartbeat_is_old(tmp_path):
    path = _write_lock(tmp_path, host="node-that-was-lost", pid=1)
    with pytest.raises(RunDirectoryBusy, match="node-that-was-lost"):
        RunLock(tmp_path, stale_after_s=60).acquire()
    old = time.time() - 120
    os.utime(path, (old, old))
    lock = RunLock(tmp_path, stale_after_s=60).acquire()
    assert lock.took_over.host == "node-that-was-lost"
    lock.release()


def test_heartbeat_keeps_the_lock_fresh(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.1).acquire()
    old = time.time() - 1000
    os.utime(tmp_path / LOCK_FILE, (old, old))
    time.sleep(0.5)
    assert time.time() - (tmp_path / LOCK_FILE).stat().st_mtime < 5
    lock.release()


def _worker_pids(run_dir: Path) -> list[int]:
    """Training processes whose command line names this run directory (launcher and workers)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if f"run.dir={run_dir}" in cmdline and "train.py" in cmdline:
                pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_second_start_is_refused_and_a_killed_launchers_workers_die_then_the_next_start_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = smoke_args(run_dir, "train.epochs=10000", "ckpt.every_steps=10", "log.every_steps=10", "log.tracker=none")
    first = start_trainer(args, processes=2)
    output: list[str] = []
    # Drain its output: a full pipe would block the run (it logs every 10 steps, tens of steps a second).
    threading.Thread(target=lambda: output.extend(first.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        # Any checkpoint: with ckpt.keep=2 and a fast run, a given early step is rotated away within a second.
        while not list((run_dir / "checkpoints").glob("step-*")):
            assert first.poll() is None and time.monotonic() < deadline, "".join(output)[-3000:]
            time.sleep(0.5)
        config_before = (run_dir / "config.yaml").stat().st_mtime_ns

        start = time.monotonic()
        second = run_trainer(args, processes=2, check=False, timeout=120)
        assert second.returncode != 0 and time.monotonic() - start < 60, second.stdout[-3000:] + second.stderr[-3000:]
        assert "is in use by another training run" in second.stderr and f"on {socket.gethostname()}" in second.stderr
        assert (run_dir / "config.yaml").stat().st_mtime_ns == config_before  # the second touched nothing

        workers = [pid for pid in _worker_pids(run_dir) if pid != first.pid]
        assert len(workers) == 2
        os.kill(first.pid, signal.SIGKILL)  # the launcher only
        first.wait()
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() and b"Z" not in _state(pid) for pid in workers):
            assert time.monotonic() < deadline, "the workers outlived their launcher by 10 s"
            time.sleep(0.2)
    finally:
        for pid in _worker_pids(run_dir):
            os.kill(pid, signal.SIGKILL)

    assert not (run_dir / LOCK_FILE).exists()  # the dying rank 0 released it (a SIGKILLed one is taken over)
    newest = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))
    third = run_trainer([*args, f"train.max_steps={newest + 10}"], processes=2)
    assert f"resumed from {run_dir / 'checkpoints'}/step-{newest:08d}" in third.stdout
    assert f"finished at step {newest + 10}/{newest + 10}" in third.stdout
    assert not list(run_dir.glob("checkpoints/*.superseded*"))


def _state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return b"Z"
