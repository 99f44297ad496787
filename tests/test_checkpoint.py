"""Checkpoint decisions in process: which checkpoint a run resumes from, what it refuses, and the best one.

The end-to-end versions (through the entry point, in subprocesses) are in tests/test_resume.py; these
cover the branches those leave out and run in a fraction of a second each.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from accelerate import Accelerator
from torch import nn

from trainer.core.checkpoint import BEST, MANIFEST, TRAIN_STATE, Checkpointer, TrainState, _sha256, verify
from trainer.core.config import load_config
from trainer.util.errors import CheckpointError


class Run:
    """A run directory with a tiny prepared model, and checkpoints saved at chosen steps."""

    def __init__(self, run_dir: Path, batch_size: int = 64) -> None:
        self.accelerator = Accelerator(cpu=True)  # a fresh one per test keeps save hooks and models apart
        self.model = self.accelerator.prepare(nn.Linear(2, 2))
        self.cfg = load_config(None, ["data.source=fake", f"run.dir={run_dir}", f"train.batch_size={batch_size}"])
        self.checkpointer = Checkpointer(run_dir, self.accelerator, keep=10)
        self.state = TrainState(global_batch=batch_size)

    def save(self, *steps: int) -> list[Path]:
        paths = []
        for step in steps:
            self.state.step = step
            paths.append(self.checkpointer.save(self.state, self.cfg))
        return paths

    def names(self) -> list[str]:
        return sorted(p.name for p in self.checkpointer.dir.iterdir())

    def resume(self, resume: str, **overrides: str) -> Path | None:
        cfg = load_config(None, [f"{k}={v}" for k, v in {**_cfg_items(self.cfg), **overrides}.items()])
        return self.checkpointer.find_resume_point(resume, cfg)


def _cfg_items(cfg) -> dict[str, str]:
    return {"data.source": "fake", "run.dir": cfg.run.dir, "train.batch_size": str(cfg.train.batch_size)}


def _flip_a_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def _truncate(file: Path) -> int:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    return len(data)


# ---- resume decisions ------------------------------------------------------------------------------


def test_auto_resume_picks_the_newest_and_starts_fresh_without_checkpoints(tmp_path):
    run = Run(tmp_path)
    assert run.resume("auto") is None and run.resume("never") is None
    run.save(2, 4, 10)  # step-00000010 sorts after step-00000004 by number, not by text length
    assert run.resume("auto") == run.checkpointer.dir / "step-00000010"


def test_resume_with_another_global_batch_is_refused(tmp_path):
    run = Run(tmp_path, batch_size=64)
    run.save(3)
    before = run.names()
    with pytest.raises(CheckpointError) as info:
        run.resume("auto", **{"train.batch_size": "32"})
    message = str(info.value)
    assert "train.batch_size=64" in message and "this run has 32" in message and "same global batch" in message
    assert run.names() == before


def test_a_truncated_file_is_found_and_the_previous_checkpoint_used(tmp_path):
    run = Run(tmp_path)
    older, newer = run.save(2, 4)
    size = _truncate(newer / "model.safetensors")
    assert verify(newer) == f"model.safetensors has {size // 2} bytes, expected {size}"
    with pytest.warns(UserWarning, match="step-00000004 is damaged"):
        assert run.resume("auto") == older
    assert run.names() == ["step-00000002", "step-00000004.damaged"]  # set aside, never deleted


def test_every_checkpoint_damaged_stops_and_changes_nothing(tmp_path):
    run = Run(tmp_path)
    first, second = run.save(2, 4)
    _truncate(first / "random_states_0.pkl")
    _flip_a_byte(second / "model.safetensors")
    before = run.names()
    with pytest.raises(CheckpointError) as info:
        run.resume("auto")
    message = str(info.value)
    assert "every checkpoint" in message and "nothing was changed" in message
    assert "step-00000004: model.safetensors does not match its checksum" in message
    assert "step-00000002: random_states_0.pkl has" in message
    assert run.names() == before  # nothing renamed: the user decides what to restore


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("no_manifest", "no manifest.json (an interrupted save?)"),
        ("interrupted", "no manifest.json (an interrupted save?)"),
        ("bad_manifest", "manifest.json is unreadable"),
        ("missing_file", "train_state.json is missing"),
        ("truncated", "model.safetensors has"),
    ],
)
def test_explicit_resume_of_an_incomplete_checkpoint_is_refused(tmp_path, damage, reason):
    run = Run(tmp_path / "run")
    [path] = run.save(5)
    if damage == "no_manifest":
        (path / MANIFEST).unlink()
    elif damage == "interrupted":  # what a crash mid-save leaves: a .tmp directory without a manifest
        path = path.rename(path.with_name(f".tmp-{path.name}"))
        (path / MANIFEST).unlink()
    elif damage == "bad_manifest":
        (path / MANIFEST).write_text("{not json")
    elif damage == "missing_file":
        (path / TRAIN_STATE).unlink()
    else:
        _truncate(path / "model.safetensors")
    branch = Run(tmp_path / "branch")
    with pytest.raises(CheckpointError) as info:
        branch.resume(str(path))
    assert f"run.resume='{path}' is not a complete checkpoint: {reason}" in str(info.value)
    assert not branch.checkpointer.dir.exists()


def test_explicit_resume_of_the_newest_checkpoint_in_place_is_allowed(tmp_path):
    run = Run(tmp_path)
    _, newest = run.save(2, 4)
    assert run.resume(str(newest)) == newest


def test_resume_never_refuses_existing_checkpoints(tmp_path):
    run = Run(tmp_path)
    run.save(2)
    with pytest.raises(CheckpointError, match="run.resume=never but .* holds checkpoints \\(newest step-00000002\\)"):
        run.resume("never")


def test_explicit_resume_of_an_older_checkpoint_in_place_is_refused_and_elsewhere_allowed(tmp_path):
    run = Run(tmp_path / "run")
    older, _ = run.save(2, 4)
    with pytest.raises(CheckpointError, match="is older than step-00000004 in the same run"):
        run.resume(str(older))
    assert Run(tmp_path / "branch").resume(str(older)) == older  # a new run.dir branches from it


def test_resume_with_another_model_is_refused(tmp_path):
    run = Run(tmp_path)
    run.save(2)
    with pytest.raises(CheckpointError, match="model.ngf: checkpoint 64, this run 32"):
        run.resume("auto", **{"model.ngf": "32"})


def test_a_train_state_of_another_format_is_refused(tmp_path):
    run = Run(tmp_path)
    [path] = run.save(2)
    state = json.loads((path / TRAIN_STATE).read_text())
    (path / TRAIN_STATE).write_text(json.dumps({**state, "format_version": 2}))
    manifest = json.loads((path / MANIFEST).read_text())  # a well-formed checkpoint of a future version
    manifest["files"][TRAIN_STATE] = {
        "size": (path / TRAIN_STATE).stat().st_size,
        "sha256": _sha256(path / TRAIN_STATE),
    }
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="train-state format 2; this trainer reads 1"):
        run.resume("auto")


def test_loading_restores_the_state_and_the_loaded_step_is_not_saved_again(tmp_path):
    """A rerun of a finished run resumes at its last step: the final save must not rewrite that checkpoint."""
    run = Run(tmp_path)
    run.state.epoch, run.state.step_in_epoch, run.state.rollbacks = 3, 7, 1
    [path] = run.save(20)
    written = (path / MANIFEST).stat().st_mtime_ns
    fresh = Run(tmp_path)
    state = fresh.checkpointer.load(path)
    assert (state.step, state.epoch, state.step_in_epoch, state.rollbacks, state.global_batch) == (20, 3, 7, 1, 64)
    assert fresh.checkpointer.save(state, fresh.cfg) == path
    assert fresh.names() == ["step-00000020"] and (path / MANIFEST).stat().st_mtime_ns == written


# ---- the best checkpoint ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_fid_never_becomes_best_and_later_finite_ones_are_kept(tmp_path, bad):
    run = Run(tmp_path)
    run.state.step = 2
    assert not run.checkpointer.keep_if_best(run.state, run.cfg, bad, {"weights": "raw"})
    assert run.checkpointer.best() is None and not (run.checkpointer.dir / BEST).exists()
    run.state.step = 4
    assert run.checkpointer.keep_if_best(run.state, run.cfg, 80.0, {"weights": "raw"})
    run.state.step = 6
    assert not run.checkpointer.keep_if_best(run.state, run.cfg, bad, {"weights": "raw"})
    assert run.checkpointer.best() == {"checkpoint": "step-00000004", "step": 4, "fid": 80.0, "weights": "raw"}


@pytest.mark.parametrize("old_fid", ["NaN", "Infinity", "null", '"n/a"'])
def test_a_best_record_without_a_finite_fid_does_not_block_later_ones(tmp_path, old_fid):
    """An older version wrote NaN FIDs into best.json (json.dumps writes them as NaN): `fid < nan` is
    always false, so every later finite FID was refused and the NaN checkpoint was kept forever."""
    run = Run(tmp_path)
    run.save(2)
    (run.checkpointer.dir / BEST).write_text(f'{{"checkpoint": "step-00000002", "step": 2, "fid": {old_fid}}}')
    run.state.step = 4
    assert run.checkpointer.keep_if_best(run.state, run.cfg, 120.0, {"weights": "ema"})
    assert json.loads((run.checkpointer.dir / BEST).read_text())["fid"] == 120.0
    run.state.step = 6
    assert not run.checkpointer.keep_if_best(run.state, run.cfg, 130.0, {"weights": "ema"})  # worse: not kept
    assert run.checkpointer.keep_if_best(run.state, run.cfg, 110.0, {"weights": "ema"})
    assert run.checkpointer.best()["checkpoint"] == "step-00000006"


def test_a_save_never_replaces_a_complete_checkpoint(tmp_path):
    """The former `.superseded` copies: a second writer of the same step stops instead (the run lock
    makes this unreachable, so reaching it is a bug to report, not a pile of copies to leave)."""
    from trainer.util.errors import CheckpointWriteError

    run = Run(tmp_path)
    (existing,) = run.save(10)
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    other = Run(tmp_path)  # another writer: it has not saved step 10 itself
    other.state.step = 10
    with pytest.raises(CheckpointWriteError, match="step-00000010"):
        other.checkpointer.save(other.state, other.cfg)
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before
    assert run.names() == ["step-00000010"]  # no copy, no temporary directory left
