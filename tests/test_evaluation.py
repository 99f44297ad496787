"""Evaluation: FID / IS / KID (trainer/quality/), the offline classifier measure, the EMA generator,
BatchNorm statistics when sampling, and the evaluate and sample tools.

The feature extractor is the stand-in of tests/standin_extractor.py, plugged in through
torch-fidelity's registry (the library's maths runs unchanged on its features), or a tiny
`cifar10-classifier` trained for seconds on images whose colour is their class: no download and no
real data. In-process tests first; those through the entry points in subprocesses are marked `slow`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from tests.conftest import REPO, SMOKE, launch_command, read_metrics, run_command, run_trainer, smoke_args, trainer_env
from tools import classifier as tool
from trainer.core.checkpoint import EMA_FILE, checkpoint_config, find_checkpoint, load_generator
from trainer.core.config import load_config
from trainer.core.data import FakeImages, to_uint8
from trainer.core.ema import GeneratorEMA
from trainer.core.models import Generator
from trainer.evaluate import main as evaluate_main
from trainer.quality import classifier as cf
from trainer.quality import fid
from trainer.sample import generate
from trainer.sample import main as sample_main
from trainer.util.errors import EvaluationError

STANDIN = "tests.standin_extractor:StandInExtractor"


@pytest.fixture
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)  # one process; a fresh one per test keeps save hooks and models apart


@pytest.fixture(scope="module")
def extractor() -> nn.Module:
    return fid.load_feature_extractor(STANDIN, None)


def _images(count: int, resolution: int = 32) -> torch.Tensor:
    dataset = FakeImages(count, resolution, seed=0)
    return torch.stack([dataset[i] for i in range(count)])


# ---- FID / IS / KID and the reference statistics, in process -----------------------------------------
def test_fid_of_real_images_against_their_own_statistics_is_zero_and_grows_with_noise(extractor):
    real = _images(400)
    layers = fid.layers_for(STANDIN)
    features = fid.extract(extractor, real)
    stats = fid.fid_statistics(features[layers.fid])
    reference = fid.Reference(stats["mu"], stats["sigma"], features[layers.kid], Path("unused"))
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for sigma in (0, 4, 8, 16, 32, 64):
        noisy = (real.float() + sigma * noise).round().clamp(0, 255).to(torch.uint8)
        results.append(fid.compute_metrics(reference, fid.extract(extractor, noisy), layers, 20, 200))
    fids = [r["fid"] for r in results]
    assert abs(fids[0]) < 1e-9, fids
    assert all(a < b for a, b in zip(fids, fids[1:], strict=False)), fids
    assert fids[-1] > 1.0
    # KID is an unbiased estimate (near 0 and noisy for equal sets); heavy noise must stand out.
    assert abs(results[0]["kid_mean"]) < 0.01 and results[-1]["kid_mean"] > 100 * abs(results[0]["kid_mean"])
    assert all(r["kid_subset_size"] == 200 and r["is_mean"] >= 1.0 for r in results)


def test_generated_images_are_quantized_like_real_ones():
    real = _images(8)
    assert torch.equal(to_uint8(real.float() / 127.5 - 1.0), real)  # exact round trip
    assert to_uint8(torch.tensor([-1.5, -1.0, 1.0, 2.0])).tolist() == [0, 0, 255, 255]


def test_latents_depend_only_on_seed_and_index_and_batches_cover_every_sample_once():
    all_ten = fid.latents(3, range(10), 16)
    assert torch.equal(fid.latents(3, [7, 2], 16), all_ten[[7, 2]])
    assert not torch.equal(fid.latents(4, range(10), 16), all_ten)
    one_process = fid.rank_batches(1000, 64, 0, 1)
    for world in (2, 3, 8):
        shares = [fid.rank_batches(1000, 64, r, world) for r in range(world)]
        batches = sorted((b for share in shares for b in share), key=lambda b: b.start)
        assert batches == one_process  # the same batches, whatever the number of processes


def _eval_config(tmp_path: Path, *overrides: str):
    return load_config(
        None,
        [
            "data.source=fake",
            "data.fake_size=96",
            "data.num_workers=0",
            "model.resolution=32",
            "model.nz=16",
            "model.ngf=8",
            f"eval.feature_extractor={STANDIN}",
            f"eval.cache_dir={tmp_path / 'cache'}",
            "eval.num_samples=64",
            "eval.batch_size=24",
            "eval.kid_subset_size=32",
            "eval.kid_subsets=10",
            *overrides,
        ],
    )


def test_reference_statistics_are_cached_and_reused_not_recomputed(tmp_path, accelerator, monkeypatch):
    reads = []

    class CountingImages(FakeImages):
        def __getitem__(self, index: int) -> torch.Tensor:
            reads.append(index)
            return super().__getitem__(index)

    monkeypatch.setattr(fid, "reference_dataset", lambda cfg: CountingImages(96, cfg.model.resolution, 0))
    cfg = _eval_config(tmp_path)
    lines: list[str] = []
    first = fid.Evaluator(cfg, accelerator, lines.append).reference()
    assert len(reads) == 96 and first.path.is_file() and "saved" in lines[-1]
    before = (first.path.stat().st_mtime_ns, first.path.read_bytes())

    again = fid.Evaluator(cfg, accelerator, lines.append).reference()  # a new evaluator: from disk
    assert len(reads) == 96, "the cached statistics were recomputed"
    assert "loaded" in lines[-1] and again.path == first.path
    assert (first.path.stat().st_mtime_ns, first.path.read_bytes()) == before
    assert (again.mu == first.mu).all() and (again.sigma == first.sigma).all()
    assert torch.equal(again.kid_features, first.kid_features)
    assert [p.name for p in first.path.parent.iterdir()] == [first.path.name]  # no temporary file left

    # Another resolution is another reference: computed once more, into its own file.
    other = fid.Evaluator(_eval_config(tmp_path, "model.resolution=16"), accelerator, lines.append).reference()
    assert len(reads) == 192 and other.path != first.path and first.path.is_file()


def test_evaluator_scores_a_generator_and_repeats_itself(tmp_path, accelerator):
    cfg = _eval_config(tmp_path)
    evaluator = fid.Evaluator(cfg, accelerator, lambda line: None)
    generator = Generator(16, 8, 32)
    first = evaluator.evaluate(generator)
    second = evaluator.evaluate(generator)
    assert {k: v for k, v in first.items() if k != "eval_s"} == {k: v for k, v in second.items() if k != "eval_s"}
    assert first["fid"] > 0 and math.isfinite(first["kid_mean"]) and first["num_real"] == 96
    assert first["num_samples"] == 64 and first["kid_subset_size"] == 32


def test_missing_weights_file_error_names_the_file_and_the_fix(tmp_path):
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(EvaluationError) as info:
        fid.resolve_weights(fid.INCEPTION, str(missing))
    message = str(info.value)
    assert f"eval.feature_extractor_weights={str(missing)!r} is not a file" in message
    assert "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + fid.INCEPTION_FILE in message
    assert str(Path(torch.hub.get_dir()) / "checkpoints" / fid.INCEPTION_FILE) in message


def test_unknown_feature_extractor_is_refused():
    with pytest.raises(EvaluationError, match="not a torch-fidelity extractor"):
        fid.layers_for("inception-v4")
    with pytest.raises(EvaluationError, match="cannot be imported"):
        fid.layers_for("no_such_module:Extractor")


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


# ---- the offline quality measure: cifar10-classifier (tools/classifier.py trains it) -----------------
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


# ---- the EMA generator -------------------------------------------------------------------------------
def test_ema_update_is_the_exponential_moving_average(accelerator):
    torch.manual_seed(0)
    generator = Generator(4, 4, 16)
    ema = GeneratorEMA(generator, 0.75, accelerator)
    start = {k: v.clone() for k, v in generator.state_dict().items()}
    with torch.no_grad():
        for p in generator.parameters():
            p.add_(1.0)
    generator.main[1].num_batches_tracked.fill_(7)
    ema.update(generator)
    for name, value in ema.module.state_dict().items():
        live = generator.state_dict()[name]
        expected = live if not value.is_floating_point() else 0.75 * start[name] + 0.25 * live
        assert torch.allclose(value, expected, atol=1e-6), name
    assert ema.module.main[1].num_batches_tracked.item() == 7


# ---- BatchNorm statistics when sampling (--bn-stats), and the classifier through trainer.evaluate ----
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Four steps of the smoke run: a checkpoint whose G has BatchNorm running statistics."""
    run = tmp_path_factory.mktemp("smoke") / "run"
    run_trainer(smoke_args(run, "train.max_steps=4", "log.tracker=none"))
    return run


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


# ---- through the entry points: evaluation during training, the tools (subprocesses) ------------------
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---- the side-by-side tool ------------------------------------------------------------------------
@pytest.mark.slow
def test_compare_quality_trains_both_loops_and_measures_them_alike(image_tree, tiny_weights, tmp_path):
    out = tmp_path / "quality"
    command = [sys.executable, str(REPO / "tools" / "compare_quality.py"), "--config", str(SMOKE)]
    command += ["--data", str(image_tree), "--reference", str(image_tree), "--steps", "4", "--seeds", "0"]
    command += ["--snapshots", "2"]
    command += ["--num-samples", "20", "--weights", str(tiny_weights), "--out", str(out), "eval.batch_size=10"]
    proc = subprocess.run(command, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((out / "quality-4steps.json").read_text())
    assert {(r["arm"], r["bn_stats"], r["steps"]) for r in records} == {
        (arm, mode, step) for arm in ("classic", "ours") for mode in ("running", "batch") for step in (2, 4)
    }
    assert all(r["num_samples"] == 20 and np.isfinite(r["fid"]) for r in records)
    assert (out / "classic-s0" / "generator.safetensors").is_file() and (
        out / "ours-s0" / "generator.safetensors"
    ).is_file()
    table = (out / "quality-4steps.md").read_text()
    assert "| classic | running | 4 | 1 |" in table and "mean over its generators at steps 2, 4" in table
    # the snapshot at step 2 is another generator than the final one, in both loops
    assert all((out / f"{arm}-s0" / "snapshots" / "step-00000002.safetensors").is_file() for arm in ("classic", "ours"))
    assert not (out / "ours-s0" / "checkpoints").exists()
