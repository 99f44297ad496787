"""Evaluation during training, the EMA generator across a resume, and the evaluate / sample tools,
through the real entry points (one and two processes, on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import REPO, launch_command, read_metrics, run_command, run_trainer, smoke_args, trainer_env
from trainer.core.checkpoint import EMA_FILE
from trainer.evaluate import main as evaluate_main
from trainer.quality import fid
from trainer.sample import main as sample_main

pytestmark = pytest.mark.slow

STANDIN = "tests.standin_extractor:StandInExtractor"


def eval_overrides(cache: Path) -> list[str]:
    return [
        f"eval.feature_extractor={STANDIN}",
        f"eval.cache_dir={cache}",
        "eval.num_samples=200",
        "eval.batch_size=48",
        "eval.kid_subset_size=100",
        "eval.kid_subsets=20",
    ]


def run_module(module: str, args: list[str], processes: int = 1, env: dict | None = None, check: bool = True):
    """`python -m <module> args`, or `accelerate launch <options> -m <module> args` for several processes."""
    if processes == 1:
        command = [sys.executable, "-m", module, *args]
    else:  # launch_command puts its script argument where `-m` belongs
        command = launch_command([module, *args], processes, script=Path("-m"))
    proc = run_command(command, {**trainer_env(), **(env or {})}, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Three epochs of the smoke run with the EMA generator on and an evaluation every epoch."""
    root = tmp_path_factory.mktemp("trained")
    run_dir = root / "run"
    proc = run_trainer(
        smoke_args(
            run_dir,
            "train.epochs=3",
            "ckpt.keep=1",
            "train.ema_decay=0.9",
            "eval.every_epochs=1",
            "log.tracker=none",
            *eval_overrides(root / "cache"),
        )
    )
    (run_dir / "train.log").write_text(proc.stdout)
    return run_dir


def test_training_evaluates_every_epoch_and_keeps_the_best_checkpoint(trained):
    evals = [m for m in read_metrics(trained) if "fid" in m]
    assert [m["step"] for m in evals] == [16, 32, 48]
    assert all(m["eval_weights"] == "ema" and m["eval_num_samples"] == 200 for m in evals)
    assert all(m["fid"] > 0 and m["is_mean"] >= 1 for m in evals)
    log = (trained / "train.log").read_text()
    assert log.count("eval step") == 3 and "reference statistics: 256 real images" in log

    best = min(evals, key=lambda m: m["fid"])
    record = json.loads((trained / "checkpoints" / "best.json").read_text())
    assert record["checkpoint"] == f"step-{best['step']:08d}" and record["fid"] == best["fid"]
    # ckpt.keep=1: the newest checkpoint, and the best one if it is another
    assert {p.name for p in (trained / "checkpoints").glob("step-*")} == {"step-00000048", record["checkpoint"]}
    assert (trained / "generator_ema.safetensors").is_file()
    assert (trained / "checkpoints" / "step-00000048" / EMA_FILE).is_file()


def test_evaluate_tool_two_processes_equal_one_process(trained, tmp_path, capsys):
    one = tmp_path / "one.json"
    two = tmp_path / "two.json"
    # Fresh caches: the two-process run also computes the real statistics with two processes.
    proc = run_module("trainer.evaluate", [str(trained), "--out", str(one), *eval_overrides(tmp_path / "c1")])
    run_module("trainer.evaluate", [str(trained), "--out", str(two), *eval_overrides(tmp_path / "c2")], processes=2)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["processes"] == 1 and b["processes"] == 2 and a["weights"] == "ema" and a["step"] == 48
    scores = ("fid", "is_mean", "is_std", "kid_mean", "kid_std", "num_samples", "num_real")
    assert {k: a["metrics"][k] for k in scores} == {k: b["metrics"][k] for k in scores}
    with np.load(a["reference"]) as ra, np.load(b["reference"]) as rb:
        assert all(np.array_equal(ra[k], rb[k]) for k in ("mu", "sigma", "kid_features"))
    # The final in-training evaluation scored the same weights on the same latents.
    assert a["metrics"]["fid"] == [m for m in read_metrics(trained) if "fid" in m][-1]["fid"]
    assert "| FID |" in proc.stdout and one.with_suffix(".md").read_text().count("|") > 10

    assert evaluate_main([str(trained), "--out", str(one)]) == 2  # an existing table is never replaced silently
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_missing_inception_weights_stop_evaluation_and_training_with_the_fix(trained, tmp_path):
    # No weights in this TORCH_HOME and no way out (a proxy on a closed port): the download fails.
    env = {
        "TORCH_HOME": str(tmp_path / "torch"),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
    }
    expected_file = tmp_path / "torch" / "hub" / "checkpoints" / fid.INCEPTION_FILE
    proc = run_module(
        "trainer.evaluate", [str(trained), f"eval.feature_extractor={fid.INCEPTION}"], env=env, check=False
    )
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: the InceptionV3 weights for FID/IS/KID are not here and cannot be downloaded")
    assert f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{fid.INCEPTION_FILE}" in line
    assert f"put it at {expected_file}" in line and "eval.feature_extractor_weights=" in line

    # Training with evaluation on stops before it writes anything.
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        launch_command(smoke_args(run_dir, "eval.every_epochs=1", "log.tracker=none")),
        cwd=REPO,
        env={**trainer_env(), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and fid.INCEPTION_FILE in proc.stderr and not run_dir.exists()


def test_ema_weights_survive_resume(tmp_path):
    common = ["train.ema_decay=0.8", "log.tracker=none"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_trainer(smoke_args(straight, "train.max_steps=24", *common))
    run_trainer(smoke_args(resumed, "train.max_steps=12", *common))
    proc = run_trainer(smoke_args(resumed, "train.max_steps=24", *common))
    assert "resumed from" in proc.stdout and "step 12" in proc.stdout

    checkpoint = resumed / "checkpoints" / "step-00000024"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert EMA_FILE in manifest["files"]  # checksummed with the rest of the checkpoint
    a, b = load_file(str(straight / EMA_FILE)), load_file(str(resumed / EMA_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    raw = load_file(str(resumed / "generator.safetensors"))
    assert not torch.equal(raw["main.0.weight"], b["main.0.weight"])  # the EMA is not a copy of G


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_sample_tool_writes_every_format(trained, tmp_path):
    # One run through the command line as the README shows it; the others call its main() directly.
    proc = run_module("trainer.sample", [str(trained), "--out", str(tmp_path / "grid.png"), "--seed", "3"])
    assert "wrote 64 samples (ema generator" in proc.stdout
    assert _png(tmp_path / "grid.png").shape == (8 * 34 + 2, 8 * 34 + 2, 3)  # 8x8 images of 32 px, 2 px padding

    assert sample_main([str(trained), "--out", str(tmp_path / "a.npz"), "--num", "10", "--seed", "3"]) == 0
    with np.load(tmp_path / "a.npz") as data:
        images = data["arr_0"]
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8

    assert sample_main([str(trained), "--out", str(tmp_path / "pngs"), "--num", "5", "--seed", "3"]) == 0
    files = sorted((tmp_path / "pngs").iterdir())
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(5)]
    assert all(np.array_equal(_png(f), images[i]) for i, f in enumerate(files))  # same seed, same images

    assert sample_main([str(trained), "--out", str(tmp_path / "b.npz"), "--num", "10", "--seed", "4"]) == 0
    assert sample_main([str(trained), "--out", str(tmp_path / "raw.npz"), "--num", "10", "--seed", "3", "--raw"]) == 0
    with np.load(tmp_path / "b.npz") as other, np.load(tmp_path / "raw.npz") as raw:
        assert not np.array_equal(other["arr_0"], images) and not np.array_equal(raw["arr_0"], images)

    args = [str(trained), "--interpolate", "6", "--num", "3", "--seed", "3"]
    assert sample_main([*args, "--out", str(tmp_path / "walk.png")]) == 0
    walk = _png(tmp_path / "walk.png")
    assert walk.shape == (3 * 34 + 2, 6 * 34 + 2, 3)  # a row per pair, a column per step
    assert np.array_equal(walk[2:34, 2:34], images[0])  # each walk starts at sample i of the seed
    assert sample_main([*args, "--out", str(tmp_path / "walk.gif")]) == 0
    with Image.open(tmp_path / "walk.gif") as gif:
        assert gif.n_frames == 6 and gif.size == (3 * 34 + 2, 34 + 2)

    assert sample_main([str(trained), "--out", str(tmp_path / "a.npz")]) == 2  # never overwritten silently
    assert sample_main([str(trained), "--out", str(tmp_path / "x.gif")]) == 2  # a GIF needs --interpolate
    assert sample_main([str(trained), "--best", "--out", str(tmp_path / "best.png")]) == 0
    assert os.path.getsize(tmp_path / "best.png") > 0
