"""The default data path, data.source=cifar10 through the packed cache, on a tiny CIFAR-10 that
torchvision's own reader and checksum verification accept (tests/standin_cifar10.py)."""

from __future__ import annotations

import trainer  # noqa: F401  (installs the torchvision import shim: see trainer/util/compat.py)

# isort: split

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10

from tests.conftest import REPO, read_metrics, run_trainer, smoke_args
from tests.standin_cifar10 import accepted_checksums, write_cifar10
from tests.test_evaluation import eval_overrides
from trainer.core.config import DataConfig
from trainer.core.data import CIFAR10Images, build_packed, pil_to_uint8
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
