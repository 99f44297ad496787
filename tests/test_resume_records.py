"""A resume does what the records say, and bad starts say so in one line (issue: "a resume that does
what the records say"). Each of these failed before its fix; through the real entry point unless the
behaviour lives in one function (image conversion).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import launch_command, read_metrics, run_trainer, smoke_args, trainer_env
from tests.test_reliability import run_with_faults
from tests.test_training import _wait_for
from trainer.core import data, packed
from trainer.core.config import load_config

pytestmark = pytest.mark.slow

QUIET = ["log.tracker=none"]


def test_an_allowed_change_of_lr_and_betas_is_what_adam_then_uses(tmp_path):
    """The optimizer state carries its lr and betas; an allowed change must win over them, and say so truly."""
    run_dir = tmp_path / "run"
    run_trainer(smoke_args(run_dir, "train.max_steps=10", *QUIET))
    changed = ["train.max_steps=20", "train.lr=1e-4", "train.betas=[0.6,0.99]", "run.resume_changes=allow"]
    proc = run_trainer(smoke_args(run_dir, *changed, *QUIET))
    assert "train.lr: 0.0002 -> 0.0001" in proc.stdout
    rows = [r for r in read_metrics(run_dir) if "lr_G" in r]
    assert [(r["step"], r["lr_G"], r["lr_D"]) for r in rows if r["step"] > 10] == [(15, 1e-4, 1e-4), (20, 1e-4, 1e-4)]
    # What Adam stepped with: the param groups the checkpoint saved after the resumed steps.
    for name in ("optimizer.bin", "optimizer_1.bin"):
        groups = torch.load(run_dir / "checkpoints" / "step-00000020" / name, weights_only=True)["param_groups"]
        assert [(g["lr"], tuple(g["betas"])) for g in groups] == [(1e-4, (0.6, 0.99))], name
    saved = load_config(str(run_dir / "checkpoints" / "step-00000020" / "config.yaml"))
    assert (saved.train.lr, list(saved.train.betas)) == (1e-4, [0.6, 0.99])


def test_a_stop_file_written_while_the_run_starts_is_honoured(tmp_path):
    """Preparation can take minutes; a STOP written then is for this start (an older one is not)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = run_dir / "STOP"
    stale.touch()
    os.utime(stale, (time.time() - 3600, time.time() - 3600))  # an earlier job's
    proc = run_trainer(smoke_args(run_dir, "train.max_steps=12", *QUIET))
    assert "finished at step 12/12" in proc.stdout and not stale.exists()

    other = tmp_path / "other"
    started = subprocess.Popen(
        launch_command(smoke_args(other, "train.max_steps=30", *QUIET)),
        env=trainer_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(other / ".run-lock.json", started, timeout=120)  # taken first thing at start-up
        (other / "STOP").touch()
        out, _ = started.communicate(timeout=180)
    finally:
        started.kill()
    assert started.returncode == 0, out[-3000:]
    assert f"stopped at step 10/30 ({other / 'STOP'} exists)" in out
    assert (other / "checkpoints" / "step-00000010" / "manifest.json").is_file() and not (other / "STOP").exists()


def test_sigterm_to_the_launcher_stops_cleanly_and_status_json_says_so(tmp_path):
    """torchrun exits 1 with a traceback when it gets SIGTERM, however cleanly its workers stopped:
    status.json is how a script tells a clean stop (docs/reliability.md)."""
    run_dir = tmp_path / "run"
    args = ["data.fake_size=1024", "train.epochs=1", "ckpt.every_steps=8", "ckpt.keep=50", *QUIET]
    proc = subprocess.Popen(
        launch_command(smoke_args(run_dir, *args), processes=2),
        env=trainer_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for(run_dir / "checkpoints" / "step-00000008", proc, timeout=180)
        assert json.loads((run_dir / "status.json").read_text())["state"] == "running"
        proc.send_signal(signal.SIGTERM)  # the launcher only: it forwards SIGTERM to the workers
        out, _ = proc.communicate(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the launch
        except ProcessLookupError:
            pass
    assert proc.returncode == 1 and "SignalException" in out, out[-3000:]  # torchrun's, as documented
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["exit_code"], status["reason"]) == ("stopped", 0, "SIGTERM"), status
    step = status["step"]
    assert step % 10 == 0 and 0 < step < 64 and f"stopped at step {step}/64" in out
    assert status["checkpoint"] == str(run_dir / "checkpoints" / f"step-{step:08d}")
    assert (run_dir / "checkpoints" / f"step-{step:08d}" / "manifest.json").is_file()


def test_a_read_only_run_directory_is_a_one_line_error(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(run_dir), str(run_dir)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only directory here (needs root): {mounted.stderr.decode().strip()}")
    try:
        proc = run_trainer(smoke_args(run_dir, "train.max_steps=2", *QUIET), check=False)
    finally:
        subprocess.run(["umount", str(run_dir)], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert f"cannot write in the run directory {run_dir} (Read-only file system)" in line and "run.dir=" in line


def test_a_checkpoint_named_for_another_step_is_set_aside_not_resumed(tmp_path):
    """A copy renamed by hand used to be chosen by its name, resumed at its real step, and then block
    the save of the step it was named for ("step-00000030 already exists") at every later start."""
    run_dir = tmp_path / "run"
    run_trainer(smoke_args(run_dir, "train.max_steps=20", "ckpt.keep=5", *QUIET))
    checkpoints = run_dir / "checkpoints"
    shutil.copytree(checkpoints / "step-00000010", checkpoints / "step-00000030")
    proc = run_trainer(smoke_args(run_dir, "train.epochs=3", "train.max_steps=40", "ckpt.keep=5", *QUIET))
    assert "step-00000030 is named for another step: its manifest is of step 10" in proc.stderr
    assert f"resumed from {checkpoints / 'step-00000020'} (step 20" in proc.stdout
    assert "finished at step 40/40" in proc.stdout
    aside = checkpoints / "step-00000030.misnamed"
    assert json.loads((aside / "train_state.json").read_text())["step"] == 10  # kept, never deleted
    assert json.loads((checkpoints / "step-00000030" / "train_state.json").read_text())["step"] == 30


def test_after_a_rollback_metrics_jsonl_holds_each_step_once(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_with_faults(
        smoke_args(run_dir, "train.on_nonfinite=rollback", "ckpt.keep=5", "log.every_steps=1", *QUIET),
        check=True,
        FAULT_NAN_AT_STEP="13:generator",
    )
    assert "rolled back to" in proc.stdout and "finished at step 32/32" in proc.stdout
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(1, 33))  # the replay's rows, each once
    replaced = [json.loads(line)["step"] for line in (run_dir / "metrics.replaced.jsonl").read_text().splitlines()]
    assert replaced[0] == 11 and replaced == sorted(replaced)  # the diverged stretch, kept aside
    assert all(r["loss_D"] == r["loss_D"] for r in read_metrics(run_dir))  # no NaN row left in the record


def test_sixteen_bit_and_transparent_images_are_converted_not_clipped(tmp_path):
    """PIL's convert("RGB") clips 16-bit grey at 255 (mid-grey turns white) and drops alpha silently."""
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(root / "grey16.png")  # mid-grey, 16 bits
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[:4, :, 3] = 255, 255  # red; the bottom half fully transparent
    Image.fromarray(rgba).save(root / "half_transparent.png")
    files = sorted(root.iterdir())

    through_loader = data.ImageFiles(root, data.pil_to_uint8(8))
    out = packed.pack_files(files, 8, tmp_path / "pack.npy")
    through_pack = np.load(tmp_path / "pack.npy")
    for images in ([through_loader[i].numpy() for i in range(2)], list(through_pack)):
        grey, half = images
        assert (grey == 128).all()  # 32768 / 257, not 255
        assert (half[:, :4] == np.array([255, 0, 0])[:, None, None]).all()  # opaque red stays red
        assert (half[:, 4:] == 0).all()  # transparent: onto black, not the hidden red
    assert out["alpha"] == [str(root / "half_transparent.png")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data.prepare_data(
            load_config(None, ["data.source=folder", f"data.root={root}", "data.packed=false"]).data, 8, 0
        )
    assert any("1 of 2 images have an alpha channel" in str(w.message) for w in caught)
