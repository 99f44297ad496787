"""The packed data path: same images as the classic transforms, cached, invalidated, sharded alike."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO, run_trainer, write_image_tree
from trainer.core.config import DataConfig
from trainer.core.data import build_dataloader, build_packed, pil_to_uint8, to_model_input
from trainer.core.packed import FORMAT_VERSION, PackedImages, file_fingerprint


def _cfg(root: Path, cache: Path) -> DataConfig:
    return DataConfig(source="folder", root=str(root), cache_dir=str(cache))


def _classic(files: list[Path], resolution: int) -> torch.Tensor:
    transform = pil_to_uint8(resolution)
    return torch.stack([transform(Image.open(f).convert("RGB")) for f in files])


def test_native_size_upsampled_on_device_matches_pil_within_rounding(tmp_path):
    root = write_image_tree(tmp_path / "imgs", 24, sizes=((32, 32),))  # CIFAR-like: uniform 32x32 squares
    packed = build_packed(_cfg(root, tmp_path / "cache"), resolution=64)
    assert packed.meta["side"] == 32  # stored at native size: a quarter of the bytes
    ours = ((to_model_input(packed.__getitems__(range(24)), 64) + 1) * 127.5).round()
    reference = _classic(packed.listing.files, 64).float()
    diff = (ours - reference).abs()
    assert ours.shape == reference.shape == (24, 3, 64, 64)
    assert diff.max() <= 1 and diff.mean() < 0.5  # bilinear on device vs PIL: rounding only


def test_mixed_sizes_are_packed_exactly_as_the_classic_transforms(tmp_path):
    root = write_image_tree(tmp_path / "imgs", 12)  # 32x32, 40x48, 64x64, one grayscale
    packed = build_packed(_cfg(root, tmp_path / "cache"), resolution=32)
    assert packed.meta["side"] == 32
    assert torch.equal(packed.__getitems__(range(12)), _classic(packed.listing.files, 32))
    assert torch.equal(packed[5], packed.__getitems__([5])[0])


def test_cache_is_reused_and_invalidated_by_changes(tmp_path):
    root, cache = write_image_tree(tmp_path / "imgs", 8, sizes=((32, 32),)), tmp_path / "cache"
    first = build_packed(_cfg(root, cache), resolution=32)
    built = first.path.stat().st_mtime_ns
    assert build_packed(_cfg(root, cache), resolution=32).path == first.path
    assert first.path.stat().st_mtime_ns == built  # reused, not rebuilt

    assert build_packed(_cfg(root, cache), resolution=64).path != first.path  # another resolution
    image = next(root.rglob("*.png"))
    Image.new("RGB", (32, 32), (255, 0, 0)).save(image)  # a changed file
    os.utime(image, ns=(built + 10**9, built + 10**9))
    changed = build_packed(_cfg(root, cache), resolution=32)
    assert changed.path != first.path and len(changed) == 8
    Image.new("RGB", (32, 32)).save(root / "a" / "new.png")  # an added file
    assert len(build_packed(_cfg(root, cache), resolution=32)) == 9
    assert not list(cache.glob(".tmp-*"))
    assert all(json.loads(m.read_text())["format_version"] == FORMAT_VERSION for m in cache.glob("*.json"))


def test_a_touched_file_alone_changes_the_key_and_rebuilds(tmp_path):
    """Same name, same size, same bytes, a later modification time: the file may have been rewritten in
    place (an image editor, rsync without --times), so the cache must not trust it."""
    root, cache = write_image_tree(tmp_path / "imgs", 4, sizes=((32, 32),)), tmp_path / "cache"
    first = build_packed(_cfg(root, cache), resolution=32)
    files = first.listing.files
    key = file_fingerprint(root, files)
    image, before = files[1], files[1].stat()
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert image.stat().st_size == before.st_size
    assert file_fingerprint(root, files) != key
    rebuilt = build_packed(_cfg(root, cache), resolution=32)
    assert rebuilt.path != first.path and torch.equal(rebuilt.__getitems__(range(4)), first.__getitems__(range(4)))


def test_loader_yields_whole_uint8_batches_without_collate(tmp_path):
    root = write_image_tree(tmp_path / "imgs", 20, sizes=((32, 32),))
    packed = build_packed(_cfg(root, tmp_path / "cache"), resolution=32)
    batches = list(build_dataloader(packed, global_batch=8, num_workers=2))
    assert len(batches) == 2 and all(b.dtype == torch.uint8 and b.shape == (8, 3, 32, 32) for b in batches)


def test_channels_last_input():
    x = to_model_input(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), 64, channels_last=True)
    assert x.shape == (2, 3, 64, 64) and x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow
def test_two_processes_shard_packed_batches_disjointly(tmp_path):
    """Image i of a packed file encodes i in its pixels; two ranks must see disjoint slices that cover it."""
    cache = tmp_path / "cache"
    images = np.zeros((96, 3, 4, 4), dtype=np.uint8)
    images[:, 0], images[:, 1] = (np.arange(96) // 256)[:, None, None], (np.arange(96) % 256)[:, None, None]
    cache.mkdir()
    np.save(cache / "indices.npy", images)
    script = REPO / "tests" / "dist" / "check_sharding.py"
    run_trainer([str(tmp_path), "96", "16", str(cache / "indices.npy")], processes=2, script=script)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in ("epoch0", "epoch1"):
        shards = [[i for batch in rank[epoch] for i in batch] for rank in ranks]
        assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(96))


def test_packed_dataset_reads_back(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(2 * 3 * 2 * 2, dtype=np.uint8).reshape(2, 3, 2, 2))
    packed = PackedImages(tmp_path / "x.npy", {"unreadable": [["a.png", "empty file"]]})
    assert len(packed) == 2 and packed.unreadable == [("a.png", "empty file")]
    assert packed.__getitems__([1, 0])[0].flatten().tolist() == list(range(12, 24))
