"""Observability: the W&B run (read back from its offline files), resume into the same run, the
credentials check, and the console with and without a terminal.

Every run here is offline or fails before W&B starts: no test touches the network. HOME is a
temporary directory (no ~/.netrc, no W&B settings), and W&B writes under each run's run.dir.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import pty
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import REPO, SMOKE, launch_command, read_metrics, run_command, smoke_args, trainer_env
from tests.test_training import _wait_for
from tests.wandb_offline import offline_run_files, read_offline_run
from trainer.core.checkpoint import TrainState
from trainer.core.config import load_config
from trainer.monitor import measurements, model_artifacts, sinks, tracking, wandb_sink
from trainer.util.errors import ConfigError, TrackingError

STEP_METRICS = ("loss_D", "loss_G", "D(x)", "D(G(z))_before", "D(G(z))_after", "grad_norm_D", "grad_norm_G")
CONTROL = ("\x1b", "\r")  # ANSI escape sequences; carriage returns redraw progress bars


def _env(tmp_path: Path, **settings: str | None) -> dict[str, str]:
    """The test environment with no W&B credentials or settings; `settings` add (or, with None, remove) variables."""
    env = trainer_env()
    for key in list(env):
        if key.startswith(("WANDB_", "SLURM_")) or key in ("NETRC", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
            del env[key]
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), XDG_CONFIG_HOME=str(home / ".config"))
    env["WANDB_MODE"] = "offline"
    for key, value in settings.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _run(args: list[str], env: dict[str, str], processes: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    proc = run_command(launch_command(args, processes), env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_rows_match_metrics_jsonl(run, run_dir: Path) -> None:
    """The W&B rows are the records of metrics.jsonl (cross-rank means), at images seen, with sections."""
    records = read_metrics(run_dir)
    rows = run.rows_with("train/loss_D")
    assert [row["_step"] for row in rows] == [rec["images_seen"] for rec in records]
    for row, rec in zip(rows, records, strict=True):
        assert row["images_seen"] == row["_step"] and row["epoch"] == rec["epoch"]
        for name in STEP_METRICS:
            assert row[f"train/{name}"] == pytest.approx(rec[name], rel=1e-6), name
        assert row["opt/lr_G"] == row["opt/lr_D"] == rec["lr_G"] == rec["lr_D"] == pytest.approx(2e-4)
        assert row["perf/images_per_s"] == pytest.approx(rec["images_per_s"]) and rec["images_per_s"] > 0
        assert 0 < row["train/grad_norm_D"] < math.inf and 0 < row["train/grad_norm_G"] < math.inf


@pytest.mark.slow
def test_offline_run_holds_metrics_images_and_config_and_plain_log_has_no_control_sequences(tmp_path):
    run_dir = tmp_path / "run"
    env = _env(tmp_path, SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="2", SLURM_JOB_NAME="smoke-job")
    proc = _run(smoke_args(run_dir, "log.wandb_tags=[smoke,ci]"), env)  # 16 steps/epoch, 2 epochs

    (file,) = offline_run_files(run_dir)
    run = read_offline_run(file)
    # The run name tells runs apart: the config's name and the Slurm job of its first start; the group is run.name.
    assert (run.project, run.name, run.group, run.tags) == ("dcgan-trainer", "smoke-4242", "smoke", ["smoke", "ci"])
    assert run.exit_code == 0
    # The resolved config is the run config (plus how it was launched, and which Slurm job and attempt).
    resolved = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    assert {key: run.config[key] for key in resolved} == resolved
    assert run.config["launch"] == {"num_processes": 1, "device": "cpu"}
    (job,) = run.config["slurm"]["jobs"]  # one per start: tests/scenarios/test_requeue.py
    assert job == {
        "job_id": "4242",
        "array_job_id": None,
        "array_task_id": None,
        "job": "4242",
        "restart_count": 2,
        "job_name": "smoke-job",
        "num_nodes": 1,
    }
    # Charts use images seen as their x-axis.
    for section in ("train", "opt", "perf", "amp", "samples"):
        assert run.step_metrics[f"{section}/*"] == "images_seen"

    _assert_rows_match_metrics_jsonl(run, run_dir)
    assert not any(key.startswith("amp/") or key.startswith("perf/gpu") for row in run.history for key in row)  # CPU

    # Images: the real grid once at the start, the fixed-noise grid every 10 steps and at epoch ends,
    # the very PNGs in samples/, at the images seen when they were drawn.
    (real,) = run.rows_with("samples/real")
    assert real["_step"] == 0 and real["samples/real"]["sha256"] == _sha256(run_dir / "samples" / "real.png")
    grids = {row["_step"]: row for row in run.rows_with("samples/fixed_noise")}
    assert sorted(grids) == [160, 256, 320, 480, 512]  # steps 10, 16 (epoch 1), 20, 30, 32 (epoch 2) x 16 images
    assert all(row["images_seen"] == step for step, row in grids.items())
    assert grids[160]["samples/fixed_noise"]["sha256"] == _sha256(run_dir / "samples" / "step_00000010.png")
    assert grids[256]["samples/fixed_noise"]["sha256"] == _sha256(run_dir / "samples" / "epoch_001.png")
    assert grids[160]["samples/fixed_noise"]["_type"] == "image-file"

    # Not a terminal: plain periodic lines, a config table first and a summary table last, no control sequences.
    for stream in (proc.stdout, proc.stderr):
        assert not any(c in stream for c in CONTROL), repr(next(c for c in CONTROL if c in stream))
    lines = proc.stdout.splitlines()
    step_lines = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in step_lines] == [f"{r['step']}/32" for r in read_metrics(run_dir)]
    assert all(" img/s | eta " in line and "grad norm D " in line for line in step_lines)
    config_at = lines.index(f"resolved config ({run_dir / 'config.yaml'})")
    summary_at = lines.index("run summary")
    assert config_at < lines.index(step_lines[0]) and summary_at > lines.index(step_lines[-1])
    assert any("log.wandb_tags" in line and "[smoke, ci]" in line for line in lines[config_at:])
    summary = "\n".join(lines[summary_at:])
    assert f"wandb sync {run_dir / 'wandb'}/offline-run-*" in summary and "32/32 (epoch 2)" in summary
    assert f"tracking: W&B offline (WANDB_MODE=offline) in {file.parent}" in proc.stdout


@pytest.mark.slow
def test_two_processes_make_one_wandb_run_offline_by_default_without_credentials(tmp_path):
    run_dir = tmp_path / "run"
    env = _env(tmp_path, WANDB_MODE=None)  # no WANDB_MODE, no credentials: the defaults must still run
    proc = _run(smoke_args(run_dir, "train.max_steps=10"), env, processes=2)

    assert len(list((run_dir / "wandb").glob("*run-*"))) == 1  # exactly one W&B run, and it is offline
    (file,) = offline_run_files(run_dir)
    run = read_offline_run(file)
    assert run.config["launch"]["num_processes"] == 2
    _assert_rows_match_metrics_jsonl(run, run_dir)  # metrics.jsonl holds the means over both ranks
    # Rank 1 prints nothing of its own: one config table, one tracking line, one summary, each log line once.
    assert proc.stdout.count("resolved config (") == 1 and proc.stdout.count("run summary") == 1
    assert proc.stdout.count("tracking: W&B offline (no W&B credentials found") == 1
    assert proc.stdout.count("step 5/10 epoch 0 |") == 1 and proc.stdout.count("step 10/10 epoch 0 |") == 1


@pytest.mark.slow
def test_killed_run_continues_the_same_wandb_run_and_a_fork_starts_a_new_one(tmp_path):
    run_dir = tmp_path / "run"
    args = smoke_args(run_dir, "data.fake_size=1024", "train.epochs=1", "ckpt.every_steps=8", "ckpt.keep=50")
    # W&B writes its offline file every 15 s; this run is killed a second in, so write every 0.1 s.
    env = _env(tmp_path, WANDB__TRANSACTION_LOG_FLUSH_INTERVAL="0.1")
    proc = subprocess.Popen(
        launch_command(args), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait_for(run_dir / "checkpoints" / "step-00000016", proc, timeout=120)
        time.sleep(0.3)  # a flush or two
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    (first_file,) = offline_run_files(run_dir)
    first = read_offline_run(first_file)
    # The id is in the train state from the first checkpoint on.
    first_ckpt = json.loads((run_dir / "checkpoints" / "step-00000008" / "train_state.json").read_text())
    assert first_ckpt["tracker_run_id"] == first.run_id and first.run_id
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    resumed_images = int(newest.name.split("-")[1]) * 16
    first_steps = [row["_step"] for row in first.rows_with("train/loss_D")]
    assert first_steps and first_steps == sorted(set(first_steps)), first_steps

    out = _run(args, env).stdout
    assert f"resumed from {newest}" in out
    files = offline_run_files(run_dir)
    assert len(files) == 2 and files[0] == first_file  # each start writes its own offline directory ...
    second = read_offline_run(files[1])
    assert second.run_id == first.run_id  # ... of the same W&B run, which `wandb sync` joins
    steps = [row["_step"] for row in second.rows_with("train/loss_D")]
    assert steps == sorted(set(steps)) and steps[0] > resumed_images and steps[-1] == 64 * 16
    assert first.rows_with("samples/real") and not second.rows_with("samples/real")  # logged once per W&B run
    assert (
        json.loads((run_dir / "checkpoints" / "step-00000064" / "train_state.json").read_text())["tracker_run_id"]
        == first.run_id
    )

    # Resuming another run's checkpoint in a new run.dir is a new run: a new W&B run, steps from there.
    branch = tmp_path / "branch"
    fork = smoke_args(branch, "data.fake_size=1024", "train.epochs=1", "train.max_steps=12")
    _run([*fork, f"run.resume={run_dir / 'checkpoints' / 'step-00000008'}"], env)
    (branch_file,) = offline_run_files(branch)
    forked = read_offline_run(branch_file)
    assert forked.run_id != first.run_id
    assert [row["_step"] for row in forked.rows_with("train/loss_D")] == [10 * 16, 12 * 16]
    assert [row["_step"] for row in forked.rows_with("samples/real")] == [8 * 16]


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings, overrides, needle",
    [
        ({"WANDB_MODE": "online"}, [], "error: W&B online mode (WANDB_MODE=online) needs credentials"),
        ({"WANDB_MODE": None}, ["log.wandb_mode=online"], "error: W&B online mode (log.wandb_mode=online) needs"),
        # the control: without the W&B error, this command fails on its data
        ({"WANDB_MODE": "offline"}, [], "error: data.root="),
    ],
)
def test_online_mode_without_credentials_fails_before_any_data_is_read(tmp_path, settings, overrides, needle):
    run_dir = tmp_path / "run"
    missing = tmp_path / "no-such-dataset"
    args = ["--config", str(SMOKE), f"run.dir={run_dir}", "data.source=folder", f"data.root={missing}", *overrides]
    proc = _run(args, _env(tmp_path, **settings), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(needle), proc.stderr[-2000:]
    if "W&B" in needle:
        assert "`wandb login`" in errors[0] and "log.wandb_mode=offline" in errors[0] and str(missing) not in errors[0]
        assert not run_dir.exists()  # nothing was written either


@pytest.mark.slow
def test_terminal_gets_a_live_progress_display(tmp_path):
    """Under a pseudo-terminal rich draws its progress display; tracking off writes no W&B files."""
    run_dir = tmp_path / "run"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))  # 40 rows, 200 columns
    env = _env(tmp_path, TERM="xterm-256color")
    proc = subprocess.Popen(
        launch_command(smoke_args(run_dir, "log.tracker=none")), cwd=REPO, env=env, stdout=slave, stderr=slave
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=60) == 0
    out = b"".join(chunks).decode(errors="replace")
    assert "\x1b[?25l" in out and "\x1b[?25h" in out  # the live display hides the cursor, then restores it
    assert "━" in out and "eta" in out and "img/s" in out  # the bar with speed and time left
    assert "step 15/32 epoch 0 |" in out and "finished at step 32/32" in out  # the log lines are still there
    assert "tracking: off (log.tracker=none)" in out and not (run_dir / "wandb").exists()


@pytest.mark.slow
def test_tensorboard_tracker_writes_the_same_scalars_and_images(tmp_path):
    # tensorboard is in the `test` extra (not a dependency of the trainer): a missing one fails here, not skips
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    proc = _run(smoke_args(run_dir, "log.tracker=tensorboard", "train.max_steps=10"), _env(tmp_path))
    assert f"tensorboard --logdir {run_dir / 'tensorboard'}" in proc.stdout and not (run_dir / "wandb").exists()
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    records = read_metrics(run_dir)
    for section, name in (("train", "loss_D"), ("train", "grad_norm_G"), ("opt", "lr_D"), ("perf", "images_per_s")):
        scalars = events.Scalars(f"{section}/{name}")
        assert [e.step for e in scalars] == [r["images_seen"] for r in records] == [80, 160]
        assert [e.value for e in scalars] == pytest.approx([r[name] for r in records], rel=1e-6)
    assert [e.step for e in events.Images("samples/real")] == [0]
    assert [e.step for e in events.Images("samples/fixed_noise")] == [160]


@pytest.mark.slow
def test_summary_keeps_the_best_model_artifacts_hold_it_and_evaluate_adds_to_the_same_run(tmp_path):
    from tests.test_evaluation import eval_overrides, run_module

    run_dir = tmp_path / "run"
    env = _env(tmp_path, SLURM_JOB_ID="4243", SLURM_ARRAY_JOB_ID="4240", SLURM_ARRAY_TASK_ID="3")
    evaluation = [*eval_overrides(tmp_path / "cache"), "eval.num_samples=40", "eval.kid_subset_size=20"]
    args = smoke_args(run_dir, "train.epochs=3", "eval.every_epochs=1", "log.wandb_artifacts=best", *evaluation)
    _run(args, env)

    (file,) = offline_run_files(run_dir)
    run = read_offline_run(file)
    assert run.name == "smoke-4240_3" and run.config["slurm"]["jobs"][0]["array_task_id"] == "3"  # an array task's
    evals = [m for m in read_metrics(run_dir) if "fid" in m]
    assert [m["step"] for m in evals] == [16, 32, 48]
    best = min(evals, key=lambda m: m["fid"])
    # The run summary answers "which model is best": the lowest FID, its step and its checkpoint.
    assert run.summaries["eval/fid"] == ["min", "last"] and run.summaries["eval/is_mean"] == ["max", "last"]
    assert run.summary["eval/fid"] == {"min": best["fid"], "last": evals[-1]["fid"]}
    assert run.summary["eval/kid_mean"]["min"] == min(m["kid_mean"] for m in evals)
    assert run.summary["eval/is_mean"]["max"] == max(m["is_mean"] for m in evals)
    record = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    assert (
        (run.summary["best/fid"], run.summary["best/step"])
        == (best["fid"], best["step"])
        == (record["fid"], record["step"])
    )
    assert run.summary["best/checkpoint"] == str((run_dir / "checkpoints" / record["checkpoint"]).resolve())
    assert run.summary["best/images_seen"] == best["step"] * 16
    # log.wandb_artifacts=best: a model artifact for each new best, the last one the best checkpoint's.
    improving = [m["step"] for i, m in enumerate(evals) if m["fid"] < min([e["fid"] for e in evals[:i]] or [math.inf])]
    assert [a["metadata"]["step"] for a in run.artifacts] == improving
    artifact = run.artifacts[-1]
    assert artifact["name"] == f"generator-{run.run_id}" and artifact["type"] == "model"
    assert "best" in artifact["aliases"] and f"step-{best['step']}" in artifact["aliases"]
    assert (
        set(artifact["files"]) == {"generator.safetensors", "config.yaml"}
        and not artifact["files"]["config.yaml"]["ref"]
    )
    assert artifact["metadata"]["fid"] == best["fid"] and artifact["metadata"]["model"]["ngf"] == 8
    assert not any("final" in a["aliases"] for a in run.artifacts)  # best only

    # trainer.evaluate adds its row to this W&B run (its id is in the checkpoint), not to a new one.
    proc = run_module("trainer.evaluate", [str(run_dir), "--best", *evaluation], env=env)
    assert f"W&B: added to run {run.run_id} under eval/posthoc/" in proc.stdout
    files = offline_run_files(run_dir)
    assert len(files) == 2 and files[0] == file
    evaluated = read_offline_run(files[1])
    assert evaluated.run_id == run.run_id
    (row,) = evaluated.rows_with("eval/posthoc/fid")
    (report_file,) = (run_dir / "eval").glob("*.json")
    report = json.loads(report_file.read_text())
    assert row["eval/posthoc/fid"] == report["metrics"]["fid"] and row["images_seen"] == best["step"] * 16
    assert row["_step"] == report["wandb"]["step"] > read_metrics(run_dir)[-1]["images_seen"]  # after every row
    assert row["eval/posthoc/reports"]["_type"] == "table-file" and row["eval/posthoc/reports"]["nrows"] == 1


@pytest.mark.slow
def test_auto_mode_continues_offline_when_the_online_start_fails(tmp_path):
    """Credentials but no W&B server (a compute node without network): warn, log offline, train."""
    run_dir = tmp_path / "run"
    env = _env(
        tmp_path,
        WANDB_MODE=None,
        WANDB_API_KEY="k" * 40,
        WANDB_BASE_URL="http://127.0.0.1:9",  # nothing listens there
        WANDB_INIT_TIMEOUT="1",
    )
    args = smoke_args(run_dir, "train.max_steps=6", "log.wandb_artifacts=final", "log.wandb_artifact_storage=reference")
    proc = _run(args, env)
    warnings_ = [line for line in proc.stderr.splitlines() if "W&B could not start online" in line]
    assert len(warnings_) == 1 and f"wandb sync {run_dir / 'wandb'}/offline-run-*" in warnings_[0]
    assert "tracking: W&B offline (the online start failed" in proc.stdout
    (file,) = offline_run_files(run_dir)
    run = read_offline_run(file)
    assert run.exit_code == 0 and run.rows_with("train/loss_D")
    # log.wandb_artifacts=final with reference storage: the exported files, referenced where they are.
    (artifact,) = run.artifacts
    assert "final" in artifact["aliases"] and "step-6" in artifact["aliases"]
    assert artifact["files"]["generator.safetensors"]["ref"] == (run_dir / "generator.safetensors").resolve().as_uri()


# ---- units: mode resolution, credentials, host metrics -------------------------------------------


def test_credentials_are_found_where_wandb_finds_them(tmp_path, monkeypatch):
    import wandb

    for key in list(os.environ):
        if key.startswith("WANDB_") or key == "NETRC":
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    settings = home / ".config" / "wandb" / "settings"
    settings.parent.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)

    def found() -> tuple[bool, bool]:
        """(W&B's own lookup, the by-hand one for older wandb)"""
        wandb.teardown()  # W&B reads its settings once per process
        return wandb_sink.wandb_credentials_found(), wandb_sink.wandb_credentials_found(dict(os.environ))

    try:
        assert found() == (False, False)
        # What `wandb login --host https://wandb.example.org` leaves: the host in W&B's settings file,
        # the key in ~/.netrc under that host.
        settings.write_text("[default]\nbase_url = https://wandb.example.org\n")
        netrc = home / ".netrc"
        netrc.write_text(f"machine wandb.example.org\n  login user\n  password {'k' * 40}\n")
        netrc.chmod(0o600)
        assert found() == (True, True)
        settings.write_text("[default]\nbase_url = https://other.example.org\n")
        assert found() == (False, False)  # a key for another host is no login for this one
        settings.write_text(f"[default]\napi_key = {'k' * 40}\n")  # a key in the settings file
        assert found() == (True, True)
    finally:
        wandb.teardown()


def test_artifact_storage_references_files_on_a_shared_filesystem(tmp_path):
    mounts = "\n".join(
        [
            "/dev/sda1 / ext4 rw 0 0",
            "nfs01:/export/home /shared nfs4 rw 0 0",
            "lustre@o2ib:/fs /lustre lustre rw 0 0",
            "tmpfs /shared/tmp tmpfs rw 0 0",
        ]
    )
    assert model_artifacts.storage("auto", Path("/shared/runs/x"), mounts) == (
        "reference",
        "run.dir is on a shared filesystem (nfs4)",
    )
    assert model_artifacts.storage("auto", Path("/lustre/u/runs/x"), mounts)[0] == "reference"
    assert model_artifacts.storage("auto", Path("/shared/tmp/runs/x"), mounts)[0] == "upload"  # the longest mount wins
    assert model_artifacts.storage("auto", Path("/home/u/runs/x"), mounts)[0] == "upload"
    assert model_artifacts.storage("upload", Path("/shared/runs/x"), mounts)[0] == "upload"
    assert model_artifacts.storage("reference", Path("/home/u/runs/x"), mounts)[0] == "reference"
    assert wandb_sink.run_display_name(load_config(None, ["run.name=a"]), {"SLURM_JOB_ID": "7"}) == "a-7"
    assert wandb_sink.run_display_name(load_config(None, ["run.name=a"]), {}) == "a"


def _log(**overrides: str):
    return load_config(None, [f"log.{k}={v}" for k, v in overrides.items()]).log


def test_wandb_mode_resolution(tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    no_creds = {"HOME": str(tmp_path / "empty")}
    creds = {"NETRC": str(netrc)}
    assert wandb_sink.resolve_wandb_mode(_log(), no_creds)[0] == "offline"
    assert wandb_sink.resolve_wandb_mode(_log(), creds)[0] == "online"
    assert wandb_sink.resolve_wandb_mode(_log(), {**no_creds, "WANDB_API_KEY": "x" * 40})[0] == "online"
    assert wandb_sink.resolve_wandb_mode(_log(), {**creds, "WANDB_MODE": "offline"})[0] == "offline"
    assert wandb_sink.resolve_wandb_mode(_log(), {**creds, "WANDB_MODE": "dryrun"})[0] == "offline"
    assert wandb_sink.resolve_wandb_mode(_log(), {**creds, "WANDB_MODE": "disabled"})[0] == "disabled"
    assert wandb_sink.resolve_wandb_mode(_log(wandb_mode="offline"), {**creds, "WANDB_MODE": "online"})[0] == "offline"
    assert wandb_sink.resolve_wandb_mode(_log(wandb_mode="online"), creds)[0] == "online"
    # a netrc entry for another host is not a W&B login
    assert (
        wandb_sink.resolve_wandb_mode(_log(), {**creds, "WANDB_BASE_URL": "https://wandb.example.org"})[0] == "offline"
    )
    with pytest.raises(TrackingError, match=r"WANDB_MODE=online.*`wandb login`.*log.wandb_mode=offline"):
        wandb_sink.resolve_wandb_mode(_log(), {**no_creds, "WANDB_MODE": "online"})
    with pytest.raises(TrackingError, match="log.wandb_mode=online"):
        wandb_sink.resolve_wandb_mode(_log(wandb_mode="online"), {**no_creds, "WANDB_MODE": "offline"})
    with pytest.raises(TrackingError, match="WANDB_MODE='sometimes'"):
        wandb_sink.resolve_wandb_mode(_log(), {**no_creds, "WANDB_MODE": "sometimes"})


def test_host_metrics_report_learning_rates_loss_scale_and_skipped_steps():
    params = [torch.nn.Parameter(torch.zeros(1))]
    optimizers = {"G": torch.optim.Adam(params, lr=1e-3), "D": torch.optim.Adam(params, lr=4e-4)}
    state = TrainState(skipped_steps_d=3, skipped_steps_g=1)
    plain = SimpleNamespace(scaler=None, device=torch.device("cpu"))
    assert measurements.host_metrics(plain, optimizers, state) == {"opt/lr_G": 1e-3, "opt/lr_D": 4e-4}
    fp16 = SimpleNamespace(scaler=torch.amp.GradScaler("cpu", init_scale=1024.0), device=torch.device("cpu"))
    assert measurements.host_metrics(fp16, optimizers, state) == {
        "opt/lr_G": 1e-3,
        "opt/lr_D": 4e-4,
        "amp/loss_scale": 1024.0,
        "amp/skipped_steps_D": 3.0,
        "amp/skipped_steps_G": 1.0,
    }


def test_tensorboard_without_its_package_is_a_config_error(monkeypatch):
    monkeypatch.setattr(sinks, "is_tensorboard_available", lambda: False)
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        tracking.choose_tracker(load_config(None, ["log.tracker=tensorboard"]))


def test_every_sink_gets_the_same_record_and_a_failing_dashboard_is_dropped(tmp_path, monkeypatch, capsys):
    """One record: metrics.jsonl (names without their section), the dashboard and the console line; a
    dashboard that raises is replaced by none with a warning, and metrics.jsonl keeps every row."""
    from accelerate import Accelerator

    from trainer.monitor.console import Console

    seen = []

    class Recording(sinks.Dashboard):
        kind = "recording"

        def write(self, record):
            if record.values.get("eval/fid") == 666.0:
                raise ConnectionResetError("the service is gone")
            seen.append(record)

    monkeypatch.setitem(tracking.TRACKERS, "recording", Recording)
    cfg = load_config(None, [f"run.dir={tmp_path}", "log.tracker=none"])
    accelerator = Accelerator(cpu=True)
    console = Console(accelerator)
    console.start_progress(0, 100, 0)  # no terminal here: only remembers the total for the ETA
    tracker = tracking.Tracker(cfg, sinks.TrackerChoice("recording", "a test"), accelerator, console)
    state = TrainState(step=10, epoch=1, global_batch=64)
    values = {f"train/{name}": 0.5 for name in STEP_METRICS} | {"opt/lr_G": 2e-4, "perf/images_per_s": 640.0}
    tracker.write(values, state)
    state.step = 20
    tracker.write({"eval/fid": 12.5, "eval/weights": "ema", "eval/num_samples": 100, "eval/seconds": 3.0}, state)

    (row, evaluation) = seen
    assert (row.step, row.epoch, row.images_seen, row.values) == (10, 1, 640, values)
    assert evaluation.values["eval/fid"] == 12.5 and evaluation.images_seen == 1280
    rows = read_metrics(tmp_path)
    assert rows[0] == {"step": 10, "epoch": 1, "images_seen": 640, "lr_G": 2e-4, "images_per_s": 640.0} | {
        name: 0.5 for name in STEP_METRICS
    }
    assert rows[1] == {"step": 20, "epoch": 1, "images_seen": 1280, "fid": 12.5, "eval_weights": "ema"} | {
        "eval_num_samples": 100,
        "eval_s": 3.0,
    }
    out = capsys.readouterr().out
    assert out.count("step ") == 1 and "step 10/100 epoch 1 | loss_D 0.5000 loss_G 0.5000" in out
    assert "| 640 img/s | eta 0m09s" in out  # 90 steps of 64 images at 640 img/s

    with pytest.warns(UserWarning, match="the recording tracker failed while logging metrics"):
        tracker.write({"eval/fid": 666.0}, state)
    assert tracker.dashboard.kind == "none" and tracker.summary() == [
        ("tracking", "off (failed while logging metrics)")
    ]
    tracker.write({"eval/fid": 1.0}, state)
    assert [r.get("fid") for r in read_metrics(tmp_path)] == [None, 12.5, 666.0, 1.0] and len(seen) == 2
