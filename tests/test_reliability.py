"""Faults that training must survive or stop on clearly, with nothing lost: see docs/reliability.md.

A harness of its own: the trainer runs in subprocesses with one fault patched in at a library
boundary (tests/faults/run_with_faults.py), is killed at random moments (tests/faults/crash_harness.py),
or meets what a cluster brings (a preparation longer than the collective timeout, a failed one, two
nodes racing to publish one cache, the main process deciding for every rank), reproduced on CPU.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, SMOKE, read_metrics, run_trainer, smoke_args, trainer_env, write_image_tree
from tools.gpu_check.checks import free_port
from trainer.core.checkpoint import MANIFEST, _sha256, verify

pytestmark = pytest.mark.slow
FAULTS = REPO / "tests" / "faults" / "run_with_faults.py"
RANKS = REPO / "tests" / "dist" / "check_ranks.py"


def run_with_faults(args: list[str], check: bool = False, **faults: str) -> subprocess.CompletedProcess:
    old = dict(os.environ)
    os.environ.update(faults)
    try:
        return run_trainer(args, script=FAULTS, check=check)
    finally:
        os.environ.clear()
        os.environ.update(old)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_failed_checkpoint_write_stops_clearly_and_keeps_earlier_ones(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_with_faults(smoke_args(run_dir, "train.max_steps=30", "ckpt.keep=5"), FAULT_SAVE_FAILS_AT_STEP="20")
    assert proc.returncode == 1
    [line] = error_lines(proc)
    assert "could not write checkpoint step-00000020" in line and "No space left on device" in line
    assert "newest: step-00000016" in line
    assert checkpoint_names(run_dir) == ["step-00000010", "step-00000016"]  # no partial .tmp left either
    assert all(verify(run_dir / "checkpoints" / name) is None for name in checkpoint_names(run_dir))
    out = run_trainer(smoke_args(run_dir, "train.max_steps=30", "ckpt.keep=5")).stdout
    assert "resumed from" in out and "step-00000016" in out and "finished at step 30/30" in out


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


def test_real_full_disk(tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "1300k"):
        pytest.skip("cannot mount a small tmpfs here (needs root); the injected-fault test covers the logic")
    try:
        run_dir = disk / "run"  # each smoke checkpoint is about 400 kB: the third does not fit
        proc = run_trainer(smoke_args(run_dir, "ckpt.keep=50", "log.sample_every_steps=1000"), check=False)
        assert proc.returncode == 1, proc.stderr[-2000:]
        [line] = error_lines(proc)
        assert "the disk is full" in line and "intact" in line
        names = checkpoint_names(run_dir)
        assert names and not any(n.startswith(".tmp") for n in names)
        assert all(verify(run_dir / "checkpoints" / name) is None for name in names)
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_nan_stops_with_network_and_step_and_never_checkpoints_nan(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_with_faults(smoke_args(run_dir, "ckpt.keep=5"), FAULT_NAN_AT_STEP="13:discriminator")
    assert proc.returncode == 3
    [line] = error_lines(proc)
    # weights NaN after step 13; the check before the step-16 (epoch end) checkpoint finds them
    assert "the discriminator stopped producing finite values at step" in line
    assert "step-00000010" in line and "train.on_nonfinite=rollback" in line
    assert checkpoint_names(run_dir) == ["step-00000010"]


def test_nan_rolls_back_when_configured(tmp_path):
    run_dir = tmp_path / "run"
    args = smoke_args(run_dir, "train.on_nonfinite=rollback", "ckpt.keep=5")
    proc = run_with_faults(args, check=True, FAULT_NAN_AT_STEP="13:generator")
    assert "rolled back to" in proc.stdout and "step-00000010 (rollback 1 of 3)" in proc.stdout
    assert "finished at step 32/32" in proc.stdout
    state = json.loads((run_dir / "checkpoints" / "step-00000032" / "train_state.json").read_text())
    assert state["rollbacks"] == 1
    assert all(m["loss_D"] == m["loss_D"] for m in read_metrics(run_dir) if m["step"] >= 20)  # finite again

    no_budget = run_with_faults(
        smoke_args(tmp_path / "b", "train.on_nonfinite=rollback", "train.max_rollbacks=0"),
        FAULT_NAN_AT_STEP="13:generator",
    )
    assert no_budget.returncode == 3 and "train.max_rollbacks is used up" in error_lines(no_budget)[0]


def test_fp16_overflow_skips_are_counted_not_divergence(tmp_path):
    run_dir = tmp_path / "run"
    run_with_faults(smoke_args(run_dir, "train.max_steps=12"), check=True, FAULT_FP16_SCALER="1")
    state = json.loads((run_dir / "checkpoints" / "step-00000012" / "train_state.json").read_text())
    assert state["skipped_steps_d"] >= 1 and state["skipped_steps_g"] >= 1  # counted, and the run went on
    # The scaler halves its scale once per skipped optimizer step (no growth here), so the saved
    # scale pins the exact number of skips the loop counted.
    scale = torch.load(run_dir / "checkpoints" / "step-00000012" / "scaler.pt", weights_only=True)["scale"]
    assert 2.0**126 / scale == 2.0 ** (state["skipped_steps_d"] + state["skipped_steps_g"])
    assert all(m["loss_D"] == m["loss_D"] and m["loss_G"] == m["loss_G"] for m in read_metrics(run_dir))


def _bad_tree(root: Path) -> Path:
    write_image_tree(root, 24)  # PNG + JPEG, mixed sizes, one grayscale
    (root / "a" / "zero.jpg").write_bytes(b"")
    (root / "a" / "text.png").write_text("not an image")
    good = next(root.rglob("*.jpg")).read_bytes()
    (root / "b" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "b" / "notes.txt").write_text("ignored: no image extension")
    return root


def test_bad_files_stop_before_training_by_default(tmp_path):
    root = _bad_tree(tmp_path / "imgs")
    run_dir = tmp_path / "run"
    proc = run_trainer(
        smoke_args(run_dir, "data.source=folder", f"data.root={root}", "train.batch_size=8"), check=False
    )
    assert proc.returncode == 2
    [line] = error_lines(proc)
    assert "3 of 27 image files" in line and "zero.jpg (empty file)" in line and "data.bad_files=skip" in line
    assert not (run_dir / "checkpoints").exists()


def test_bad_files_skipped_when_configured(tmp_path):
    root = _bad_tree(tmp_path / "imgs")
    run_dir = tmp_path / "run"
    proc = run_trainer(
        smoke_args(
            run_dir,
            "data.source=folder",
            f"data.root={root}",
            "train.batch_size=8",
            "data.bad_files=skip",
            "train.max_steps=6",
        )
    )
    assert "3 of 27 image files" in proc.stderr and "skipped (data.bad_files=skip)" in proc.stderr
    assert "ignoring 1 files without an image extension" in proc.stderr
    assert "24 images, 3 steps/epoch" in proc.stdout


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("victim", ["optimizer.bin", "random_states_0.pkl"])
def test_checkpoint_with_code_in_a_pickle_is_refused(tmp_path, victim):
    run_dir = tmp_path / "run"
    run_trainer(smoke_args(run_dir, "train.max_steps=10"))
    ckpt = run_dir / "checkpoints" / "step-00000010"
    marker = tmp_path / "pwned"
    torch.save({"state": _RunsCode(str(marker))}, ckpt / victim)
    manifest = json.loads((ckpt / MANIFEST).read_text())  # a tamperer would fix the manifest too
    manifest["files"][victim] = {"size": (ckpt / victim).stat().st_size, "sha256": _sha256(ckpt / victim)}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))

    proc = run_trainer(smoke_args(run_dir, "train.max_steps=20"), check=False)
    assert proc.returncode == 2
    [line] = error_lines(proc)
    assert f"refusing to load {ckpt / victim}" in line and "could run code" in line
    assert not marker.exists()


def test_crash_anywhere_loses_nothing(tmp_path):
    """SIGKILL at random moments, also inside checkpoint writes; CRASH_TRIALS=200 for a soak run."""
    from tests.conftest import SUMMARY_LINES
    from tests.faults.crash_harness import run_trials

    trials, seed = int(os.environ.get("CRASH_TRIALS", "4")), int(os.environ.get("CRASH_SEED", "0"))
    figures = run_trials(trials, seed, tmp_path)
    SUMMARY_LINES.append(figures.summary() + f" (seed {seed})")
    assert not figures.failures, "\n".join(figures.failures)
    assert figures.checkpoints_lost == 0 and figures.final_weights_matched == trials
    assert figures.kills >= trials and figures.kills_during_checkpoint_writes >= 1


def test_no_credentials_in_logs_configs_or_tracker_files(tmp_path):
    secrets = {
        "WANDB_API_KEY": "wandbsecret" + "0" * 29,
        "HF_TOKEN": "hf_secretTOKENvalue123",
        "GITHUB_TOKEN": "ghp_secretTOKEN456",
    }
    run_dir = tmp_path / "run"
    old = dict(os.environ)
    os.environ.update(secrets)
    try:  # W&B offline (explicit), with an API key in the environment as on a logged-in cluster
        proc = run_trainer(smoke_args(run_dir, "train.max_steps=10", "log.tracker=wandb", "log.wandb_mode=offline"))
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert list((run_dir / "wandb").glob("offline-run-*"))  # the tracker's own files are there to search
    leaks = []
    for path in [p for p in tmp_path.rglob("*") if p.is_file()]:
        data = path.read_bytes()
        leaks += [f"{name} in {path}" for name, value in secrets.items() if value.encode() in data]
    leaks += [f"{name} in output" for name, value in secrets.items() if value in proc.stdout + proc.stderr]
    assert not leaks, leaks


def _packs(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.rglob("*.npy"))


# ---- preparation outside collectives ---------------------------------------------------------------
def test_prepare_command_then_training_reuses_it_without_rebuilding(tmp_path):
    images = write_image_tree(tmp_path / "images", 48, sizes=((32, 32),))
    cache = tmp_path / "cache"
    data = ["data.source=folder", f"data.root={images}", f"data.cache_dir={cache}"]
    prepare = subprocess.run(
        [sys.executable, "-m", "trainer.prepare", "--config", str(SMOKE), *data],
        cwd=REPO,
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert prepare.returncode == 0, prepare.stderr
    (pack,) = cache.glob("*.npy")
    built = (pack.stat().st_ino, pack.stat().st_mtime_ns)

    run_trainer(smoke_args(tmp_path / "run", "train.max_steps=4", *data), processes=2)
    assert _packs(cache) == [pack.name] and (pack.stat().st_ino, pack.stat().st_mtime_ns) == built


def test_preparation_longer_than_the_collective_timeout_still_trains(tmp_path, monkeypatch):
    """dist.timeout_s=8 and a preparation of 20 s: the waiting rank is in no collective meanwhile.

    (No tracker: W&B's start on rank 0 alone can take seconds on a loaded machine, which an 8 s
    timeout is not meant for.)"""
    monkeypatch.setenv("FAULT_SLOW_PREPARE_S", "20")
    run_dir = tmp_path / "run"
    args = smoke_args(run_dir, "train.max_steps=4", "dist.timeout_s=8", "log.tracker=none")
    proc = run_trainer(args, processes=2, script=FAULTS)
    assert "finished at step 4/4" in proc.stdout
    assert (run_dir / "checkpoints" / "step-00000004").is_dir()


def test_failed_preparation_ends_every_rank_within_seconds_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("FAULT_PREPARE_FAILS", "1")
    start = time.monotonic()
    proc = run_trainer(smoke_args(tmp_path / "run"), processes=2, script=FAULTS, check=False, timeout=120)
    took = time.monotonic() - start
    assert proc.returncode != 0
    assert "error: injected: the dataset is broken" in proc.stderr
    assert took < 30, f"the launch took {took:.0f}s to end"  # start-up included; the failure itself spreads in ~1 s
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_main_decides_shares_answers_and_errors_across_ranks():
    """tests/dist/check_ranks.py asserts, on both ranks, that each rank got the main process's answer or error."""
    proc = run_trainer([], processes=2, script=RANKS, timeout=120)
    assert proc.stdout.count("ranks ok") == 2, proc.stdout + proc.stderr


# ---- one pack for a job on a shared filesystem ----------------------------------------------------------
def test_two_nodes_sharing_a_cache_build_one_pack_and_train_alike(tmp_path):
    """Two launchers as two nodes of one job (machine rank 0 and 1), each node preparing its own cache
    (data.cache_per_node=true) into the same shared directory, started together: both race to publish."""
    images = write_image_tree(tmp_path / "images", 64, sizes=((32, 32),))
    cache = tmp_path / "cache"
    port = free_port()
    args = smoke_args(
        tmp_path / "run",
        "train.max_steps=4",
        "data.source=folder",
        f"data.root={images}",
        f"data.cache_dir={cache}",
        "data.cache_per_node=true",
    )

    def node(rank: int) -> subprocess.Popen:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
            "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
            str(REPO / "trainer" / "train.py"), *args,
        ]  # fmt: skip
        return subprocess.Popen(
            command, cwd=REPO, env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    nodes = [node(0), node(1)]
    outputs = [p.communicate(timeout=240)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert len(_packs(cache)) == 1 and not list(cache.glob(".tmp-*"))
    assert "finished at step 4/4" in outputs[0]
