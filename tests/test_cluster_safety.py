"""What a CUDA / NCCL / shared-filesystem cluster run would hit, reproduced on CPU (issue: cluster-scale correctness).

- one-time preparation happens outside collectives, so a short process-group timeout survives it;
- a failed preparation stops every rank within seconds, with the reason;
- fp16 skipped steps are counted with a fused optimizer;
- two launches sharing one cache directory build one pack and train alike;
- the main process decides and every rank gets the answer or the error;
- precision `auto`, compile modes, small per-rank batches, TF32 in evaluation.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from tests.conftest import REPO, SMOKE, run_trainer, smoke_args, trainer_env, write_image_tree
from tools.gpu_check.checks import free_port
from trainer.core import runtime
from trainer.core.checkpoint import TrainState, _check_compatible
from trainer.core.config import load_config, to_yaml
from trainer.core.models import Discriminator, Generator
from trainer.core.step import GANStep
from trainer.quality import fid
from trainer.util.errors import CheckpointError, ConfigError

FAULTS = REPO / "tests" / "faults" / "run_with_faults.py"
RANKS = REPO / "tests" / "dist" / "check_ranks.py"


def _packs(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.rglob("*.npy"))


# ---- preparation outside collectives ---------------------------------------------------------------
@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_failed_preparation_ends_every_rank_within_seconds_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("FAULT_PREPARE_FAILS", "1")
    start = time.monotonic()
    proc = run_trainer(smoke_args(tmp_path / "run"), processes=2, script=FAULTS, check=False, timeout=120)
    took = time.monotonic() - start
    assert proc.returncode != 0
    assert "error: injected: the dataset is broken" in proc.stderr
    assert took < 30, f"the launch took {took:.0f}s to end"  # start-up included; the failure itself spreads in ~1 s
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_main_decides_shares_answers_and_errors_across_ranks():
    """tests/dist/check_ranks.py asserts, on both ranks, that each rank got the main process's answer or error."""
    proc = run_trainer([], processes=2, script=RANKS, timeout=120)
    assert proc.stdout.count("ranks ok") == 2, proc.stdout + proc.stderr


# ---- one pack for a job on a shared filesystem ----------------------------------------------------------
@pytest.mark.slow
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


# ---- fp16 skipped steps with a fused optimizer --------------------------------------------------------
def _fp16_step(fused: bool) -> tuple[GANStep, torch.amp.GradScaler]:
    accelerator = Accelerator(cpu=True)
    # What Accelerate builds for fp16 on a GPU, on the CPU.
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1_000_000)
    torch.manual_seed(0)
    g, d = Generator(8, 8, 16), Discriminator(8, 16)
    for net in (g, d):  # forced non-finite gradients, as an fp16 overflow gives
        next(net.parameters()).register_hook(lambda grad: grad * float("inf"))
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, fused=fused)
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, fused=fused)
    g, d, opt_g, opt_d = accelerator.prepare(g, d, opt_g, opt_d)
    return GANStep(accelerator, g, d, opt_g, opt_d, nz=8, run_seed=0), accelerator.scaler


@pytest.mark.parametrize("fused", [True, False])
def test_fp16_skipped_steps_are_counted_with_fused_and_plain_adam(fused):
    """With fused Adam the scaler always calls optimizer.step() (the optimizer skips internally), so
    Accelerate's step_was_skipped stays False; the step counts skips from the scale instead."""
    step, scaler = _fp16_step(fused)
    real = torch.rand(4, 3, 16, 16) * 2 - 1
    for i in range(5):
        step(real, i)
    halvings = round(math.log2(2.0**16 / scaler.get_scale()))
    skipped = step.skipped.tolist()
    assert sum(skipped) == halvings > 0
    assert skipped == [5, 5]  # every D and every G step overflowed
    if fused:  # what the loop used to read: a fused optimizer is always called, so nothing looks skipped
        assert not step.opt_d.step_was_skipped and not step.opt_g.step_was_skipped


# ---- precision, compile modes, small batches --------------------------------------------------------------
def test_precision_auto_picks_per_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "cpu_has_amx", lambda: False)
    assert runtime.resolve_precision("auto") == "no"  # CPU bf16 without AMX is slower than fp32
    monkeypatch.setattr(runtime, "cpu_has_amx", lambda: True)
    assert runtime.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert runtime.resolve_precision("auto") == "fp16"  # V100: no bf16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert runtime.resolve_precision("auto") == "bf16"
    assert runtime.resolve_precision("no") == "no"  # an explicit choice stays


def test_resuming_into_fp16_from_another_precision_names_both(tmp_path):
    checkpoint = tmp_path / "step-00000010"
    checkpoint.mkdir()
    cfg = load_config(None, ["data.source=fake", "train.mixed_precision=fp16"])
    (checkpoint / "config.yaml").write_text(to_yaml(cfg))
    state = TrainState(step=10, global_batch=cfg.train.batch_size, precision="bf16")
    (checkpoint / "train_state.json").write_text(__import__("json").dumps(state.to_json()))
    with pytest.raises(CheckpointError, match="trained with precision bf16, and this run uses fp16"):
        _check_compatible(checkpoint, cfg, "fp16")
    _check_compatible(checkpoint, cfg, "no")  # bf16 -> fp32 resumes


def _fake_accelerator(processes: int, device: str = "cpu") -> types.SimpleNamespace:
    return types.SimpleNamespace(
        num_processes=processes, device=torch.device(device), mixed_precision="no", is_main_process=True
    )


def test_cuda_graph_compile_modes_are_refused_for_several_processes():
    cfg = load_config(str(SMOKE), ["train.compile=true", "train.compile_mode=reduce-overhead"])
    with pytest.raises(ConfigError, match="compile_mode=reduce-overhead is not supported with 2 processes"):
        runtime.check_against_hardware(cfg, _fake_accelerator(2))
    runtime.check_against_hardware(cfg, _fake_accelerator(1))  # one process may try them


def test_tiny_per_rank_batches_without_sync_bn_warn_once():
    cfg = load_config(str(SMOKE), ["train.batch_size=32"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime.check_against_hardware(cfg, _fake_accelerator(8))  # 4 images per rank, per-rank BatchNorm
        runtime.check_against_hardware(cfg, _fake_accelerator(2))  # 16 per rank: fine
    assert [str(w.message).split(";")[0] for w in caught] == [
        "each of the 8 processes normalises BatchNorm over its own 4 images (no SyncBatchNorm on cpu)"
    ]


# ---- evaluation -----------------------------------------------------------------------------------------
def test_features_are_taken_without_tf32_and_statistics_are_keyed_by_device(tmp_path):
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, images):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            return (images.float().flatten(1),)

        def convert_features_tuple_to_dict(self, features):
            return {"x": features[0]}

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        fid.extract(Probe(), torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
        assert seen == [(False, False)]
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    cfg = load_config(None, ["data.source=fake", "eval.feature_extractor=tests.standin_extractor:StandInExtractor"])
    cpu, gpu = (fid.reference_identity(cfg, None, torch.device(d)) for d in ("cpu", "cuda"))
    assert fid.reference_path(cfg, cpu) != fid.reference_path(cfg, gpu)


def test_weights_are_found_once_from_the_configured_file(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    assert fid.resolve_weights("tests.standin_extractor:StandInExtractor", str(weights)) == weights
    assert fid.resolve_weights("tests.standin_extractor:StandInExtractor", None) is None
