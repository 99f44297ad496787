"""Run checks one after another, each in its own process tree under its own cap, inside a total budget.

A check is a function `fn(ctx, **params)` named by "module:function". For each check the runner
starts a child process (`python -m tools.gpu_check.child SPEC.json`) that imports and calls it,
and kills the child's whole process tree when the cap runs out. A process per check because a check
may hang (a CUDA call, a compile, a collective) and only a process can be stopped from outside; it
also gives every check a fresh CUDA context, so no check inherits another's memory or allocator state.

Caps: a check runs under min(its own cap, the budget left minus the reserves of the checks after
it). A check without a cap of its own (the full training run) takes whatever the budget leaves; a
reserve keeps time back for a later check however long the earlier ones take.

Statuses: passed (the function returned), failed (it raised, or its process died), skipped (it
raised Skip, a check it needs did not pass, or the budget could not give it its minimum), timeout
(its cap ran out, or it raised Timeout). Figures it recorded before failing or timing out are kept,
and so are those of the training runs it watches (`Context.watch`): killed at its cap, a check
still reports how far its run got and how fast, from the run's metrics.jsonl.

Nothing is left running: everything a run starts carries its work folder in its environment
(WORK_ENV, inherited by every child, whatever session it moves to). The runner kills each check's
whole tree when its cap runs out, every process so marked when it stops (SIGTERM, SIGHUP, Ctrl-C,
or the end), and at its start any a previous runner in the same work folder left behind (one killed
with SIGKILL cannot clean up after itself).

Standard library only (psutil is used when present): the runner must stay importable and quick
whatever state the trainer's dependencies are in.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATUSES = ("passed", "failed", "skipped", "timeout")
REPORT_FILES = ("report.json", "report.md", "logs.tar.gz")  # always in the report folder
KILL_GRACE_S = 2.0  # SIGTERM first (a trainer then saves and exits), SIGKILL after this
CHILD_MARGIN_S = 4.0  # a check stops its own commands this long before the runner would kill it (grace + reading)
POLL_S = 0.2
WORK_ENV = "DCGAN_GPU_CHECK_WORK"  # in the environment of everything a run starts: its work folder


class Skip(Exception):
    """Raised by a check that cannot run here (e.g. fp16 on a CPU); the message says why."""


class CheckFailed(Exception):
    """A check ran and its result is wrong; the message says what was expected and what came."""


class Timeout(Exception):
    """A check (or a command in it) ran out of time; figures recorded so far are kept."""


class CommandError(Exception):
    """A command exited non-zero; the message ends with the tail of its output."""


@dataclass
class Check:
    name: str
    target: str  # "module:function", called in a child process as function(ctx, **params)
    cap_s: float | None  # its own cap; None: whatever the budget leaves after the reserves of later checks
    reserve_s: float = 0.0  # kept back for this check while the checks before it run
    min_s: float = 5.0  # not started with less time than this (or than its own cap, if smaller)
    params: dict[str, Any] = field(default_factory=dict)
    needs: tuple[str, ...] = ()  # checks that must have passed before this one starts
    about: str = ""  # one line for the report


@dataclass
class Result:
    name: str
    status: str
    figures: dict[str, Any]
    error: str | None
    wall_s: float
    cap_s: float | None  # the cap it ran under (None: it did not start)
    about: str = ""


@dataclass
class Completed:
    """What `Context.run` returns: a command that exited (with any code)."""

    returncode: int
    output: str  # stdout and stderr together, as written to `log`
    wall_s: float
    log: str
    stopped: bool = False  # the stop file was written before it exited


def json_safe(value: Any) -> Any:
    """NaN and infinities as strings: report.json stays strict JSON that any reader accepts."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, data: Any) -> None:
    """Atomic: a reader (the runner, or a person after a kill) never sees half a file."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def tail(text: str, lines: int = 25, chars: int = 3000) -> str:
    return "\n".join(text.splitlines()[-lines:])[-chars:]


# ---- process trees -------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`. Found by parent links, not by process group: torchrun starts its
    workers in their own sessions, so killing the launcher's group alone leaves them holding the GPU."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return [p.pid for p in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal(pids: Sequence[int], group: int, sig: signal.Signals) -> None:
    """`sig` to each of `pids`, and to process group `group` unless it is -1."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    if group != -1:
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_tree(proc: subprocess.Popen, grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM `proc` (started with start_new_session=True) and all its descendants, SIGKILL what is
    left after `grace_s`, and reap `proc`."""
    if proc.poll() is None:
        pids = [proc.pid, *_descendants(proc.pid)]
        _signal(pids, proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        pids += [p for p in _descendants(proc.pid) if p not in pids]  # started during the grace period
        _signal(pids, proc.pid, signal.SIGKILL)
    proc.wait()


def marked_processes(root: Path) -> list[int]:
    """Live processes started under the work folder `root`: their environment holds WORK_ENV=root (every
    check and command gets it, and their children inherit it, whatever session or group they are in)."""
    mark = f"{WORK_ENV}={root}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        pid = int(environ.parent.name)
        if pid == os.getpid():
            continue
        try:
            if mark not in environ.read_bytes().split(b"\0"):
                continue
            if (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie: already dead
        except (OSError, IndexError):
            continue
        found.append(pid)
    return found


def sweep(root: Path, grace_s: float = KILL_GRACE_S) -> list[int]:
    """SIGTERM, then SIGKILL after `grace_s`, every process still running that was started under `root`.
    Returns their pids (none after a clean run)."""
    found = marked_processes(root)
    if found:
        _signal(found, -1, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and marked_processes(root):
            time.sleep(POLL_S)
        _signal(marked_processes(root), -1, signal.SIGKILL)
    return found


def run_figures(run_dir: str | os.PathLike) -> dict[str, Any]:
    """How far a training run got and how fast, from its metrics.jsonl (the training lines: those with
    images_per_s). images/s is the median of the log windows after the first, which pays for start-up."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by the kill
            continue
        if "images_per_s" in record and "loss_D" in record:
            records.append(record)
    if not records:
        return {}
    speeds = sorted(float(r["images_per_s"]) for r in records[1:] or records)
    middle = len(speeds) // 2
    median = speeds[middle] if len(speeds) % 2 else (speeds[middle - 1] + speeds[middle]) / 2
    last = records[-1]
    figures = {
        "steps": int(last["step"]),
        "log_windows": len(records),
        "images_per_s": round(median, 1),
        "loss_D_final": last["loss_D"],
        "loss_G_final": last["loss_G"],
        "losses_finite": all(math.isfinite(float(r["loss_D"])) and math.isfinite(float(r["loss_G"])) for r in records),
    }
    if "diversity" in last:
        figures["diversity"] = round(float(last["diversity"]), 4)
    peaks = [float(r["gpu_mem_peak_GiB"]) for r in records if "gpu_mem_peak_GiB" in r]
    if peaks:
        figures["gpu_mem_peak_GiB"] = round(max(peaks), 3)
    return figures


# ---- the check's side: a Context in the child process ---------------------------------------------


@dataclass
class Context:
    """What a check gets: where to write, how long it has, and helpers that respect that."""

    name: str
    device: str  # cuda | cpu
    tiny: bool
    repo: str  # the checkout (commands run here)
    work: str  # this check's own folder
    shared: str  # the run's work folder, shared by all checks (data, packed cache, compile cache)
    out: str  # the report folder: only what `export` puts there comes back from a GPU machine
    logs: str  # this check's log folder (archived into the report folder)
    deadline: float  # time.time() by which the check must be done (the runner kills it a moment later)
    result_path: str
    max_file_bytes: int  # per file in `out`
    max_files: int  # files in `out`, the report's own included
    env: dict[str, str]  # the environment commands run with
    figures: dict[str, Any] = field(default_factory=dict)
    watched: list[str] = field(default_factory=list)  # run folders whose metrics.jsonl speaks for a killed check
    _commands: int = 0

    def left(self) -> float:
        return self.deadline - time.time()

    def record(self, **figures: Any) -> None:
        """Add figures and persist them at once, so a later kill does not lose them."""
        self.figures.update(figures)
        self.save("running", None)

    def save(self, status: str, error: str | None) -> None:
        result = {"status": status, "error": error, "figures": self.figures, "watched": self.watched}
        write_json(Path(self.result_path), result)

    def watch(self, run_dir: str | os.PathLike) -> None:
        """If this check is killed at its cap, report what `run_dir`'s metrics.jsonl says (see `run_figures`)."""
        self.watched.append(str(run_dir))
        self.save("running", None)

    def keep(self, path: str | os.PathLike, name: str | None = None) -> Path | None:
        """Copy a file into this check's logs (they travel in the log archive); None if it is missing."""
        src = Path(path)
        if not src.is_file():
            return None
        dst = Path(self.logs) / (name or src.name)
        shutil.copyfile(src, dst)
        return dst

    def export(self, path: str | os.PathLike, name: str) -> bool:
        """Copy a file into the report folder if it fits the per-file and file-count limits; record what happened."""
        src = Path(path)
        size = src.stat().st_size
        exported = self.figures.setdefault("files", {})
        present = {p.name for p in Path(self.out).iterdir() if p.is_file()} | set(REPORT_FILES)
        if size > self.max_file_bytes:
            exported[name] = f"left out: {size / 2**20:.2f} MiB > the {self.max_file_bytes / 2**20:g} MiB limit"
            self.record()
            return False
        if name not in present and len(present) >= self.max_files:
            exported[name] = f"left out: the report folder holds {self.max_files} files already (the limit)"
            self.record()
            return False
        shutil.copyfile(src, Path(self.out) / name)
        exported[name] = f"{size / 2**20:.2f} MiB"
        self.record()
        return True

    def run(
        self,
        cmd: Sequence[str],
        label: str,
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        stop_file: Path | None = None,
        stop_after_s: float | None = None,
        check: bool = True,
    ) -> Completed:
        """Run a command in its own process tree, output to a log file, within this check's time.

        `stop_file` is created after `stop_after_s` (the trainer's clean stop: it saves and exits).
        Raises Timeout when the command outlives `timeout` or the check's own time, and
        CommandError on a non-zero exit when `check`.
        """
        self._commands += 1
        log = Path(self.logs) / f"{self._commands:02d}-{label}.log"
        limit = self.left()  # the deadline keeps CHILD_MARGIN_S back for the kill and for recording
        if timeout is not None:
            limit = min(limit, timeout)
        if limit <= 0:
            raise Timeout(f"{label}: no time left in this check's cap")
        full_env = {**self.env, **(env or {})}
        stopped = False
        with open(log, "w") as fh:
            fh.write(f"$ {shlex.join(cmd)}\n")
            fh.flush()
            start = time.monotonic()
            proc = subprocess.Popen(
                list(cmd), cwd=self.repo, env=full_env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                while proc.poll() is None:
                    elapsed = time.monotonic() - start
                    if stop_file is not None and not stopped and stop_after_s is not None and elapsed >= stop_after_s:
                        Path(stop_file).touch()
                        stopped = True
                    if elapsed >= limit:
                        kill_tree(proc)
                        output = log.read_text(errors="replace")
                        raise Timeout(f"{label} ran past {limit:.0f}s and was killed; last output:\n{tail(output, 8)}")
                    time.sleep(POLL_S)
            finally:
                if proc.poll() is None:  # an exception above, or this process is being stopped
                    kill_tree(proc)
        wall = time.monotonic() - start
        output = log.read_text(errors="replace")
        if check and proc.returncode != 0:
            raise CommandError(f"{label} exited with code {proc.returncode}; last output:\n{tail(output)}")
        return Completed(proc.returncode, output, wall, str(log), stopped)


def resolve(target: str) -> Callable[..., Any]:
    module, _, function = target.partition(":")
    if not module or not function:
        raise ValueError(f"check target {target!r} is not of the form module:function")
    return getattr(importlib.import_module(module), function)


def child_main(spec_path: str) -> int:
    """The child process: call the check, write its result (status, error, figures)."""
    spec = json.loads(Path(spec_path).read_text())
    ctx = Context(**spec["context"])
    ctx.save("running", None)
    try:
        returned = resolve(spec["target"])(ctx, **spec["params"])
        if isinstance(returned, Mapping):
            ctx.figures.update(returned)
        status, error = "passed", None
    except Skip as exc:
        status, error = "skipped", str(exc)
    except Timeout as exc:
        status, error = "timeout", str(exc)
    except (Exception, SystemExit) as exc:
        traceback.print_exc()
        status, error = "failed", f"{type(exc).__name__}: {exc}"
    ctx.save(status, error)
    print(f"{ctx.name}: {status}" + (f": {error}" if error else ""), flush=True)
    return 0


# ---- the runner's side --------------------------------------------------------------------------


class Interrupted(Exception):
    """The runner itself was asked to stop (SIGTERM, Ctrl-C) while `result`'s check ran."""

    def __init__(self, result: Result, why: str) -> None:
        super().__init__(why)
        self.result = result


def _run_one(check: Check, cap: float, base: Mapping[str, Any], root: Path, env: Mapping[str, str]) -> Result:
    work, logs = root / "checks" / check.name, root / "logs" / check.name
    for folder in (work, logs):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    wait_s = max(cap - KILL_GRACE_S, 0.5)  # the kill's grace period fits inside the cap
    start, started_at = time.monotonic(), time.time()
    context = {
        **base,
        "name": check.name,
        "work": str(work),
        "logs": str(logs),
        "deadline": started_at + wait_s - CHILD_MARGIN_S,
        "result_path": str(work / "result.json"),
    }
    spec = work / "spec.json"
    write_json(spec, {"target": check.target, "params": check.params, "context": context})
    with open(logs / "check.log", "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tools.gpu_check.child", str(spec)],
            cwd=base["repo"],
            env=dict(env),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        killed, interrupted = False, None
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            killed = True
        except KeyboardInterrupt as exc:
            interrupted = str(exc) or "SIGINT"
        finally:
            if proc.poll() is None:  # the cap ran out, or the runner itself is being stopped
                kill_tree(proc)
    wall = time.monotonic() - start
    try:
        found = json.loads((work / "result.json").read_text())
    except (OSError, ValueError):
        found = {"status": "running", "error": None, "figures": {}}
    status, error, figures = found["status"], found["error"], found["figures"]
    if killed or interrupted:
        # What its training runs wrote before the kill: figures the check had no time to record.
        for run_dir in found.get("watched", []):
            for key, value in run_figures(run_dir).items():
                if figures.get(key) is None:
                    figures[key] = value
                    figures.setdefault("figures_from_metrics_jsonl", []).append(key)
    if interrupted:
        status, error = "timeout", f"stopped from outside ({interrupted}) after {wall:.0f}s"
    elif killed:
        status = "timeout"
        error = f"ran past its cap of {cap:.0f}s and was killed" + (f"; {error}" if error else "")
    elif status not in STATUSES:
        log_tail = tail((logs / "check.log").read_text(errors="replace"), 10)
        status, error = "failed", f"its process exited with code {proc.returncode} and no result; log:\n{log_tail}"
    result = Result(check.name, status, figures, error, round(wall, 2), round(cap, 1), check.about)
    if interrupted:
        raise Interrupted(result, interrupted)
    return result


def _not_run(check: Check, why: str) -> Result:
    return Result(check.name, "skipped", {}, why, 0.0, None, check.about)


def plan_cap(check: Check, later: Sequence[Check], seconds_left: float) -> float:
    """The cap `check` runs under: its own, within what the budget leaves after later checks' reserves."""
    available = seconds_left - sum(c.reserve_s for c in later)
    return available if check.cap_s is None else min(check.cap_s, available)


def run_checks(
    checks: Sequence[Check],
    budget_s: float,
    root: Path,
    base: Mapping[str, Any],
    env: Mapping[str, str],
    on_result: Callable[[Result, list[Result]], None] | None = None,
) -> list[Result]:
    """Run `checks` in order within `budget_s`; `base` holds the Context fields all checks share.

    `on_result` is called after every check with the results so far (the report is rewritten
    then, so a run stopped from outside still leaves one).
    """
    end = time.monotonic() + budget_s
    results: list[Result] = []
    by_name: dict[str, Result] = {}
    leftovers = sweep(root)  # a previous runner in this work folder that was killed outright
    if leftovers:
        print(f"stopped {len(leftovers)} process(es) a previous run left in {root}: {leftovers}", flush=True)

    def stop_on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    # SIGTERM: e.g. a batch system's or a wrapper's timeout; SIGHUP: the terminal or SSH session went away.
    previous = {sig: signal.signal(sig, stop_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        for i, check in enumerate(checks):
            missing = [n for n in check.needs if n not in by_name or by_name[n].status != "passed"]
            if missing:
                result = _not_run(check, f"needs {', '.join(missing)}, which did not pass")
            else:
                left = end - time.monotonic()
                cap = plan_cap(check, checks[i + 1 :], left)
                needed = check.min_s if check.cap_s is None else min(check.min_s, check.cap_s)
                if cap < needed:
                    kept = left - cap if check.cap_s is None else sum(c.reserve_s for c in checks[i + 1 :])
                    result = _not_run(
                        check,
                        f"budget: {max(left, 0):.0f}s of {budget_s:.0f}s left, {kept:.0f}s of it kept for later "
                        f"checks; this one needs at least {needed:.0f}s",
                    )
                else:
                    result = _run_one(check, cap, base, root, env)
            results.append(result)
            by_name[check.name] = result
            if on_result:
                on_result(result, results)
    except (KeyboardInterrupt, Interrupted) as exc:
        if isinstance(exc, Interrupted):
            results.append(exc.result)
        for check in checks[len(results) :]:
            results.append(_not_run(check, f"not run: the GPU check was stopped ({exc or 'SIGINT'})"))
        if on_result and results:
            on_result(results[-1], results)
    finally:
        sweep(root)  # whatever a check started that outlived it
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return results
