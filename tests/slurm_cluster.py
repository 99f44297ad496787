"""A throwaway Slurm cluster on this one machine, for tests.

One private ``munged`` (own key and socket), one ``slurmctld`` and one or two
``slurmd`` daemons (``slurmd -N node1`` / ``-N node2``, each on its own port;
Debian's build has MULTIPLE_SLURMD), with every state/spool/log/pid file inside
a directory the caller owns (a pytest tmp dir).  Nothing is installed here and
no system file is touched; the binaries come from ``apt-get install slurm-wlm
munge``.  Everything runs as the current user (root in CI; Slurm's daemons need
root to launch jobs).

Use::

    with SlurmCluster.started(tmp_dir, nodes=2) as cluster:
        job = cluster.submit("job.sh", args=["x"], sbatch_args=["--nodes=2"])
        assert cluster.wait(job, timeout=30) == "COMPLETED"

or the pytest fixture factory :func:`slurm_cluster_fixture`.  Tests that need
Slurm call :func:`require_slurm` (the fixture does): it skips when the binaries
are missing, and fails instead when ``REQUIRE_SLURM=1``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")
# Root's PATH has /usr/sbin; a CI user's PATH may not.
_EXTRA_BIN_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/usr/local/sbin", "/usr/local/bin")

# Job states after which a job will not run again (a requeued job passes
# through COMPLETING/REQUEUED and back to PENDING, which are not final).
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "SPECIAL_EXIT",
    }
)

INSTALL_HINT = "apt-get install -y slurm-wlm munge"


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in _EXTRA_BIN_DIRS:
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def missing_binaries() -> list[str]:
    return [b for b in REQUIRED_BINARIES if find_binary(b) is None]


def require_slurm() -> None:
    """Skip the calling test when Slurm is not installed; fail under REQUIRE_SLURM=1."""
    import pytest

    missing = missing_binaries()
    if not missing:
        if os.geteuid() != 0:
            reason = "a local Slurm cluster needs root (slurmd launches jobs as root here)"
        else:
            return
    else:
        reason = f"Slurm binaries not found: {', '.join(missing)} (install: {INSTALL_HINT})"
    if os.environ.get("REQUIRE_SLURM", "") == "1":
        pytest.fail(f"REQUIRE_SLURM=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _proc_environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"<{path}: unreadable>"
    return "\n".join(text[-lines:])


def parse_scontrol_record(text: str) -> dict[str, str]:
    """Parse one ``scontrol -o show ...`` line (Key=Value pairs; values may hold spaces only in a few keys)."""
    out: dict[str, str] = {}
    # Split before every " Key=" token; values such as Command=... rarely contain " X=" anyway.
    for m in re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=(.*?)(?=\s+[A-Za-z][A-Za-z0-9_:/]*=|$)", text.strip()):
        out[m.group(1)] = m.group(2)
    return out


@dataclass
class SlurmCluster:
    """A running throwaway cluster. Build with :meth:`started`."""

    root: Path  # short directory holding conf, state, spool, sockets, pid files, logs
    nodes: list[str]
    conf: Path = field(init=False)
    env: dict[str, str] = field(init=False)
    ctld_port: int = 0
    node_ports: list[int] = field(default_factory=list)
    hostname: str = ""
    _bin: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.conf = self.root / "slurm.conf"
        # The env every client command and every job must see: SLURM_CONF points
        # at our cluster (sbatch's default --export=ALL carries it into jobs, so
        # srun inside a job finds the same cluster).
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), *_EXTRA_BIN_DIRS])
        # Never let a caller's SLURM_* (e.g. running the tests inside a real
        # allocation) leak into our cluster's commands.
        for k in list(env):
            if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF":
                del env[k]
        self.env = env

    # ------------------------------------------------------------------ paths
    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    def pid_files(self) -> dict[str, Path]:
        files = {f"slurmd-{n}": self.run_dir / f"slurmd-{n}.pid" for n in self.nodes}
        files["slurmctld"] = self.run_dir / "slurmctld.pid"
        files["munged"] = self.root / "munge" / "munged.pid"
        return files

    # ------------------------------------------------------------- lifecycle
    @classmethod
    @contextlib.contextmanager
    def started(
        cls,
        base_dir: str | os.PathLike[str],
        nodes: int = 2,
        cpus_per_node: int = 2,
        real_memory: int = 8000,
        extra_conf: Sequence[str] = (),
        start_timeout: float = 30.0,
    ) -> Iterator[SlurmCluster]:
        """Start munged + slurmctld + ``nodes`` slurmd; stop them all on exit."""
        if nodes not in (1, 2, 3, 4):
            raise ValueError("nodes must be 1..4")
        missing = missing_binaries()
        if missing:
            raise RuntimeError(f"Slurm binaries not found: {missing} (install: {INSTALL_HINT})")
        base = Path(base_dir).resolve()
        base.mkdir(parents=True, exist_ok=True)
        # Unix socket paths (munge socket, slurmstepd sockets in the spool dir)
        # are limited to 107 bytes: keep the root short.
        if len(str(base)) <= 40:
            # A fresh directory each time: slurmctld refuses a StateSaveLocation
            # written by a cluster with another ClusterName.
            root, own_root = Path(tempfile.mkdtemp(prefix="c", dir=base)), False
        else:
            root, own_root = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp")), True
            (base / "slurm-cluster-root.txt").write_text(str(root) + "\n")
        cluster = cls(root=root, nodes=[f"node{i + 1}" for i in range(nodes)])
        cluster._bin = {b: find_binary(b) or b for b in REQUIRED_BINARIES}
        try:
            cluster._write_files(cpus_per_node, real_memory, extra_conf)
            cluster._start(start_timeout)
            yield cluster
        finally:
            try:
                cluster.stop()
            finally:
                if own_root:
                    # Keep the logs next to the pytest tmp dir for post-mortems.
                    with contextlib.suppress(OSError):
                        shutil.copytree(cluster.log_dir, base / "slurm-logs", dirs_exist_ok=True)
                    shutil.rmtree(root, ignore_errors=True)

    def _write_files(self, cpus: int, mem: int, extra_conf: Sequence[str]) -> None:
        for d in ("state", "log", "run", "jobs", "munge", *(f"spool/{n}" for n in self.nodes)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)

        self.hostname = socket.gethostname().split(".")[0]
        ports = _free_ports(1 + len(self.nodes))
        self.ctld_port, self.node_ports = ports[0], ports[1:]
        r = self.root
        lines = [
            f"ClusterName=pytest{os.getpid() % 100000}",
            # slurmctld only runs if this names the local host (hostname -s).
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire (min 5 s, default 120 s) is also how long a requeued
            # job waits (BeginTime) before it may start again.
            f"AuthInfo=socket={r}/munge/munge.sock,cred_expire=5",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SelectType=select/cons_tres",
            # CR_CPU (no memory accounting): a job without --mem does not grab the whole node.
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            # Main scheduling loop every 1 s (default 60 s): requeued jobs restart promptly.
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            # Keep finished jobs visible to `scontrol show job` for an hour
            # (there is no slurmdbd, so no sacct).
            "MinJobAge=3600",
            "JobRequeue=1",
            # SIGTERM -> SIGKILL grace on cancel/requeue/time limit (default 30 s).
            "KillWait=5",
            "InactiveLimit=0",
            "SlurmdTimeout=60",
            "SlurmctldTimeout=30",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            *extra_conf,
        ]
        for name, port in zip(self.nodes, self.node_ports, strict=True):
            lines.append(
                f"NodeName={name} NodeHostname={self.hostname} NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={cpus} RealMemory={mem} State=UNKNOWN"
            )
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _daemon(self, argv: list[str]) -> None:
        # The daemons fork into the background themselves and write pid files.
        p = subprocess.run(argv, env=self.env, cwd=self.root, capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            raise RuntimeError(f"{argv} exited {p.returncode}: {p.stdout}{p.stderr}\n{self.diagnostics()}")

    def _start(self, timeout: float) -> None:
        m = self.root / "munge"
        # A private munged: no /etc/munge key, no system socket. --force accepts
        # running as root and a socket dir below a 0700 pytest tmp dir.
        self._daemon(
            [
                self._bin["munged"],
                "--force",
                f"--key-file={m}/munge.key",
                f"--socket={m}/munge.sock",
                f"--pid-file={m}/munged.pid",
                f"--log-file={m}/munged.log",
                f"--seed-file={m}/munged.seed",
            ]
        )
        self._wait_for(lambda: (m / "munge.sock").exists(), timeout, "munged socket")
        self._daemon([self._bin["slurmctld"], "-c", "-f", str(self.conf)])
        self._wait_for(lambda: self.scontrol("ping", check=False).stdout.count("is UP") > 0, timeout, "slurmctld UP")
        for n in self.nodes:
            self._daemon([self._bin["slurmd"], "-f", str(self.conf), "-N", n])
        self._wait_for(self._all_nodes_idle, timeout, "all nodes idle")

    def _all_nodes_idle(self) -> bool:
        p = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
        states = dict(line.split() for line in p.stdout.splitlines() if line.strip())
        return all(states.get(n) == "idle" for n in self.nodes)

    def _wait_for(self, cond, timeout: float, what: str, interval: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(interval)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{self.diagnostics()}")

    def stop(self) -> None:
        """Cancel all jobs, stop the daemons by their pid files, then kill any stray process of this cluster."""
        ctld = self.pid_files()["slurmctld"]
        if ctld.exists():
            with contextlib.suppress(Exception):
                ids = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10).stdout.split()
                if ids:
                    self.run(["scancel", *ids], check=False, timeout=10)
                    deadline = time.monotonic() + 15
                    while (
                        time.monotonic() < deadline
                        and self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10).stdout.strip()
                    ):
                        time.sleep(0.3)
        order = [*(f"slurmd-{n}" for n in self.nodes), "slurmctld", "munged"]
        files = self.pid_files()
        for name in order:
            self._stop_pidfile(files[name], name.split("-")[0])
        self._kill_strays()

    def _stop_pidfile(self, pid_file: Path, binary: str, timeout: float = 10.0) -> None:
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        # Guard against pid reuse: the process must be the expected daemon.
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return
        if not binary.startswith(comm[:15]):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _pid_alive(pid):
            time.sleep(0.1)
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stray_pids(self) -> list[int]:
        """Processes whose environment carries this cluster's SLURM_CONF (slurmstepd, job tasks)."""
        marker = f"SLURM_CONF={self.conf}".encode() + b"\0"
        me = os.getpid()
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) != me:
                env = _proc_environ(int(d))
                if marker in env and _pid_alive(int(d)):
                    out.append(int(d))
        return out

    def _kill_strays(self) -> None:
        for _ in range(3):
            pids = self.stray_pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)

    # --------------------------------------------------------------- clients
    def run(
        self, argv: Sequence[str], check: bool = True, timeout: float = 30, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command (scontrol, squeue, sinfo, ...) against this cluster."""
        full_env = {**self.env, **(env or {})}
        p = subprocess.run(list(argv), env=full_env, cwd=self.root, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"{list(argv)} exited {p.returncode}:\n{p.stdout}{p.stderr}")
        return p

    def scontrol(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(["scontrol", *args], check=check)

    def submit(
        self,
        script_path: str | os.PathLike[str],
        args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        sbatch_args: Iterable[str] = (),
        cwd: str | os.PathLike[str] | None = None,
        script_output: bool = False,
    ) -> str:
        """``sbatch --parsable [sbatch_args] script args...``; returns the job id.

        The job's environment is the test process's plus this cluster's
        SLURM_CONF plus ``env``.  Output goes to ``<root>/jobs/slurm-<id>.out``
        unless ``sbatch_args`` names ``-o/--output`` or ``script_output`` leaves
        it to the script's own ``#SBATCH --output``; see :meth:`stdout_path`.
        """
        sb = list(sbatch_args)
        if not script_output and not any(a in ("-o",) or a.startswith("--output") for a in sb):
            sb = [f"--output={self.jobs_dir}/slurm-%j.out", *sb]
        argv = ["sbatch", "--parsable", *sb, str(script_path), *map(str, args)]
        full_env = {**self.env, **(env or {})}
        p = subprocess.run(argv, env=full_env, cwd=cwd or self.jobs_dir, capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            raise RuntimeError(f"sbatch failed ({p.returncode}): {p.stderr.strip()}")
        return p.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        p = self.scontrol("-o", "show", "job", str(job_id), check=False)
        if p.returncode != 0:
            raise KeyError(f"job {job_id}: {p.stderr.strip()}")
        return parse_scontrol_record(p.stdout.splitlines()[0])

    def state(self, job_id: str) -> str:
        return self.job_info(job_id)["JobState"]

    def wait_state(self, job_id: str, states: Iterable[str], timeout: float, interval: float = 0.2) -> str:
        """Wait until the job is in one of ``states`` (or a final state); return it."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        last = "?"
        while time.monotonic() < deadline:
            last = self.state(job_id)
            if last in wanted:
                return last
            if last in FINAL_STATES:
                raise RuntimeError(
                    f"job {job_id} ended {last} while waiting for {sorted(wanted)}\n{self.job_report(job_id)}"
                )
            time.sleep(interval)
        raise TimeoutError(
            f"job {job_id} still {last} after {timeout}s (wanted {sorted(wanted)})\n{self.job_report(job_id)}"
        )

    def wait(self, job_id: str, timeout: float, interval: float = 0.2) -> str:
        """Wait until the job reaches a final state (COMPLETED, FAILED, TIMEOUT, ...); return it."""
        return self.wait_state(job_id, FINAL_STATES, timeout, interval)

    def requeue(self, job_id: str) -> None:
        self.scontrol("requeue", str(job_id))

    def cancel(self, job_id: str, signal_name: str | None = None, batch_only: bool = False) -> None:
        argv = ["scancel"]
        if signal_name:
            argv.append(f"--signal={signal_name}")
        if batch_only:
            argv.append("--batch")
        self.run([*argv, str(job_id)])

    def stdout_path(self, job_id: str) -> Path:
        return Path(self.job_info(job_id)["StdOut"])

    def read_stdout(self, job_id: str) -> str:
        try:
            return self.stdout_path(job_id).read_text(errors="replace")
        except (OSError, KeyError):
            return ""

    def job_report(self, job_id: str) -> str:
        p = self.scontrol("show", "job", str(job_id), check=False)
        return f"--- scontrol show job {job_id}\n{p.stdout}{p.stderr}--- stdout\n{self.read_stdout(job_id)}\n{self.diagnostics(10)}"

    def diagnostics(self, lines: int = 25) -> str:
        parts = []
        for log in sorted(self.log_dir.glob("*.log")) + [self.root / "munge" / "munged.log"]:
            if log.exists():
                parts.append(f"--- {log.name} (tail)\n{_tail(log, lines)}")
        return "\n".join(parts)


def slurm_cluster_fixture(scope: str = "module", nodes: int = 2, **kwargs):
    """Return a pytest fixture that yields a started :class:`SlurmCluster`.

    In a conftest or test module: ``slurm_cluster = slurm_cluster_fixture()``.
    """
    import pytest

    @pytest.fixture(scope=scope)
    def _fixture(tmp_path_factory):
        require_slurm()
        with SlurmCluster.started(tmp_path_factory.mktemp("slurm"), nodes=nodes, **kwargs) as cluster:
            yield cluster

    return _fixture
