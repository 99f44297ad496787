"""Shared helpers: run the real entry point in subprocesses, on CPU, with data the tests make."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from tools.gpu_check.checks import launch_command as gpu_check_launch_command

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "trainer" / "train.py"
SMOKE = REPO / "configs" / "smoke.yaml"
# Tiny networks on generated data: the head of the override lists that run the real trainer for
# seconds (the README test, the sweep tests); each adds its data size, schedule and evaluation.
TINY_NETS = [
    "data.source=fake",
    "data.num_workers=0",
    "model.resolution=32",
    "model.nz=16",
    "model.ngf=8",
    "model.ndf=8",
]


def trainer_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        WANDB_MODE="offline",
        OMP_NUM_THREADS="1",  # two processes on two cores: no oversubscription
        PYTHONUNBUFFERED="1",
        CUDA_VISIBLE_DEVICES="",  # these tests pin CPU behaviour (gloo, BatchNorm)
        XDG_CACHE_HOME=str(Path(tempfile.gettempdir()) / "dcgan-trainer-test-cache"),  # packed data, statistics
        # Every multi-process run checks that the ranks call the same collectives with the same shapes:
        # a mismatch is an error naming both calls, not a hang (trainer/core/runtime.py lets DDP start).
        TORCH_DISTRIBUTED_DEBUG="DETAIL",
    )
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    # This checkout first, for scripts run by path (tests/dist, tests/faults) and for `tests.*` modules
    # named in configs (the stand-in extractor): sys.path[0] is then the script's folder, not the root.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def launch_command(args: list[str], processes: int = 1, script: Path = TRAIN) -> list[str]:
    """One process: the script itself; several: the GPU check's `accelerate launch` line (gloo on CPU)."""
    if processes == 1:
        return [sys.executable, str(script), *args]
    return gpu_check_launch_command(script, args, processes)


def run_command(command: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """`command` in a session of its own; past `timeout` every process of it is killed and the test fails
    with the output so far (a launcher's workers would otherwise keep the pipes open, and the test hang)."""
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"still running after {timeout:.0f}s (a hang?), killed\nstdout:\n{out[-4000:]}\nstderr:\n{err[-4000:]}"
        ) from None
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def run_trainer(
    args: list[str], processes: int = 1, timeout: float = 300, script: Path = TRAIN, check: bool = True
) -> subprocess.CompletedProcess:
    proc = run_command(launch_command(args, processes, script), trainer_env(), timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def start_trainer(args: list[str], processes: int = 1) -> subprocess.Popen:
    """The trainer in the background (output merged into stdout), for tests that signal or kill it."""
    return subprocess.Popen(
        launch_command(args, processes),
        cwd=REPO,
        env=trainer_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def smoke_args(run_dir: Path, *overrides: str) -> list[str]:
    return ["--config", str(SMOKE), f"run.dir={run_dir}", *overrides]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def write_image_tree(root: Path, count: int, sizes=((32, 32), (40, 48), (64, 64)), classes=("a", "b")) -> Path:
    """An ImageFolder tree of PNG and JPEG files of mixed sizes, including a grayscale one."""
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        folder = root / classes[i % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        if i == 0:
            Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L").save(folder / f"{i:04d}.png")
        else:
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:04d}.{ext}")
    return root


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    return write_image_tree(tmp_path / "images", 40)


SUMMARY_LINES: list[str] = []  # figures that tests report (e.g. the crash harness), printed at the end


def pytest_terminal_summary(terminalreporter) -> None:
    for line in SUMMARY_LINES:
        terminalreporter.write_line(line)
