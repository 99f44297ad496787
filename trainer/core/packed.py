"""Decode a dataset once into a memory-mapped uint8 `.npy` file, then serve whole batches from it.

The classic loader decodes and resizes every image with PIL in worker processes, every epoch.
Here each image is decoded once, on first use, and stored at its native size when the images are
uniform squares no larger than the model (CIFAR-10: 32x32, 150 MB), else resized and
centre-cropped to the model's resolution as the classic transforms do. A batch is then one
fancy-index into the memory map (no per-sample collate), it travels to the device as uint8, and
`data.to_model_input` resizes and normalises it there.

The file is keyed by what it was made from (source, file list with sizes and mtimes, resolution,
format version), so a changed dataset or resolution builds a new one; publication is atomic and
never replaces a file (see `open_or_build`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from trainer.util.atomic import write_atomic

FORMAT_VERSION = 2  # 2: 16-bit images scaled, not clipped; alpha composited onto black


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL's modes for 16-bit grayscale (PNG, TIFF)
ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ALPHA or (image.mode == "P" and "transparency" in image.info)


def to_rgb(image: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB, for every file the trainer reads.

    PIL's own `convert("RGB")` clips 16-bit grayscale at 255 (a mid-grey 16-bit PNG turns white) and
    drops alpha, leaving whatever colour the transparent pixels happen to hold. Here 16-bit samples
    are scaled to 8 bits, and alpha is composited onto black (transparent pixels become black); the
    data preparation warns about files with alpha (`has_alpha`).
    """
    if image.mode in SIXTEEN_BIT:
        samples = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(samples / 257.0), 0, 255).astype(np.uint8), mode="L")
    if has_alpha(image):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def whole_batch(batch: torch.Tensor) -> torch.Tensor:
    """collate_fn for datasets whose `__getitems__` already returns the batch tensor."""
    return batch


class PackedImages(Dataset):
    """(N, 3, S, S) uint8 images in a memory-mapped .npy file, indexed a batch at a time."""

    def __init__(self, path: Path, meta: dict[str, Any], listing: Any = None) -> None:
        self.path = path
        self.meta = meta
        self.listing = listing  # the ImageFiles it was packed from (folder sources), for warnings and tests
        self.images = np.load(path, mmap_mode="r")
        self.unreadable: list[tuple[str, str]] = [tuple(x) for x in meta.get("unreadable", [])]

    @classmethod
    def open(cls, path: Path) -> PackedImages:
        """A pack another process built (see `open_or_build`), by the path it reported."""
        return cls(path, json.loads(path.with_suffix(".json").read_text()))

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.images[index]))

    def __getitems__(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(self.images[np.asarray(indices, dtype=np.int64)])


def _cache_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    return cache_dir / f"{key}.npy", cache_dir / f"{key}.json"


def open_or_build(
    cache_dir: Path, key_parts: dict[str, Any], build: Callable[[Path], dict[str, Any]], listing: Any = None
) -> PackedImages:
    """The packed file for `key_parts`, built by `build(tmp_npy_path) -> meta` if missing.

    Publication never replaces a file, since another process (on another node, over a shared
    filesystem) may have it memory-mapped: the .npy is linked into place, then its .json, which marks
    the pack complete. A builder that finds either already published keeps the published one: the
    name is a hash of everything the content depends on, so both builds are the same bytes.
    """
    key = hashlib.sha256(json.dumps({"v": FORMAT_VERSION, **key_parts}, sort_keys=True).encode()).hexdigest()[:20]
    npy, meta_path = _cache_paths(cache_dir, key)
    if not (npy.is_file() and meta_path.is_file()):
        meta: dict[str, Any] = {"format_version": FORMAT_VERSION, "key": key_parts}
        write_atomic(npy, lambda tmp: meta.update(build(tmp)), exclusive=True)
        write_atomic(meta_path, lambda tmp: tmp.write_text(json.dumps(meta)), exclusive=True)
    return PackedImages(npy, json.loads(meta_path.read_text()), listing)


def pack_files(files: Sequence[Path], resolution: int, out: Path) -> dict[str, Any]:
    """Decode image files into `out`; unreadable ones are left out and listed in the meta."""
    workers = min(32, os.cpu_count() or 1)  # PIL decodes without the GIL: threads scale

    def header(path: Path) -> tuple[tuple[int, int] | str, bool]:
        try:
            with Image.open(path) as image:
                return image.size, has_alpha(image)
        except Exception as exc:  # PIL raises many types for bad files
            return unreadable_reason(path, exc), False

    with ThreadPoolExecutor(workers) as pool:
        headers = list(pool.map(header, files))
    sizes = [size for size, _ in headers]
    with_alpha = [str(path) for path, (_, alpha) in zip(files, headers, strict=True) if alpha]
    shapes = {s for s in sizes if isinstance(s, tuple)}
    native = next(iter(shapes))[0] if len(shapes) == 1 and len(set(next(iter(shapes)))) == 1 else None
    side = native if native is not None and native <= resolution else resolution
    resize = transforms.Compose([transforms.Resize(side), transforms.CenterCrop(side)])

    array = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=(len(files), 3, side, side))

    def decode(i: int) -> str | None:
        if isinstance(sizes[i], str):
            return sizes[i]
        try:
            with Image.open(files[i]) as image:
                rgb = to_rgb(image)
            if rgb.size != (side, side):
                rgb = resize(rgb)
            array[i] = np.asarray(rgb).transpose(2, 0, 1)
            return None
        except Exception as exc:  # truncated files fail only here, at the full decode
            return unreadable_reason(files[i], exc)

    with ThreadPoolExecutor(workers) as pool:
        problems = list(pool.map(decode, range(len(files))))
    unreadable = [(str(files[i]), why) for i, why in enumerate(problems) if why is not None]
    if unreadable:  # compact: rewrite without the bad rows
        keep = np.array([why is None for why in problems])
        good = np.array(array[keep])
        del array
        array = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=good.shape)
        array[:] = good
    array.flush()  # write_atomic fsyncs the file before publishing it
    return {"count": int(array.shape[0]), "side": side, "unreadable": unreadable, "alpha": with_alpha}


def pack_array(images_nhwc: np.ndarray, resolution: int, out: Path) -> dict[str, Any]:
    """Pack an in-memory uint8 NHWC array (torchvision's CIFAR10.data) the same way."""
    native = images_nhwc.shape[1]
    if images_nhwc.shape[1] == images_nhwc.shape[2] and native <= resolution:
        side, chw = native, images_nhwc.transpose(0, 3, 1, 2)
    else:
        side = resolution
        resize = transforms.Compose([transforms.Resize(side), transforms.CenterCrop(side)])
        chw = np.stack([np.asarray(resize(Image.fromarray(im))).transpose(2, 0, 1) for im in images_nhwc])
    array = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=chw.shape)
    array[:] = chw
    array.flush()
    return {"count": int(array.shape[0]), "side": side, "unreadable": []}


def file_fingerprint(root: Path, files: Sequence[Path]) -> str:
    """Changes when any file is added, removed, resized or touched."""
    digest = hashlib.sha256(str(root.resolve()).encode())
    for f in files:
        st = f.stat()
        digest.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def unreadable_reason(path: Path, exc: Exception) -> str:
    """Why PIL could not read `path`, in a few words for the report."""
    if path.stat().st_size == 0:
        return "empty file"
    return ((str(exc).splitlines() or [type(exc).__name__])[0] or type(exc).__name__)[:120]
