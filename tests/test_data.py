import pickle
import typing

import numpy as np
import pytest
import torch

from tests.conftest import write_image_tree
from trainer.core.config import DataConfig
from trainer.core.data import (
    SOURCES,
    CIFAR10Images,
    FakeImages,
    ImageFiles,
    build_dataloader,
    build_dataset,
    pil_to_uint8,
    report_unreadable,
    to_model_input,
)
from trainer.util.errors import DataError


def test_the_config_offers_exactly_the_sources_of_the_table():
    assert set(typing.get_args(typing.get_type_hints(DataConfig)["source"])) == set(SOURCES)


def test_fake_images_are_deterministic_uint8():
    a, b = FakeImages(10, 32, seed=1), FakeImages(10, 32, seed=1)
    assert a[3].dtype == torch.uint8 and a[3].shape == (3, 32, 32)
    assert torch.equal(a[3], b[3]) and not torch.equal(a[3], a[4])
    assert not torch.equal(a[3], FakeImages(10, 32, seed=2)[3])


def test_folder_reads_mixed_sizes_and_grayscale_at_model_resolution(tmp_path):
    root = write_image_tree(tmp_path / "imgs", 9)
    ds = build_dataset(DataConfig(source="folder", root=str(root)), resolution=32, seed=0)
    assert len(ds) == 9
    images = [ds[i] for i in range(len(ds))]
    assert all(im.shape == (3, 32, 32) and im.dtype == torch.uint8 for im in images)


def test_folder_flat_layout(tmp_path):
    root = write_image_tree(tmp_path / "imgs", 4)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, f in enumerate(sorted(root.rglob("*.*"))):
        f.rename(flat / f"{i}{f.suffix}")
    assert len(ImageFiles(flat, pil_to_uint8(16))) == 4


def test_missing_and_empty_folder_errors(tmp_path):
    with pytest.raises(DataError, match="is not a directory"):
        build_dataset(DataConfig(source="folder", root=str(tmp_path / "nope")), 32, 0)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        build_dataset(DataConfig(source="folder", root=str(tmp_path / "empty")), 32, 0)


def test_cifar10_missing_says_where_to_put_the_tarball(tmp_path):
    with pytest.raises(DataError) as info:
        build_dataset(DataConfig(source="cifar10", root=str(tmp_path), download=False), 64, 0)
    assert "cifar-10-python.tar.gz" in str(info.value) and "data.source=folder" in str(info.value)


def test_cifar10_reader_upscales_to_64(tmp_path, monkeypatch):
    """torchvision's real CIFAR10 reader on pickles in the official layout (checksums patched out)."""
    from torchvision.datasets import CIFAR10

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name, _ in CIFAR10.train_list:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        (base / name).write_bytes(pickle.dumps(batch))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    ds = CIFAR10Images(str(tmp_path), download=False, transform=pil_to_uint8(64))
    assert len(ds) == 20 and ds[0].shape == (3, 64, 64) and ds[0].dtype == torch.uint8


def test_to_model_input_range():
    x = torch.tensor([0, 255, 128], dtype=torch.uint8)
    y = to_model_input(x)
    assert y.dtype == torch.float32 and y[0] == -1 and y[1] == 1 and abs(y[2]) < 0.01


def test_loader_yields_full_global_batches():
    loader = build_dataloader(FakeImages(70, 16), global_batch=16, num_workers=0)
    assert len(loader) == 4 and all(b.shape[0] == 16 for b in loader)
    with pytest.raises(DataError, match="fewer than one global batch"):
        build_dataloader(FakeImages(8, 16), global_batch=16, num_workers=0)


def test_loader_shuffles_and_covers_the_dataset():
    loader = build_dataloader(torch.arange(64), global_batch=16, num_workers=0)  # a dataset of its indices
    order = torch.cat(list(loader))
    assert sorted(order.tolist()) == list(range(64)) and order.tolist() != list(range(64))


def test_unreadable_files_stop_the_run_unless_skipped(tmp_path):
    bad = [(str(tmp_path / "a.png"), "empty file")]
    with pytest.raises(
        DataError, match="1 of 5 image files .* are unreadable: .*a.png \\(empty file\\); .*data.bad_files=skip"
    ):
        report_unreadable(bad, 5, tmp_path, "error", warn=False)
    with pytest.warns(UserWarning, match="skipped \\(data.bad_files=skip\\)"):
        report_unreadable(bad, 5, tmp_path, "skip", warn=True)
    with pytest.raises(DataError, match="no readable image is left"):
        report_unreadable(bad, 1, tmp_path, "skip", warn=False)
    report_unreadable([], 5, tmp_path, "error", warn=False)  # nothing to report
