"""End-to-end runs of the real entry point on CPU: one process, two processes (gloo), kill and resume."""

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import REPO, read_metrics, run_trainer, smoke_args, start_trainer
from trainer.core.models import Generator

pytestmark = pytest.mark.slow


def _assert_run_outputs(run_dir: Path, final_step: int) -> None:
    assert (run_dir / "config.yaml").is_file()
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints[-1] == f"step-{final_step:08d}" and not any(n.startswith(".tmp") for n in checkpoints)
    samples = sorted(p.name for p in (run_dir / "samples").iterdir())
    assert "real.png" in samples and any(n.startswith("step_") for n in samples)
    with Image.open(run_dir / "samples" / samples[-1]) as grid:
        assert grid.size[0] > 32
    metrics = read_metrics(run_dir)
    assert metrics[-1]["step"] == final_step
    assert all(math.isfinite(m[k]) for m in metrics for k in ("loss_D", "loss_G", "D(x)", "D(G(z))_before"))


def test_one_process_fake_run_and_exported_generator(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_trainer(smoke_args(run_dir))  # 256 images / 16 = 16 steps/epoch, 2 epochs
    _assert_run_outputs(run_dir, 32)
    assert "finished at step 32/32" in proc.stdout
    assert {p.name for p in (run_dir / "samples").iterdir()} >= {"epoch_001.png", "epoch_002.png"}
    assert len(list((run_dir / "checkpoints").iterdir())) == 2  # ckpt.keep=2

    # The exported weights need no trainer: a plain Generator with the settings in the metadata.
    with safe_open(str(run_dir / "generator.safetensors"), "pt") as f:
        model = json.loads(f.metadata()["model"])
        assert f.metadata()["step"] == "32"
    g = Generator(model["nz"], model["ngf"], model["resolution"])
    g.load_state_dict(load_file(str(run_dir / "generator.safetensors")))
    assert g.eval()(torch.randn(2, model["nz"])).shape == (2, 3, 32, 32)


def test_one_process_folder_run(tmp_path, image_tree):
    run_dir = tmp_path / "run"
    run_trainer(
        smoke_args(
            run_dir,
            "data.source=folder",
            f"data.root={image_tree}",
            "train.batch_size=8",
            "train.epochs=2",
            "train.mixed_precision=bf16",
        )
    )
    _assert_run_outputs(run_dir, 10)  # 40 images / 8 = 5 steps/epoch


def test_rerun_of_finished_run_resumes_and_trains_no_more(tmp_path):
    run_dir = tmp_path / "run"
    run_trainer(smoke_args(run_dir, "train.max_steps=12"))
    proc = run_trainer(smoke_args(run_dir, "train.max_steps=12"))
    assert "resumed from" in proc.stdout and "finished at step 12/12" in proc.stdout
    assert [m["step"] for m in read_metrics(run_dir)] == [5, 10, 12]
    proc = run_trainer(smoke_args(run_dir, "train.max_steps=20"))  # extend the run
    assert "finished at step 20/20" in proc.stdout


def test_two_processes_shard_disjointly_and_cover_each_epoch(tmp_path):
    script = REPO / "tests" / "dist" / "check_sharding.py"
    run_trainer([str(tmp_path), "96", "16"], processes=2, script=script)
    (tmp_path / "single").mkdir()
    run_trainer([str(tmp_path / "single"), "96", "16"], processes=1, script=script)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = json.loads((tmp_path / "single" / "rank0.json").read_text())
    for epoch in ("epoch0", "epoch1"):
        shards = [[i for batch in rank[epoch] for i in batch] for rank in ranks]
        assert all(len(b) == 8 for rank in ranks for b in rank[epoch])  # 16 global = 8 per rank
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(96))
    assert ranks[0]["epoch0"] != ranks[0]["epoch1"]  # reshuffled every epoch
    for rank in ranks:  # a resume two steps into epoch 1 sees the rest of the same order
        assert rank["epoch1_skip2"] == rank["epoch1"][2:]
    # split_batches: each global batch is the same as with one process, whatever the process count
    for step, global_batch in enumerate(single["epoch0"]):
        assert ranks[0]["epoch0"][step] + ranks[1]["epoch0"][step] == global_batch


def test_two_process_training_keeps_ranks_identical(tmp_path):
    run_dir = tmp_path / "run"
    script = REPO / "tests" / "dist" / "train_and_dump.py"
    proc = run_trainer(smoke_args(run_dir, "train.max_steps=20"), processes=2, script=script)
    assert "8 per process x 2" in proc.stdout
    assert proc.stdout.count("finished at step 20/20") == 1  # only rank 0 prints
    _assert_run_outputs(run_dir, 20)
    for model in (0, 1):  # G and D
        a = load_file(str(run_dir / f"rank0_{model}.safetensors"))
        b = load_file(str(run_dir / f"rank1_{model}.safetensors"))
        params = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert params and all(torch.equal(a[k], b[k]) for k in params), f"model {model} differs across ranks"
        # BatchNorm running statistics are per rank (DDP with broadcast_buffers=False, no SyncBatchNorm on
        # CPU); rank 0's are the ones checkpointed and exported.
        assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("running_mean"))


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"trainer exited early: {proc.stdout.read()}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    """Bitwise equality: on CPU in fp32 the kernels are deterministic for a fixed thread count, the
    data order comes from (run.seed, epoch), each step's noise from (run.seed, rank, step), and
    weights, optimizer moments and BatchNorm statistics are restored exactly from safetensors."""
    args = ["data.fake_size=1024", "train.epochs=2", "ckpt.every_steps=8", "ckpt.keep=50", "log.every_steps=8"]
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    run_trainer(smoke_args(reference, *args))

    proc = start_trainer(smoke_args(crashed, *args))
    try:
        _wait_for(crashed / "checkpoints" / "step-00000016", proc, timeout=120)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    newest = sorted((crashed / "checkpoints").glob("step-*"))[-1]
    resumed_step = int(newest.name.split("-")[1])
    assert 16 <= resumed_step < 64, "the kill should land inside epoch 0 (64 steps)"

    out = run_trainer(smoke_args(crashed, *args)).stdout
    assert f"resumed from {newest} (step {resumed_step}, epoch 0, {resumed_step} steps into it)" in out
    for name in ("generator.safetensors", "discriminator.safetensors"):
        a, b = load_file(str(reference / name)), load_file(str(crashed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
