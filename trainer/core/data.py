"""Image sources -> uint8 images at the model's resolution -> global batches -> [-1, 1] on device.

Each source yields uint8 CHW tensors already resized (shorter side) and centre-cropped to
`model.resolution` with PIL, as the classic recipe's `Resize` + `CenterCrop` do. Batches stay uint8
until they reach the device, where `to_model_input` scales them to [-1, 1]: a quarter of the
bytes of float batches cross the host-to-device copy.

The values of data.source are the rows of `SOURCES`: how each source is read, packed, compared with
in evaluation (trainer/quality/fid.py) and read by the benchmark's classic loop (trainer/bench.py),
and what config validation needs to know of it. To add a source: one `Source` row, and its name in
data.source's choices in trainer/core/config.py (a test checks that the two agree).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from trainer.core.packed import (
    PackedImages,
    file_fingerprint,
    has_alpha,
    open_or_build,
    pack_array,
    pack_files,
    to_rgb,
    unreadable_reason,
    whole_batch,
)
from trainer.util.errors import DataError
from trainer.util.paths import user_cache_dir


class DataConfig(Protocol):
    """The data.* settings this module reads: trainer/core/config.py's DataConfig, not imported here
    because config validation reads this module's `SOURCES` (an import each way would be a circle)."""

    source: str
    root: str
    download: bool
    fake_size: int
    packed: bool
    cache_dir: str | None
    bad_files: str


def pil_to_uint8(resolution: int) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.Resize(resolution),
            transforms.CenterCrop(resolution),
            transforms.PILToTensor(),
        ]
    )


class ImageFiles(Dataset):
    """Every image file under `root`, recursively, in sorted order.

    Written here rather than using torchvision's ImageFolder because a GAN needs no labels and
    ImageFolder refuses a flat folder of images; an ImageFolder tree reads the same either way.
    """

    def __init__(self, root: str | os.PathLike, transform: transforms.Compose) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data.root={str(root)!r} is not a directory; point data.root at a folder of images")
        all_files = [p for p in self.root.rglob("*") if p.is_file() and not p.name.startswith(".")]
        self.files = sorted(p for p in all_files if p.suffix.lower() in IMG_EXTENSIONS)
        self.ignored = sorted(p for p in all_files if p.suffix.lower() not in IMG_EXTENSIONS)
        if not self.files:
            raise DataError(
                f"no images ({', '.join(IMG_EXTENSIONS)}) under data.root={str(root)!r}; "
                "point data.root at an ImageFolder tree such as <cifar10-jpg>/train"
            )
        self.transform = transform

    def warn_ignored(self) -> None:
        if self.ignored:
            warnings.warn(
                f"ignoring {len(self.ignored)} files without an image extension under {self.root} "
                f"(e.g. {self.ignored[0]})",
                stacklevel=3,
            )

    def drop(self, unreadable: list[tuple[str, str]]) -> None:
        """Leave out the files `scan_files` reported (data.bad_files=skip; `error` stopped before)."""
        bad = {path for path, _ in unreadable}
        self.files = [p for p in self.files if str(p) not in bad]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.files[index]) as image:
            return self.transform(to_rgb(image))  # torchvision's loader clips 16-bit images, drops alpha


class CIFAR10Images(Dataset):
    """torchvision's CIFAR10 training set (or, with train=False, its test set), images only."""

    NAME, ARCHIVE = "CIFAR-10", "cifar-10-python.tar.gz"

    @staticmethod
    def torchvision_class() -> type:
        from torchvision.datasets import CIFAR10

        return CIFAR10

    def __init__(self, root: str, download: bool, transform: transforms.Compose, train: bool = True) -> None:
        try:
            self.dataset = self.torchvision_class()(root=root, train=train, download=download, transform=transform)
        except Exception as exc:  # URLError, RuntimeError("Dataset not found or corrupted"), OSError
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            url = f"https://www.cs.toronto.edu/~kriz/{self.ARCHIVE}"
            raise DataError(
                f"{self.NAME} is not available under data.root={root!r} ({reason}). Fix: place "
                f"{self.ARCHIVE} ({url}) in {root!r} and run with data.download=true "
                "(it is verified and unpacked, not downloaded), or use data.source=folder "
                "data.root=<an ImageFolder tree, e.g. the JPEG copy's train/>"
            ) from None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.dataset[index][0]


class CIFAR100Images(CIFAR10Images):
    """torchvision's CIFAR100: the same images and layout as CIFAR-10's, in 100 classes."""

    NAME, ARCHIVE = "CIFAR-100", "cifar-100-python.tar.gz"

    @staticmethod
    def torchvision_class() -> type:
        from torchvision.datasets import CIFAR100

        return CIFAR100


class FakeImages(Dataset):
    """Deterministic random images for tests: image i depends only on (seed, i)."""

    def __init__(self, size: int, resolution: int, seed: int = 0) -> None:
        self.size, self.resolution, self.seed = size, resolution, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.size:
            raise IndexError(index)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        # Low-frequency colour blobs rather than white noise, so a GAN has something to learn.
        coarse = torch.rand(3, 4, 4, generator=g)
        image = torch.nn.functional.interpolate(
            coarse[None], size=self.resolution, mode="bilinear", align_corners=False
        )[0]
        return (image * 255).round().to(torch.uint8)


def build_dataset(cfg: DataConfig, resolution: int, seed: int) -> Dataset:
    """The source's images, read per sample with PIL (uint8, CHW, at `resolution`)."""
    return SOURCES[cfg.source].dataset(cfg, resolution, seed)


def report_unreadable(unreadable: list[tuple[str, str]], total: int, root: Path, policy: str, warn: bool) -> None:
    """Stop (DataError) or, with data.bad_files=skip, warn: count and the first few paths."""
    if not unreadable:
        return
    listed = ", ".join(f"{path} ({reason})" for path, reason in unreadable[:3])
    more = f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
    summary = f"{len(unreadable)} of {total} image files under data.root={str(root)!r} are unreadable: {listed}{more}"
    if policy != "skip":
        raise DataError(f"{summary}; fix or remove them, or set data.bad_files=skip to train without them")
    if len(unreadable) == total:
        raise DataError(f"{summary}: no readable image is left; point data.root at a folder of images")
    if warn:
        warnings.warn(f"{summary}; skipped (data.bad_files=skip)", stacklevel=3)


def build_packed(cfg: DataConfig, resolution: int) -> PackedImages:
    """The source decoded once into the packed cache (built on first use, then reused)."""
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else user_cache_dir("packed")
    return SOURCES[cfg.source].pack(cfg, resolution, cache_dir)


def scan_files(files: list[Path]) -> tuple[list[tuple[str, str]], list[str]]:
    """(path, reason) of every file PIL cannot fully decode (zero-byte, truncated, not an image), and
    the paths of files with an alpha channel.

    A full decode, because a truncated JPEG passes `Image.verify()`; PIL releases the GIL while
    decoding, so threads scale (about 8k CIFAR-size JPEGs per second per core).
    """

    def check(path: Path) -> tuple[str, str] | bool:
        try:
            with Image.open(path) as image:
                image.load()
                return has_alpha(image)
        except Exception as exc:  # PIL raises many types: UnidentifiedImageError, OSError, SyntaxError...
            return str(path), unreadable_reason(path, exc)

    with ThreadPoolExecutor(min(32, os.cpu_count() or 1)) as pool:
        found = list(pool.map(check, files))
    unreadable = [f for f in found if isinstance(f, tuple)]
    return unreadable, [str(path) for path, f in zip(files, found, strict=True) if f is True]


def warn_alpha(with_alpha: list[str], total: int) -> None:
    if with_alpha:
        warnings.warn(
            f"{len(with_alpha)} of {total} images have an alpha channel (e.g. {with_alpha[0]}): transparent "
            "pixels are composited onto black",
            stacklevel=3,
        )


def prepare_data(cfg: DataConfig, resolution: int, seed: int) -> dict[str, Any]:
    """The dataset's one-time work, on one process: download, pack, or scan for unreadable files.

    Returns what every process needs to open the dataset without repeating it (JSON-able: it travels
    through the launcher's store); bad input stops the run here (DataError), before training starts.
    """
    if cfg.packed and SOURCES[cfg.source].pack:
        packed = build_packed(cfg, resolution)
        if packed.listing is not None:
            packed.listing.warn_ignored()
        total = len(packed) + len(packed.unreadable)
        report_unreadable(packed.unreadable, total, Path(cfg.root), cfg.bad_files, warn=True)
        warn_alpha(packed.meta.get("alpha", []), total)
        return {"pack": str(packed.path)}
    dataset = build_dataset(cfg, resolution, seed)  # CIFAR-10: downloaded and unpacked here
    if isinstance(dataset, ImageFiles):
        dataset.warn_ignored()
        unreadable, with_alpha = scan_files(dataset.files)
        report_unreadable(unreadable, len(dataset.files), dataset.root, cfg.bad_files, warn=True)
        warn_alpha(with_alpha, len(dataset.files))
        return {"unreadable": unreadable}
    return {}


def open_dataset(cfg: DataConfig, resolution: int, seed: int, prepared: dict[str, Any]) -> Dataset:
    """The dataset of a run, the same on every process, from what `prepare_data` left.

    The packed file is opened by the path the preparing process found: no process walks or stats the
    folder again to compute its key.
    """
    if "pack" in prepared:
        return PackedImages.open(Path(prepared["pack"]))
    # nothing is downloaded here: the preparing process did it
    dataset = build_dataset(dataclasses.replace(cfg, download=False), resolution, seed)
    if isinstance(dataset, ImageFiles):
        dataset.drop(prepared["unreadable"])
    return dataset


def load_dataset(cfg: DataConfig, resolution: int, seed: int) -> Dataset:
    """`prepare_data` then `open_dataset`, in this one process (the benchmark, tools, tests)."""
    return open_dataset(cfg, resolution, seed, prepare_data(cfg, resolution, seed))


# ---- the sources -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """A value of data.source."""

    # (settings, resolution, seed) -> the images, per sample with PIL: uint8 CHW at the resolution
    dataset: Callable[[DataConfig, int, int], Dataset]
    # (settings, resolution, cache dir) -> the images decoded once into the packed cache; None: never packed
    pack: Callable[[DataConfig, int, Path], PackedImages] | None
    # (settings, run seed) -> what reference statistics of these images depend on, besides the resolution
    identity: Callable[[DataConfig, int], dict[str, Any]]
    # (settings, resolution, run seed, transform) -> (image, label) pairs as torchvision reads them, for
    # the classic DCGAN loop that trainer.bench compares with
    classic: Callable[[DataConfig, int, int, Callable], Any]
    # (settings, resolution) -> the source's held-out images (eval.split=test); None: it has none
    test_set: Callable[[DataConfig, int], Dataset] | None = None
    needs_root: bool = True  # data.root must name a directory


def _pack_folder(cfg: DataConfig, resolution: int, cache_dir: Path) -> PackedImages:
    listing = ImageFiles(cfg.root, transform=None)
    key = {"source": "folder", "files": file_fingerprint(listing.root, listing.files), "resolution": resolution}
    return open_or_build(cache_dir, key, lambda out: pack_files(listing.files, resolution, out), listing)


def _cifar(images: type[CIFAR10Images], source: str) -> Source:
    """A CIFAR set through torchvision: its training set; eval.split=test: its test set."""

    def pack(cfg: DataConfig, resolution: int, cache_dir: Path) -> PackedImages:
        cifar = images(cfg.root, cfg.download, transform=None).dataset
        batches = Path(cifar.root) / cifar.base_folder
        files = sorted(batches / name for name, _ in cifar.train_list)
        key = {"source": source, "split": "train", "files": file_fingerprint(batches, files), "resolution": resolution}
        return open_or_build(cache_dir, key, lambda out: pack_array(cifar.data, resolution, out))

    return Source(
        dataset=lambda cfg, res, seed: images(cfg.root, cfg.download, pil_to_uint8(res)),
        pack=pack,
        identity=lambda cfg, seed: {"root": str(Path(cfg.root).resolve())},
        classic=lambda cfg, res, seed, transform: images.torchvision_class()(
            cfg.root, download=cfg.download, transform=transform
        ),
        test_set=lambda cfg, res: images(cfg.root, cfg.download, pil_to_uint8(res), train=False),
    )


def _folder_identity(cfg: DataConfig, seed: int) -> dict[str, Any]:
    """A folder can change in place: its listing (names and sizes) is part of the identity."""
    root = Path(cfg.root)
    identity = {"root": str(root.resolve())}
    if root.is_dir():
        digest = hashlib.sha256()
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            digest.update(f"{path.relative_to(root)}\0{path.stat().st_size}\n".encode())
        identity["listing"] = digest.hexdigest()[:16]
    return identity


def _classic_fake(cfg: DataConfig, resolution: int, seed: int, transform: Callable) -> list:
    from torchvision.transforms.functional import to_pil_image

    fake = FakeImages(cfg.fake_size, resolution, seed)
    return [(transform(to_pil_image(fake[i])), 0) for i in range(len(fake))]


def _classic_folder(cfg: DataConfig, resolution: int, seed: int, transform: Callable) -> Dataset:
    from torchvision.datasets import ImageFolder

    return ImageFolder(root=cfg.root, transform=transform)


SOURCES: dict[str, Source] = {
    "cifar10": _cifar(CIFAR10Images, "cifar10"),
    "cifar100": _cifar(CIFAR100Images, "cifar100"),
    # every image under data.root, e.g. an ImageFolder tree
    "folder": Source(
        dataset=lambda cfg, res, seed: ImageFiles(cfg.root, pil_to_uint8(res)),
        pack=_pack_folder,
        identity=_folder_identity,
        classic=_classic_folder,
    ),
    # generated colour blobs, for tests
    "fake": Source(
        dataset=lambda cfg, res, seed: FakeImages(cfg.fake_size, res, seed),
        pack=None,  # generated on the fly: nothing to decode
        identity=lambda cfg, seed: {"fake_size": cfg.fake_size, "seed": seed},
        classic=_classic_fake,
        needs_root=False,
    ),
}


def build_dataloader(dataset: Dataset, global_batch: int, num_workers: int) -> DataLoader:
    """A loader of GLOBAL batches; `accelerator.prepare` (split_batches=True) hands each rank its slice.

    drop_last keeps every step a full global batch, so every rank's BatchNorm sees the same
    number of samples and every epoch has the same number of steps.
    """
    if len(dataset) < global_batch:
        raise DataError(
            f"the dataset has {len(dataset)} images, fewer than one global batch (train.batch_size={global_batch}); "
            "lower train.batch_size or add images"
        )
    packed = isinstance(dataset, PackedImages)
    return DataLoader(
        dataset,
        batch_size=global_batch,
        shuffle=True,
        drop_last=True,
        collate_fn=whole_batch if packed else None,
        num_workers=0 if packed else num_workers,  # a batch is one memory-map index: workers only add IPC
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0 and not packed,
    )


def to_model_input(batch: torch.Tensor, resolution: int | None = None, channels_last: bool = False) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] on whatever device the batch is, resized there if needed.

    Upsampling (CIFAR-10's 32 -> 64) is bilinear like the classic PIL `Resize`; downsampling
    uses antialiasing like PIL does.
    """
    images = batch.float()
    if resolution is not None and images.shape[-1] != resolution:
        antialias = images.shape[-1] > resolution
        images = F.interpolate(
            images, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=antialias
        ).clamp_(0, 255)
    images = images.div_(127.5).sub_(1.0)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generated float [-1, 1] -> uint8 [0, 255], quantized like real data (the inverse of the loader's scaling).

    Rounds half up, as torchvision's `save_image` does, so a saved PNG holds exactly these values.
    """
    return images.float().add(1.0).mul_(127.5).add_(0.5).clamp_(0, 255).to(torch.uint8)
