"""FID / IS / KID through torch-fidelity, the reference cache, the best checkpoint and the EMA, in process.

The feature extractor is the stand-in of tests/standin_extractor.py, plugged in through
torch-fidelity's registry: the library's maths runs unchanged on its features.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from trainer.core.checkpoint import BEST, Checkpointer, TrainState
from trainer.core.config import load_config
from trainer.core.data import FakeImages, to_uint8
from trainer.core.ema import GeneratorEMA
from trainer.core.models import Generator
from trainer.quality import fid
from trainer.util.errors import ConfigError, EvaluationError

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


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.ema_decay=1.0", "train.ema_decay=1.0 must be in [0, 1)"),
        ("eval.num_samples=5", "eval.num_samples=5 must be at least 10"),
        ("eval.every_epochs=0", "eval.every_epochs=0 must be at least 1, or null"),
        ("eval.split=val", "eval.split='val' is not one of train, test"),
    ],
)
def test_bad_evaluation_settings_are_refused(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value)
    with pytest.raises(ConfigError, match="eval.split=test needs data.source=cifar10"):
        load_config(None, ["data.source=fake", "eval.split=test"])
    assert load_config(None, ["train.ema_decay=0"]).train.ema_decay is None  # 0 means off


def test_best_checkpoint_survives_rotation_until_a_better_one_comes(tmp_path, accelerator):
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
