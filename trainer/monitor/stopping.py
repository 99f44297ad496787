"""Clean stops: a signal to any rank, or a STOP file in the run directory, stops every rank together.

SIGTERM (Slurm's time limit, `kill`), SIGINT (Ctrl-C) and SIGUSR1 (Slurm's warning signal) set a
flag; the loop finishes its step, the ranks agree (one all-reduce every `check_every` steps, so
the step pays no host sync), write a checkpoint, and exit 0. The file matters because
`accelerate launch` (torchrun) does not forward SIGUSR1 to its workers: a batch script that traps
the signal touches `<run.dir>/STOP` instead, which every node sees on a shared filesystem, or the
file named by $DCGAN_STOP_FILE when it cannot know run.dir (a sweep trial's, monitor/wandb_sink.py).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator

STOP_FILE = "STOP"
# A second STOP file, named by the job script: for scripts that cannot know run.dir (a sweep agent
# chooses the trial, and with it the directory). The trainer never deletes it; its script does.
STOP_FILE_ENV = "DCGAN_STOP_FILE"
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def under_launcher() -> bool:
    """Started by torchrun / `accelerate launch` (which sets these for its workers), not from a shell."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ


def _process_started(pid: int) -> float | None:
    """Wall-clock start of a process (Linux /proc), or None. To the second: boot time has no fraction."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def launch_started() -> float:
    """When this start of the run began: the launcher's start under one, else this process's. A STOP
    file older than that was meant for an earlier start; a newer one (written while this start was
    still preparing: packing data, reference statistics) is meant for this one."""
    return _process_started(os.getppid() if under_launcher() else os.getpid()) or time.time()


class StopRequest:
    def __init__(self, run_dir: Path, accelerator: Accelerator, check_every: int = 10, started: float = 0.0) -> None:
        """`started`: when this start began (`launch_started`); a STOP file older than that is removed."""
        self.file = Path(run_dir) / STOP_FILE
        self.files = [self.file] + ([Path(os.environ[STOP_FILE_ENV])] if os.environ.get(STOP_FILE_ENV) else [])
        self.acc = accelerator
        self.check_every = check_every
        self.reason: str | None = None
        self.agreed = False  # every rank decided to stop
        self._previous = {}
        if accelerator.is_main_process:
            try:
                if self.file.stat().st_mtime < started:
                    self.file.unlink(missing_ok=True)  # stale: it was meant for an earlier start
            except FileNotFoundError:
                pass
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.reason is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.reason = signal.Signals(signum).name

    def should_stop(self, step: int) -> bool:
        """Collective every `check_every` steps: all ranks get the same answer."""
        if step % self.check_every:
            return False
        local = self.reason is not None
        found = next((f for f in self.files if f.exists()), None) if self.acc.is_main_process and not local else None
        if found is not None:
            self.reason = f"{found} exists"
            local = True
        if self.acc.num_processes > 1:
            flag = torch.tensor([1.0 if local else 0.0], device=self.acc.device)
            local = bool(self.acc.reduce(flag, reduction="sum").item() > 0)
            if local and self.reason is None:
                self.reason = "another rank was asked to stop"
        self.agreed = local
        return local

    def close(self) -> None:
        """Restore the previous handlers and consume the STOP file."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self.acc.is_main_process:
            self.file.unlink(missing_ok=True)


def exit_with_launcher(on_exit: Callable[[], None], poll_s: float = 1.0) -> None:
    """Under a launcher (torchrun, `accelerate launch`): end this process within seconds of the launcher's death.

    torchrun starts each worker in a session of its own, so a launcher killed with SIGKILL leaves
    its workers training, and the same command started again would train beside them. A daemon
    thread watches the parent pid; once this process is re-parented (the launcher is gone), it runs
    `on_exit` (releasing the run lock) and exits at once. No checkpoint is written: the newest
    complete one stays the resume point, and a save cut short is a `.tmp-*` directory that is never
    loaded. A run started straight from a shell (`python -m trainer.train`) is left alone, so
    `nohup` keeps working.
    """
    if not under_launcher():
        return
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_s)
        print(f"the launcher (pid {launcher}) is gone: this worker (pid {os.getpid()}) exits", file=sys.stderr)
        on_exit()
        os._exit(1)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()
