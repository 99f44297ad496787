"""Crash anywhere: SIGKILL a short CPU training run at random moments, resume, check nothing is lost.

Each trial kills one run 1-2 times, at a random time or just after a checkpoint save has begun
(a `.tmp-*` directory exists), restarts it with run.resume=auto each time, and then lets it
finish. After every kill it checks that the next start resumes from the newest checkpoint that
was complete at the kill (never a partial one), that no complete checkpoint was damaged or lost,
and at the end that the final weights equal those of an uninterrupted run, bit for bit.

    python -m tests.faults.crash_harness --trials 50 --seed 0        # a soak run
    python -m tests.faults.crash_harness --seed 0 --only 3           # replay trial 3 of seed 0
"""

from __future__ import annotations

import argparse
import random
import re
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import REPO, launch_command, run_trainer, smoke_args, trainer_env
from trainer.core.checkpoint import verify

ARGS = [
    "data.fake_size=512",
    "train.epochs=2",
    "ckpt.every_steps=3",
    "ckpt.keep=3",
    "log.every_steps=8",
    "log.sample_every_steps=16",
]
RESUMED = re.compile(r"resumed from (\S+) \(step")


@dataclass
class Figures:
    trials: int = 0
    kills: int = 0
    kills_during_checkpoint_writes: int = 0
    resumes_checked: int = 0
    final_weights_matched: int = 0
    checkpoints_lost: int = 0
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"crash harness: {self.trials} trials, {self.kills} SIGKILLs "
            f"({self.kills_during_checkpoint_writes} during checkpoint writes), "
            f"{self.resumes_checked} resumes from the newest complete checkpoint, "
            f"{self.final_weights_matched}/{self.trials} final weights identical to the uninterrupted run, "
            f"{self.checkpoints_lost} checkpoints lost"
        )


def _complete(run_dir: Path) -> dict[str, Path]:
    folder = run_dir / "checkpoints"
    found = sorted(folder.glob("step-*")) if folder.is_dir() else []
    return {p.name: p for p in found if "." not in p.name and verify(p) is None}


def _kill_at_random(proc: subprocess.Popen, run_dir: Path, rng: random.Random) -> bool:
    """Returns True if the process was killed (False: it finished first)."""
    if rng.random() < 0.5:
        deadline = time.monotonic() + rng.uniform(0.5, 7.0)
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
    else:  # just after a save starts
        seen = set(_complete(run_dir)) if (run_dir / "checkpoints").is_dir() else set()
        skip = rng.randint(0, 6)  # let a few saves pass first
        while proc.poll() is None:
            tmp = list((run_dir / "checkpoints").glob(".tmp-*")) if (run_dir / "checkpoints").is_dir() else []
            if tmp and tmp[0].name not in seen:
                seen.add(tmp[0].name)
                if skip == 0:
                    time.sleep(rng.uniform(0.0, 0.01))
                    break
                skip -= 1
            time.sleep(0.0005)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def _same(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def run_trial(index: int, seed: int, workdir: Path, reference: Path, figures: Figures) -> None:
    rng = random.Random(seed * 100_003 + index)
    run_dir = workdir / f"trial{index:03d}"
    label = f"trial {index} (reproduce: python -m tests.faults.crash_harness --seed {seed} --only {index})"
    expected: Path | None = None
    for _ in range(rng.randint(1, 2)):
        proc = subprocess.Popen(
            launch_command(smoke_args(run_dir, *ARGS)),
            cwd=REPO,
            env=trainer_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        killed = _kill_at_random(proc, run_dir, rng)
        out = proc.stdout.read()
        proc.stdout.close()
        match = RESUMED.search(out)
        if match:
            figures.resumes_checked += 1
            if expected is None or Path(match.group(1)) != expected:
                figures.failures.append(f"{label}: resumed from {match.group(1)}, expected {expected}")
        if not killed:
            break
        figures.kills += 1
        if list((run_dir / "checkpoints").glob(".tmp-*")) if (run_dir / "checkpoints").is_dir() else []:
            figures.kills_during_checkpoint_writes += 1
        before = _complete(run_dir)
        if expected is not None and expected.name not in before and not any(n > expected.name for n in before):
            figures.checkpoints_lost += 1
            figures.failures.append(f"{label}: {expected.name} was complete and is gone")
        expected = before[max(before)] if before else None
    out = run_trainer(smoke_args(run_dir, *ARGS)).stdout  # the last start runs to the end
    match = RESUMED.search(out)
    if match:
        figures.resumes_checked += 1
    if (match and Path(match.group(1)) != expected) or (not match and expected is not None):
        figures.failures.append(f"{label}: final start resumed from {match and match.group(1)}, expected {expected}")
    damaged = list((run_dir / "checkpoints").glob("*.damaged*"))
    if damaged:
        figures.checkpoints_lost += len(damaged)
        figures.failures.append(f"{label}: a kill damaged {damaged}")
    if all(_same(reference / n, run_dir / n) for n in ("generator.safetensors", "discriminator.safetensors")):
        figures.final_weights_matched += 1
    else:
        figures.failures.append(f"{label}: final weights differ from the uninterrupted run")
    figures.trials += 1


def run_trials(trials: int, seed: int, workdir: Path, only: int | None = None) -> Figures:
    reference = workdir / "reference"
    run_trainer(smoke_args(reference, *ARGS))
    figures = Figures()
    for index in [only] if only is not None else range(trials):
        run_trial(index, seed, workdir, reference, figures)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", type=int, help="run just this trial index")
    parser.add_argument("--workdir", type=Path, help="keep run directories here (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        figures = run_trials(args.trials, args.seed, args.workdir or Path(tmp), args.only)
    print(figures.summary())
    for failure in figures.failures:
        print("FAIL", failure)
    raise SystemExit(1 if figures.failures else 0)


if __name__ == "__main__":
    main()
