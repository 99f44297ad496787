"""Checkpoints a person can read: what each file holds, run-root weights that are the newest
checkpoint's (a crash included), and `python -m trainer.export` for any checkpoint."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import smoke_args, start_trainer
from tests.test_training import _wait_for
from trainer.core.checkpoint import complete_checkpoints
from trainer.export import main as export_main

pytestmark = pytest.mark.slow


def _step_and_tensors(path: Path) -> tuple[int, dict[str, torch.Tensor]]:
    with safe_open(str(path), "pt") as fh:
        step = int(fh.metadata()["step"])
        assert json.loads(fh.metadata()["model"])["ngf"] == 8
    return step, load_file(str(path))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_run_root_holds_the_newest_checkpoint_s_weights_even_after_a_kill_and_export_reads_any(tmp_path):
    run_dir = tmp_path / "run"
    args = ["data.fake_size=2048", "train.epochs=1", "train.ema_decay=0.9", "ckpt.every_steps=10", "ckpt.keep=3"]
    proc = start_trainer(smoke_args(run_dir, *args, "log.tracker=none"))  # one process: proc is the trainer
    try:
        _wait_for(run_dir / "checkpoints" / "step-00000030", proc, timeout=180)
        # Freeze the run where no checkpoint is between its publication and the refresh of the run
        # root's files (a moment, documented), then kill it: no clean end, no end-of-run export.
        for _ in range(50):
            proc.send_signal(signal.SIGSTOP)
            newest = complete_checkpoints(run_dir / "checkpoints")[-1]
            last = run_dir / "discriminator.safetensors"  # refreshed last, after G and its EMA
            if last.is_file() and _step_and_tensors(last)[0] == int(newest.name.split("-")[1]):
                break
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    newest = complete_checkpoints(run_dir / "checkpoints")[-1]
    manifest = json.loads((newest / "manifest.json").read_text())["files"]
    assert manifest["model.safetensors"]["holds"].startswith("G (generator)")
    assert manifest["model_1.safetensors"]["holds"].startswith("D (discriminator)")
    assert manifest["generator_ema.safetensors"]["holds"].startswith("EMA of G")
    step = json.loads((newest / "train_state.json").read_text())["step"]
    pairs = {
        "generator.safetensors": "model.safetensors",
        "generator_ema.safetensors": "generator_ema.safetensors",
        "discriminator.safetensors": "model_1.safetensors",
    }
    for exported, inside in pairs.items():
        root_step, tensors = _step_and_tensors(run_dir / exported)
        assert root_step == step and _same(tensors, load_file(str(newest / inside))), exported

    # Any checkpoint, by hand: the oldest one kept
    oldest = complete_checkpoints(run_dir / "checkpoints")[0]
    out = tmp_path / "exported"
    assert export_main([str(oldest), "--out", str(out)]) == 0
    oldest_step = json.loads((oldest / "train_state.json").read_text())["step"]
    for exported, inside in pairs.items():
        exported_step, tensors = _step_and_tensors(out / exported)
        assert exported_step == oldest_step < step and _same(tensors, load_file(str(oldest / inside))), exported
    assert export_main([str(run_dir), "--out", str(out)]) == 2  # never overwrites without being asked
    assert export_main([str(run_dir), "--out", str(out), "--overwrite"]) == 0
    assert _step_and_tensors(out / "generator.safetensors")[0] == step
