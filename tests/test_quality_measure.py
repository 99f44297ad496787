"""The offline quality measure (`cifar10-classifier`) and the sampling mode (`--bn-stats`).

No download and no real data: the classifier here is tiny, trained for seconds on images whose
colour is their class, or left at its seeded random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from tests.conftest import run_trainer, smoke_args
from tools import classifier as tool
from trainer.core.checkpoint import checkpoint_config, find_checkpoint, load_generator
from trainer.core.config import load_config
from trainer.core.models import Generator
from trainer.evaluate import main as evaluate_main
from trainer.quality import classifier as cf
from trainer.quality import fid
from trainer.sample import generate
from trainer.sample import main as sample_main
from trainer.util.errors import EvaluationError

TINY = cf.Recipe(widths=(4, 8, 8, 8), epochs=3, batch_size=16, lr=0.05, warmup_epochs=1.0, precision="no")


def _coloured(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 32x32 images whose mean colour encodes the class (10 classes), plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 10
    palette = torch.rand(10, 3, 1, 1, generator=g) * 200 + 20
    images = palette[labels] + 20 * torch.randn(count, 3, 32, 32, generator=g)
    return images.round().clamp(0, 255).to(torch.uint8), labels


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """A tiny classifier, saved as `train` saves one (its widths in the metadata)."""
    torch.manual_seed(0)
    network = cf.SmallConvNet(TINY.widths)
    path = tmp_path_factory.mktemp("classifier") / "tiny.safetensors"
    tool.save_weights(network, path, {"recipe": json.dumps({"arch": cf.ARCH_VERSION, **vars(TINY)})})
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Four steps of the smoke run: a checkpoint whose G has BatchNorm running statistics."""
    run = tmp_path_factory.mktemp("smoke") / "run"
    run_trainer(smoke_args(run, "train.max_steps=4", "log.tracker=none"))
    return run


# ---- the extractor --------------------------------------------------------------------------------
def test_classifier_trains_on_generated_images_and_round_trips_through_safetensors(tmp_path):
    torch.set_num_threads(1)
    train, test = _coloured(320, seed=0), _coloured(100, seed=0)  # same palette: the classes are learnable
    network = tool.train_classifier(train, TINY, log=lambda line: None)
    assert tool.accuracy(network, *test) > 0.5  # chance is 0.1
    path = tmp_path / "w.safetensors"
    tool.save_weights(network, path, {"recipe": json.dumps(vars(TINY))})
    again = cf.load_network(path)
    x = cf.to_input(test[0][:8])
    assert torch.equal(network(x)[1], again(x)[1])


def test_calibrate_tool_scores_real_blurred_and_noisy_images(tiny_weights, tmp_path):
    """`python -m tools.classifier calibrate` on a tiny CIFAR-10-shaped JPEG tree: one row per variant."""
    from PIL import Image

    for split, count in (("train", 3), ("test", 2)):
        images, labels = _coloured(10 * count, seed=2)
        for i, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
            folder = tmp_path / "cifar" / split / cf.CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    out = tmp_path / "calibration.md"
    args = ["calibrate", "--data", str(tmp_path / "cifar"), "--weights", str(tiny_weights), "--num", "20"]
    assert tool.main([*args, "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 9 and rows[0].startswith("| real train images (32x32) |")
    kid = {row.split(" | ")[0][2:]: float(row.split(" | ")[2]) for row in rows[:-1]}  # x 1000
    assert kid["uniform noise images"] > 10 * abs(kid["real train images (32x32)"])  # even an untrained net tells
    assert tool.main(["calibrate", "--data", str(tmp_path / "nowhere")]) == 2  # one line, exit 2


def test_extractor_is_registered_and_takes_uint8_images_of_any_size(tiny_weights):
    assert fid.layers_for(cf.NAME) == fid.Layers(fid="penultimate", isc="logits", kid="penultimate")
    path = fid.resolve_weights(cf.NAME, str(tiny_weights))
    assert path == tiny_weights
    extractor = fid.load_feature_extractor(cf.NAME, path)
    images = _coloured(6, seed=1)[0]
    small = fid.extract(extractor, images)
    assert small["penultimate"].shape == (6, 8) and small["logits"].shape == (6, 10)
    # Any size is resized to 32 inside: flat colours look the same at 32, 64 and 20 pixels.
    flat = torch.randint(0, 256, (6, 3, 1, 1), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    at32 = fid.extract(extractor, flat.expand(6, 3, 32, 32).contiguous())["logits"]
    for size in (64, 20):
        other = fid.extract(extractor, flat.expand(6, 3, size, size).contiguous())["logits"]
        assert torch.allclose(other, at32, atol=1e-4)
    with pytest.raises(ValueError, match="uint8"):
        extractor(images.float())


def test_missing_classifier_weights_name_the_train_command(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(EvaluationError, match="python -m tools.classifier train --data"):
        fid.resolve_weights(cf.NAME, None)
    with pytest.raises(EvaluationError, match="is not a file; train it"):
        fid.resolve_weights(cf.NAME, str(tmp_path / "nope.safetensors"))


def test_evaluate_tool_uses_the_classifier_from_the_default_cache_and_both_bn_modes(
    run_dir, tiny_weights, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    default = cf.default_weights_path()
    assert default.is_relative_to(cache / "dcgan-trainer" / "classifier") and cf.Recipe().digest() in default.name
    default.parent.mkdir(parents=True)
    default.write_bytes(tiny_weights.read_bytes())  # what `train` leaves there

    common = [
        f"eval.feature_extractor={cf.NAME}",  # no eval.feature_extractor_weights: the default recipe's file
        "eval.num_samples=60",
        "eval.batch_size=20",
        "eval.kid_subset_size=30",
        "eval.kid_subsets=5",
    ]
    running, batch = tmp_path / "running.json", tmp_path / "batch.json"
    assert evaluate_main([str(run_dir), "--out", str(running), *common]) == 0
    assert evaluate_main([str(run_dir), "--out", str(batch), "--bn-stats", "batch", *common]) == 0
    a, b = json.loads(running.read_text()), json.loads(batch.read_text())
    assert a["settings"]["feature_extractor"] == cf.NAME and (a["bn_stats"], b["bn_stats"]) == ("running", "batch")
    assert np.isfinite(a["metrics"]["fid"]) and a["metrics"]["fid"] != b["metrics"]["fid"]
    assert "batch BatchNorm statistics" in batch.with_suffix(".md").read_text()
    # the evaluation's default file name says which mode made it
    assert evaluate_main([str(run_dir), "--bn-stats", "batch", *common]) == 0
    assert (run_dir / "eval" / "step-00000004-raw-n60-batchbn.json").is_file()


# ---- the sampling mode ----------------------------------------------------------------------------
def _trained_generator(run_dir: Path) -> Generator:
    checkpoint = find_checkpoint(str(run_dir))
    return load_generator(checkpoint, checkpoint_config(checkpoint).model)[0]


def test_batch_statistics_differ_from_running_ones_and_leave_the_generator_untouched(run_dir):
    generator = _trained_generator(run_dir)
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    z = fid.latents(0, range(16), generator.nz)
    running = generate(generator, z, "cpu")
    assert torch.equal(running, generate(generator, z, "cpu"))  # running: deterministic
    batch = generate(generator, z, "cpu", bn_stats="batch")
    assert not torch.equal(batch, running)
    # train mode: a batch's statistics, so the same latent looks different in another batch
    assert not torch.equal(generate(generator, z[:8], "cpu", bn_stats="batch"), batch[:8])
    state = generator.state_dict()
    assert not generator.training and all(torch.equal(state[k], v) for k, v in before.items())


def test_evaluator_batch_mode_differs_and_running_mode_repeats(run_dir, tiny_weights):
    cfg = load_config(
        str(run_dir / "config.yaml"),
        [
            f"eval.feature_extractor={cf.NAME}",
            f"eval.feature_extractor_weights={tiny_weights}",
            "eval.num_samples=40",
            "eval.batch_size=20",
        ],
    )
    evaluator = fid.Evaluator(cfg, Accelerator(cpu=True), lambda line: None)
    generator = _trained_generator(run_dir)
    first = evaluator.generated_features(generator)
    assert torch.equal(first["logits"], evaluator.generated_features(generator, "running")["logits"])
    batch = evaluator.generated_features(generator, "batch")
    assert not torch.equal(batch["logits"], first["logits"])
    assert torch.equal(evaluator.generated_features(generator)["logits"], first["logits"])  # nothing carried over
    with pytest.raises(EvaluationError, match="bn_stats"):
        evaluator.generated_features(generator, "train")


def test_sample_tool_bn_stats_flag(run_dir, tmp_path):
    outs = {}
    for name, extra in (("running", []), ("again", ["--bn-stats", "running"]), ("batch", ["--bn-stats", "batch"])):
        outs[name] = tmp_path / f"{name}.npz"
        assert sample_main([str(run_dir), "--out", str(outs[name]), "--num", "12", *extra]) == 0
    arrays = {name: np.load(path)["arr_0"] for name, path in outs.items()}
    assert np.array_equal(arrays["running"], arrays["again"])
    assert not np.array_equal(arrays["running"], arrays["batch"])
    with pytest.raises(SystemExit):
        sample_main([str(run_dir), "--out", str(tmp_path / "x.npz"), "--bn-stats", "train"])


# ---- the side-by-side tool ------------------------------------------------------------------------
@pytest.mark.slow
def test_compare_quality_trains_both_loops_and_measures_them_alike(image_tree, tiny_weights, tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO, SMOKE, trainer_env

    out = tmp_path / "quality"
    command = [sys.executable, str(REPO / "docs" / "compare_quality.py"), "--config", str(SMOKE)]
    command += ["--data", str(image_tree), "--reference", str(image_tree), "--steps", "3", "--seeds", "0"]
    command += ["--num-samples", "20", "--weights", str(tiny_weights), "--out", str(out), "eval.batch_size=10"]
    proc = subprocess.run(command, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((out / "quality-3steps.json").read_text())
    assert {(r["arm"], r["bn_stats"]) for r in records} == {
        (arm, mode) for arm in ("classic", "ours") for mode in ("running", "batch")
    }
    assert all(r["num_samples"] == 20 and np.isfinite(r["fid"]) for r in records)
    assert (out / "classic-s0" / "generator.safetensors").is_file() and (
        out / "ours-s0" / "generator.safetensors"
    ).is_file()
    assert "| classic | running | 3 | 1 |" in (out / "quality-3steps.md").read_text()
