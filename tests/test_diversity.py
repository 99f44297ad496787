"""The `diversity` measure (trainer/monitor/diversity.py): what it says of real, noisy, trained-looking and
collapsed samples, the health watch's collapse warning, the loop's chart, and the GPU check's verdict."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from tests.conftest import read_metrics, run_trainer, smoke_args
from trainer.core.models import Generator, init_weights
from trainer.monitor.diversity import COLLAPSE_BELOW, CollapseWatch, pixel_diversity
from trainer.monitor.grids import fixed_noise, generate_grid


def blobs(count: int, seed: int) -> torch.Tensor:
    """Smooth random colour images in [-1, 1]: varied like real images, unlike each other."""
    coarse = torch.rand(count, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=32, mode="bilinear", align_corners=False)


def collapsed_generator() -> Generator:
    """A generator that ignores its latent: the first layer's weights are zero, so every latent gives the
    same image (what mode collapse is at its worst)."""
    torch.manual_seed(0)
    g = Generator(nz=16, ngf=8, resolution=32)
    g.apply(init_weights)
    with torch.no_grad():
        g.main[0].weight.zero_()
    return g.eval()


def test_the_measure_sees_collapse_and_not_contrast():
    real = blobs(64, seed=0)
    assert pixel_diversity(real) / pixel_diversity(blobs(64, seed=1)) == pytest.approx(1.0, abs=0.1)
    one = real[:1].expand(64, -1, -1, -1)
    assert pixel_diversity(one) == 0.0 and one.std() > 0.3  # one image with contrast: no diversity
    as_uint8 = ((real + 1) * 127.5).round().to(torch.uint8)
    assert pixel_diversity(as_uint8) == pytest.approx(pixel_diversity(real), rel=0.02)
    with pytest.raises(ValueError, match="at least 2"):
        pixel_diversity(real[:1])


def test_a_collapsed_generator_trips_the_warning_once_and_a_recovery_rearms_it():
    warnings: list[str] = []
    watch = CollapseWatch(blobs(64, seed=0), warnings.append, min_steps=1000)
    collapsed = generate_grid(collapsed_generator(), fixed_noise(64, 16, 0), contextlib.nullcontext)

    assert watch.observe(collapsed, step=10) < 0.01 and not warnings  # a uniform start is not a collapse
    assert watch.observe(blobs(64, seed=2), step=20) > COLLAPSE_BELOW  # diverse samples
    assert watch.observe(collapsed, step=30) < COLLAPSE_BELOW
    assert len(warnings) == 1 and "collapsed at step 30" in warnings[0] and "diversity is 0.00" in warnings[0]
    watch.observe(collapsed, step=40)
    assert len(warnings) == 1  # once per collapse
    watch.observe(blobs(64, seed=3), step=50)
    watch.observe(collapsed, step=60)
    assert len(warnings) == 2 and "step 60" in warnings[1]


def test_a_generator_that_never_becomes_diverse_is_reported_after_min_steps():
    warnings: list[str] = []
    watch = CollapseWatch(blobs(64, seed=0), warnings.append, min_steps=1000)
    collapsed = generate_grid(collapsed_generator(), fixed_noise(64, 16, 0), contextlib.nullcontext)
    watch.observe(collapsed, step=999)
    assert not warnings
    watch.observe(collapsed, step=1000)
    assert len(warnings) == 1 and "step 1000" in warnings[0]


def test_the_gpu_check_fails_collapsed_samples(tmp_path):
    from tools.gpu_check.checks import judge_diversity
    from tools.gpu_check.runner import CheckFailed, Context

    ctx = Context(
        name="full_run",
        device="cuda",
        tiny=False,
        repo=str(tmp_path),
        work=str(tmp_path),
        shared=str(tmp_path),
        out=str(tmp_path),
        logs=str(tmp_path),
        deadline=math.inf,
        result_path=str(tmp_path / "result.json"),
        max_file_bytes=2**20,
        max_files=8,
        env={},
    )
    samples = generate_grid(collapsed_generator(), torch.randn(1000, 16), contextlib.nullcontext)
    ratio = pixel_diversity(samples) / pixel_diversity(blobs(1000, seed=0))
    with pytest.raises(CheckFailed, match="collapsed"):
        judge_diversity(ctx, ratio, "the run's samples")
    judge_diversity(ctx, pixel_diversity(blobs(1000, seed=1)) / pixel_diversity(blobs(1000, seed=0)), "real images")
    assert ctx.figures["diversity_judged"] is True and ctx.figures["diversity_threshold"] == COLLAPSE_BELOW


@pytest.mark.slow
def test_the_loop_logs_the_grids_diversity_at_every_log_step(tmp_path):
    run_dir = tmp_path / "run"
    run_trainer(smoke_args(run_dir, "train.max_steps=8", "log.every_steps=4", "log.tracker=none"))
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [4, 8]
    assert all(0 <= r["diversity"] < 2 for r in records)  # relative to real images: about 1 for real ones
