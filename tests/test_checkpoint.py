"""trainer/core/checkpoint.py: which checkpoint a run resumes from, what a resume refuses, the best
checkpoint, and clean stops that resume exactly.

First in process (a tiny prepared model, checkpoints saved at chosen steps: each branch of the
decisions in a fraction of a second), then through the real entry point in subprocesses (marked
`slow`). Faults around checkpoints (kills inside a write, a full disk, code in a pickle) are in
tests/test_reliability.py.
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn

from tests.conftest import run_trainer, smoke_args, start_trainer
from tests.test_training import _wait_for
from trainer.core.checkpoint import (
    BEST,
    MANIFEST,
    TRAIN_STATE,
    Checkpointer,
    TrainState,
    _check_compatible,
    _check_config_changes,
    _sha256,
    config_changes,
    verify,
)
from trainer.core.config import load_config, schema_keys, to_dict, to_yaml
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


# ---- resume decisions, in process --------------------------------------------------------------------
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


def test_resuming_into_fp16_from_another_precision_names_both(tmp_path):
    checkpoint = tmp_path / "step-00000010"
    checkpoint.mkdir()
    cfg = load_config(None, ["data.source=fake", "train.mixed_precision=fp16"])
    (checkpoint / "config.yaml").write_text(to_yaml(cfg))
    state = TrainState(step=10, global_batch=cfg.train.batch_size, precision="bf16")
    (checkpoint / "train_state.json").write_text(json.dumps(state.to_json()))
    with pytest.raises(CheckpointError, match="trained with precision bf16, and this run uses fp16"):
        _check_compatible(checkpoint, cfg, "fp16")
    _check_compatible(checkpoint, cfg, "no")  # bf16 -> fp32 resumes


def test_resume_compares_configs_refuses_trajectory_keys_and_lets_schedule_keys_change(tmp_path, capsys):
    saved = to_dict(load_config())
    free = load_config(None, ["train.epochs=50", "log.every_steps=10", "ckpt.keep=5", "eval.num_samples=50000"])
    assert [c[0] for c in config_changes(saved, free)] == [
        "train.epochs",
        "ckpt.keep",
        "log.every_steps",
        "eval.num_samples",
    ]
    _check_config_changes(tmp_path, saved, free)  # schedule, logging, checkpoints, evaluation: free
    assert "with config changes: train.epochs: 25 -> 50;" in capsys.readouterr().out

    for override in ("train.lr=1e-4", "data.root=elsewhere", "model.ngf=32", "train.mixed_precision=no", "run.seed=1"):
        with pytest.raises(CheckpointError, match="changes the training trajectory: " + override.split("=")[0]):
            _check_config_changes(tmp_path, saved, load_config(None, [override]))
    allowed = load_config(None, ["train.lr=1e-4", "run.resume_changes=allow"])
    _check_config_changes(tmp_path, saved, allowed)
    assert "(run.resume_changes=allow): train.lr: 0.0002 -> 0.0001" in capsys.readouterr().out
    # a config written before a key existed is not compared on that key
    older = OmegaConf.to_container(OmegaConf.create(saved))
    del older["log"]["wandb_artifacts"]
    assert config_changes(older, load_config(None, ["log.wandb_artifacts=best"])) == []
    # ... except a trajectory key: the older version trained as its default does (train.loss: bce)
    del older["train"]["loss"]
    assert config_changes(older, load_config(None, ["train.loss=bce"])) == []
    with pytest.raises(CheckpointError, match="changes the training trajectory: train.loss: 'bce' -> 'hinge'"):
        _check_config_changes(tmp_path, older, load_config(None, ["train.loss=hinge"]))
    fixed = {k.key for k in schema_keys() if k.fixed_on_resume}
    assert {"train.lr", "train.betas", "train.batch_size", "run.seed", "model.nz"} <= fixed
    assert not fixed & {"train.epochs", "train.max_steps", "data.num_workers", "data.cache_dir", "run.name"}


# ---- the best checkpoint, and what a save never does -------------------------------------------------
def test_best_checkpoint_survives_rotation_until_a_better_one_comes(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(nn.Linear(2, 2))
    cfg = load_config(None, ["data.source=fake", f"run.dir={tmp_path}"])
    checkpointer = Checkpointer(tmp_path, accelerator, keep=2)
    state = TrainState(global_batch=64)
    names = lambda: sorted(p.name for p in checkpointer.complete())  # noqa: E731

    for step, score in [(1, None), (2, 5.0), (3, 7.0), (4, float("nan")), (5, 6.0), (6, None)]:
        state.step = step
        checkpointer.save(state, cfg)
        if score is not None:
            kept = checkpointer.keep_if_best(state, cfg, score, {"weights": "raw"})
            assert kept == (step == 2)
    assert names() == ["step-00000002", "step-00000005", "step-00000006"]  # best kept beside the newest two
    assert checkpointer.best() == {"checkpoint": "step-00000002", "step": 2, "fid": 5.0, "weights": "raw"}

    state.step = 7  # a better FID at a step not yet checkpointed: saved, recorded, the old best let go
    assert checkpointer.keep_if_best(state, cfg, 4.0, {"weights": "raw"})
    assert names() == ["step-00000006", "step-00000007"] and checkpointer.best()["checkpoint"] == "step-00000007"
    assert not (tmp_path / "checkpoints" / f".tmp-{BEST}").exists()
    del model


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


# ---- through the entry point (subprocesses) ----------------------------------------------------------
LONG = ["data.fake_size=1024", "train.epochs=1", "ckpt.every_steps=8", "ckpt.keep=50", "log.every_steps=8"]


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
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


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused_and_nothing_is_touched(tmp_path):
    run_dir = tmp_path / "run"
    run_trainer(smoke_args(run_dir, "train.max_steps=10"))
    before = _snapshot(run_dir)
    proc = run_trainer(smoke_args(run_dir, "train.max_steps=20", "model.ngf=16"), check=False)
    assert proc.returncode == 2
    assert "model.ngf: checkpoint 8, this run 16" in proc.stderr
    assert _snapshot(run_dir) == before


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_never_refuses_a_directory_with_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    run_trainer(smoke_args(run_dir, "train.max_steps=10"))
    before = _snapshot(run_dir)
    proc = run_trainer(smoke_args(run_dir, "run.resume=never"), check=False)
    assert proc.returncode == 2 and "run.resume=never" in proc.stderr and "step-00000010" in proc.stderr
    assert _snapshot(run_dir) == before


@pytest.mark.slow
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


@pytest.mark.slow
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
