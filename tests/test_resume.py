"""Checkpoint selection and clean stops, through the real entry point."""

import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_trainer, smoke_args, start_trainer
from tests.test_training import _wait_for

pytestmark = pytest.mark.slow

LONG = ["data.fake_size=1024", "train.epochs=1", "ckpt.every_steps=8", "ckpt.keep=50", "log.every_steps=8"]


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_damaged_newest_checkpoint_is_kept_aside_and_the_previous_one_used(tmp_path):
    run_dir = tmp_path / "run"
    run_trainer(smoke_args(run_dir, "train.max_steps=20", "ckpt.keep=5"))
    model = run_dir / "checkpoints" / "step-00000020" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte: same size, wrong checksum
    model.write_bytes(bytes(data))

    proc = run_trainer(smoke_args(run_dir, "train.max_steps=24", "ckpt.keep=5"))
    assert "step-00000020 is damaged (model.safetensors does not match its checksum)" in proc.stderr
    # checkpoints were 10, 16 (epoch end) and 20: the newest intact one is 16
    assert f"resumed from {run_dir / 'checkpoints' / 'step-00000016'}" in proc.stdout
    damaged = run_dir / "checkpoints" / "step-00000020.damaged"
    assert damaged.is_dir() and (damaged / "model.safetensors").read_bytes() == bytes(data)
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step-00000010", "step-00000016", "step-00000020", "step-00000020.damaged", "step-00000024"]


def test_checkpoint_of_another_model_is_refused_and_nothing_is_touched(tmp_path):
    run_dir = tmp_path / "run"
    run_trainer(smoke_args(run_dir, "train.max_steps=10"))
    before = _snapshot(run_dir)
    proc = run_trainer(smoke_args(run_dir, "train.max_steps=20", "model.ngf=16"), check=False)
    assert proc.returncode == 2
    assert "model.ngf: checkpoint 8, this run 16" in proc.stderr
    assert _snapshot(run_dir) == before


def test_resume_with_a_changed_learning_rate_is_refused_unless_allowed(tmp_path):
    run_dir = tmp_path / "run"
    run_trainer(smoke_args(run_dir, "train.max_steps=10", "log.tracker=none"))
    before = _snapshot(run_dir)
    changed = smoke_args(run_dir, "train.max_steps=20", "log.tracker=none", "train.lr=1e-3")
    proc = run_trainer(changed, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "changes the training trajectory: train.lr: 0.0002 -> 0.001" in error
    assert "also changed, allowed: train.max_steps: 10 -> 20" in error and "run.resume_changes=allow" in error
    assert _snapshot(run_dir) == before  # refused before anything was written

    proc = run_trainer([*changed, "run.resume_changes=allow"])
    assert "with config changes (run.resume_changes=allow): train.max_steps: 10 -> 20; train.lr: 0.0002 -> 0.001" in (
        proc.stdout
    )
    assert f"resumed from {run_dir / 'checkpoints' / 'step-00000010'}" in proc.stdout
    assert "finished at step 20/20" in proc.stdout


def test_resume_never_refuses_a_directory_with_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    run_trainer(smoke_args(run_dir, "train.max_steps=10"))
    before = _snapshot(run_dir)
    proc = run_trainer(smoke_args(run_dir, "run.resume=never"), check=False)
    assert proc.returncode == 2 and "run.resume=never" in proc.stderr and "step-00000010" in proc.stderr
    assert _snapshot(run_dir) == before


def test_explicit_resume_into_a_new_run_dir_and_refusal_to_fork_in_place(tmp_path):
    run_dir = tmp_path / "run"
    run_trainer(smoke_args(run_dir, "train.max_steps=20", "ckpt.keep=5"))
    old = run_dir / "checkpoints" / "step-00000010"
    proc = run_trainer(smoke_args(run_dir, f"run.resume={old}", "train.max_steps=30"), check=False)
    assert proc.returncode == 2 and "older than step-00000020" in proc.stderr
    branch = tmp_path / "branch"
    proc = run_trainer(smoke_args(branch, f"run.resume={old}", "train.max_steps=20"))
    assert f"resumed from {old} (step 10" in proc.stdout
    assert _same_weights(run_dir / "generator.safetensors", branch / "generator.safetensors")
    missing = run_trainer(smoke_args(tmp_path / "x", f"run.resume={tmp_path / 'nope'}"), check=False)
    assert missing.returncode == 2 and "is not a directory" in missing.stderr


@pytest.mark.parametrize("how, processes", [("sigterm", 1), ("stop_file", 2)])
def test_clean_stop_checkpoints_and_resume_matches_uninterrupted(tmp_path, how, processes):
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    run_trainer(smoke_args(reference, *LONG), processes=processes)
    proc = start_trainer(smoke_args(stopped, *LONG), processes)
    try:
        _wait_for(stopped / "checkpoints" / "step-00000008", proc, timeout=120)
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
        else:
            (stopped / "STOP").touch()
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    stop_line = next(line for line in out.splitlines() if line.startswith("stopped at step"))
    step = int(stop_line.split()[3].split("/")[0])
    assert step % 10 == 0 and step < 64, stop_line  # ranks agree on a multiple of 10 steps
    assert (stopped / "checkpoints" / f"step-{step:08d}" / "manifest.json").is_file()
    assert not (stopped / "STOP").exists()
    out = run_trainer(smoke_args(stopped, *LONG), processes=processes).stdout
    assert f"(step {step}, epoch 0, {step} steps into it)" in out
    for name in ("generator.safetensors", "discriminator.safetensors"):
        assert _same_weights(reference / name, stopped / name), name
