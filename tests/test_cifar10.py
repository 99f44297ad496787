"""The default data path, data.source=cifar10 through the packed cache, on a tiny CIFAR-10 that
torchvision's own reader and checksum verification accept (tests/standin_cifar10.py); and
data.source=cifar100 on a tiny CIFAR-100 written the same way."""

from __future__ import annotations

import trainer  # noqa: F401  (installs the torchvision import shim: see trainer/util/compat.py)

# isort: split

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10, CIFAR100

from tests.conftest import REPO, read_metrics, run_trainer, smoke_args
from tests.standin_cifar10 import accepted_checksums, accepted_checksums_100, write_cifar10, write_cifar100
from tests.test_evaluation import eval_overrides
from trainer.core.config import DataConfig, load_config
from trainer.core.data import SOURCES, CIFAR10Images, build_dataset, build_packed, load_dataset, pil_to_uint8
from trainer.quality.fid import reference_dataset
from trainer.util.errors import DataError

STANDIN_CIFAR10 = REPO / "tests" / "standin_cifar10.py"


@pytest.fixture
def cifar(tmp_path, monkeypatch) -> tuple[Path, np.ndarray]:
    root = tmp_path / "cifar10"
    images = write_cifar10(root)
    for attribute, value in accepted_checksums(root).items():
        monkeypatch.setattr(CIFAR10, attribute, value)
    return root, images


def test_packed_cache_holds_the_training_batches_in_order_and_follows_changes(cifar, tmp_path):
    root, images = cifar
    cfg = DataConfig(source="cifar10", root=str(root), cache_dir=str(tmp_path / "cache"))  # download=true: default
    packed = build_packed(cfg, resolution=64)
    assert packed.meta["side"] == 32 and len(packed) == 80  # stored at native size; upsampled on the device
    assert torch.equal(packed.__getitems__(range(80)), torch.from_numpy(images))
    assert build_packed(cfg, resolution=64).path == packed.path  # reused

    batch = root / "cifar-10-batches-py" / "data_batch_3"
    stat = batch.stat()
    os.utime(batch, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten in place, same bytes
    assert build_packed(cfg, resolution=64).path != packed.path


def test_test_split_and_damaged_files_through_torchvisions_checks(cifar):
    root, _ = cifar
    test = CIFAR10Images(str(root), download=False, transform=pil_to_uint8(32), train=False)
    assert len(test) == 16 and test[0].shape == (3, 32, 32)
    batch = root / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:-10])  # truncated: torchvision's md5 check refuses the set
    with pytest.raises(DataError, match="CIFAR-10 is not available"):
        CIFAR10Images(str(root), download=False, transform=None)


def test_cifar100_source_reads_packs_and_holds_out_its_test_set(tmp_path, monkeypatch):
    """data.source=cifar100, from the files of torchvision's CIFAR-100 layout: per sample and packed the
    same training images, its test set for eval.split=test, and the classic loop's torchvision reader."""
    root = tmp_path / "cifar100"
    images = write_cifar100(root)
    for attribute, value in accepted_checksums_100(root).items():
        monkeypatch.setattr(CIFAR100, attribute, value)
    cfg = load_config(
        None, ["data.source=cifar100", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "eval.split=test"]
    )
    per_sample = build_dataset(cfg.data, resolution=32, seed=0)
    assert len(per_sample) == 48 and torch.equal(per_sample[5], torch.from_numpy(images[5]))
    packed = build_packed(cfg.data, resolution=64)
    assert packed.meta["side"] == 32 and torch.equal(packed.__getitems__(range(48)), torch.from_numpy(images))
    for packed in (True, False):  # what a run opens: prepared once, then opened by every process
        opened = load_dataset(dataclasses.replace(cfg.data, packed=packed), resolution=32, seed=0)
        assert len(opened) == 48
    assert len(reference_dataset(cfg)) == 16  # the test set
    classic = SOURCES["cifar100"].classic(cfg.data, 32, 0, pil_to_uint8(32))
    assert len(classic) == 48 and classic[0][1] == 0  # (image, fine label)
    (root / "cifar-100-python" / "train").write_bytes(b"damaged")
    with pytest.raises(DataError, match="CIFAR-100 is not available.*cifar-100-python.tar.gz"):
        build_dataset(DataConfig(source="cifar100", root=str(root), download=False), 32, 0)


@pytest.mark.slow
def test_default_data_path_trains_and_evaluates_every_n_steps(tmp_path):
    """data.source=cifar10 (download=true, packed) end to end, with eval.every_steps=3 on its reference set."""
    root, cache, run_dir = tmp_path / "cifar10", tmp_path / "cache", tmp_path / "run"
    images = write_cifar10(root)
    args = smoke_args(
        run_dir,
        "data.source=cifar10",
        f"data.root={root}",
        f"data.cache_dir={cache}",
        "train.max_steps=8",
        "eval.every_steps=3",
        "log.tracker=none",
        *eval_overrides(tmp_path / "stats"),
    )
    proc = run_trainer(args, script=STANDIN_CIFAR10)
    assert "80 images, 5 steps/epoch" in proc.stdout and "finished at step 8/8" in proc.stdout
    [packed] = cache.glob("*.npy")
    assert np.array_equal(np.load(packed), images)
    evals = [m["step"] for m in read_metrics(run_dir) if "fid" in m]
    assert evals == [3, 6, 8]  # every 3 steps, and at the end
    assert "reference statistics: 80 real images" in proc.stdout
    assert (run_dir / "checkpoints" / "best.json").is_file()
