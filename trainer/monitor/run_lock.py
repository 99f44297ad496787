"""One writer per run directory: a lock file that names its owner and is kept fresh by a heartbeat.

`<run.dir>/.run-lock.json` is created with O_CREAT | O_EXCL (atomic on local disks and on NFS v3+),
holds {host, pid, pid start time, started}, and its modification time is touched every
`HEARTBEAT_S` seconds by a daemon thread. A second training on the same run directory finds it and
stops (exit 2) naming the owner, before touching anything. A lock left by a run that died is
taken over:
- same host: the owner's pid is gone, or belongs to a newer process (pid reuse: its start time differs);
- another host (a lost node): its heartbeat is older than `STALE_AFTER_S`. This compares the
  file's modification time, set by the owner's clock, with ours: cluster clocks are kept in sync
  (NTP), and the margin is minutes.
A takeover renames the stale lock away first (a rename succeeds for one contender only), then
creates its own with O_EXCL, so two new runs cannot both take it.

`trainer.evaluate` and `trainer.sample` only read a run directory and take no lock.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer.util.errors import UserError

LOCK_FILE = ".run-lock.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
UNREADABLE_GRACE_S = 10.0  # an empty or half-written lock older than this was left by a crash


class RunDirectoryBusy(UserError):
    pass


class RunDirectoryUnwritable(UserError):
    pass


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    pid_started: str  # /proc/<pid>/stat start time, to tell a reused pid from the owner
    started: str  # wall-clock start, for people

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}"


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), or "" where /proc is not there."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _alive(owner: Owner) -> bool:
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return not owner.pid_started or _process_start(owner.pid) == owner.pid_started


class RunLock:
    """Held by the main process of a training run from start-up to exit."""

    def __init__(self, run_dir: Path, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.owner = Owner(
            socket.gethostname(),
            os.getpid(),
            _process_start(os.getpid()),
            time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: Owner | None = None  # the stale owner this lock replaced, if any
        self._created_dir = False

    def acquire(self) -> RunLock:
        """Take the lock, or raise RunDirectoryBusy naming its live owner. Returns self."""
        self._created_dir = not self.path.parent.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = self._create()
        except OSError as exc:  # read-only filesystem, no permission, quota: the run could write nothing
            raise RunDirectoryUnwritable(
                f"cannot write in the run directory {self.path.parent} ({exc.strerror or exc}); make it writable "
                "or choose another one (run.dir=<directory>, or run.name=<name> for runs/<name>)"
            ) from None
        for _ in range(3):  # a contender may rename a stale lock between our looks
            if created or self._create():
                self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
                self._thread.start()
                return self
            holder = self._read()
            if holder is None and self._age() < UNREADABLE_GRACE_S:
                time.sleep(0.5)  # gone meanwhile, or its owner is writing it right now: look again
                continue
            stale = "unreadable" if holder is None else self._stale_reason(holder)
            if stale is None:
                raise RunDirectoryBusy(
                    f"{self.path.parent} is in use by another training run ({holder.describe()}); wait for it "
                    f"to finish, stop it (kill {holder.pid} on {holder.host}), or use another run.name / run.dir. "
                    f"If that run is gone, remove {self.path}"
                )
            aside = self.path.with_name(f"{LOCK_FILE}.stale-{self.owner.host}-{self.owner.pid}")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue  # another contender took it over first
            aside.unlink(missing_ok=True)
            self.took_over = holder or self.took_over
            created = False
        raise RunDirectoryBusy(f"could not take {self.path}: other runs keep taking it; start one run at a time")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours; a run directory this lock
        created and nothing else filled (a start that failed early) goes too."""
        self._stop.set()
        if self._read() == self.owner:
            self.path.unlink(missing_ok=True)
            if self._created_dir:
                try:
                    self.path.parent.rmdir()
                except OSError:  # not empty: the run wrote something
                    pass

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(self.owner), fh)
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def _read(self) -> Owner | None:
        try:
            return Owner(**json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _stale_reason(self, holder: Owner) -> str | None:
        if holder.host == self.owner.host:
            return None if _alive(holder) else "its process is gone"
        age = self._age()
        return f"no heartbeat for {age:.0f}s" if age > self.stale_after_s else None

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return float("inf")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:  # removed or unreachable: the next start will judge it by its age
                pass
