"""A tiny CIFAR-10 in torchvision's `cifar-10-batches-py` layout (and a tiny CIFAR-100 in its
`cifar-100-python` one), and the checksums that accept it.

torchvision's CIFAR10 checks the md5 of every batch file against the real dataset's, with
download=False as with download=True (`_check_integrity`, then `_load_meta`), and no small file set
can have those md5s. So `write_cifar10` writes the pickled dicts the real files hold (`data`: N rows
of 3072 uint8, the R, G and B planes of a 32x32 image; `labels`; `batches.meta` with
`label_names`) and records their md5s, and `accept` puts those md5s where torchvision looks for the
real ones: its own verification then runs, on these files, and a damaged one still fails it.

Run as a script, it accepts the set under the config's data.root and runs the trainer exactly as
trainer/train.py does: `python tests/standin_cifar10.py --config ... data.source=cifar10 data.root=DIR`.
"""

from __future__ import annotations

import trainer  # noqa: F401  (installs the torchvision import shim: see trainer/util/compat.py)

# isort: split

import hashlib
import json
import pickle
import sys
from pathlib import Path

import numpy as np
from torchvision.datasets import CIFAR10, CIFAR100

from trainer.core.data import FakeImages

CHECKSUMS = "standin-md5.json"  # beside cifar-10-batches-py/, where the real tarball would be


def write_cifar10(root: Path, per_batch: int = 16, test_size: int = 16) -> np.ndarray:
    """Five training batches of `per_batch` images and a test batch; returns the training images (N, 3, 32, 32)."""
    base = root / CIFAR10.base_folder
    base.mkdir(parents=True, exist_ok=True)
    names = [name for name, _ in CIFAR10.train_list] + [name for name, _ in CIFAR10.test_list]
    sizes = [per_batch] * len(CIFAR10.train_list) + [test_size]
    images = FakeImages(sum(sizes), 32, seed=10)  # colour blobs: every image different
    start, train = 0, []
    for name, size in zip(names, sizes, strict=True):
        chw = np.stack([images[i].numpy() for i in range(start, start + size)])
        start += size
        batch = {"batch_label": name, "labels": [i % 10 for i in range(size)], "data": chw.reshape(size, 3072)}
        (base / name).write_bytes(pickle.dumps(batch))
        if name != CIFAR10.test_list[0][0]:
            train.append(chw)
    (base / CIFAR10.meta["filename"]).write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    md5s = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in base.iterdir()}
    (root / CHECKSUMS).write_text(json.dumps(md5s))
    return np.concatenate(train)


def write_cifar100(root: Path, train_size: int = 48, test_size: int = 16) -> np.ndarray:
    """CIFAR-100's layout (`cifar-100-python/`: one `train` and one `test` file with fine and coarse
    labels, `meta` with the label names); returns the training images (N, 3, 32, 32)."""
    base = root / CIFAR100.base_folder
    base.mkdir(parents=True, exist_ok=True)
    images = FakeImages(train_size + test_size, 32, seed=11)
    chw = np.stack([images[i].numpy() for i in range(train_size + test_size)])
    for name, part in (("train", chw[:train_size]), ("test", chw[train_size:])):
        labels = [i % 100 for i in range(len(part))]
        batch = {
            "data": part.reshape(len(part), 3072),
            "fine_labels": labels,
            "coarse_labels": [i // 5 for i in labels],
        }
        (base / name).write_bytes(pickle.dumps(batch))
    meta = {
        "fine_label_names": [f"fine{i}" for i in range(100)],
        "coarse_label_names": [f"coarse{i}" for i in range(20)],
    }
    (base / CIFAR100.meta["filename"]).write_bytes(pickle.dumps(meta))
    md5s = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in base.iterdir()}
    (root / CHECKSUMS).write_text(json.dumps(md5s))
    return chw[:train_size]


def accepted_checksums_100(root: Path) -> dict:
    """The class attributes of torchvision's CIFAR100 that accept the set under `root`."""
    md5s = json.loads((root / CHECKSUMS).read_text())
    return {
        "train_list": [["train", md5s["train"]]],
        "test_list": [["test", md5s["test"]]],
        "meta": {**CIFAR100.meta, "md5": md5s[CIFAR100.meta["filename"]]},
    }


def accepted_checksums(root: Path) -> dict:
    """The class attributes of torchvision's CIFAR10 that accept the set under `root` (for setattr)."""
    md5s = json.loads((root / CHECKSUMS).read_text())
    return {
        "train_list": [[name, md5s[name]] for name, _ in CIFAR10.train_list],
        "test_list": [[name, md5s[name]] for name, _ in CIFAR10.test_list],
        "meta": {**CIFAR10.meta, "md5": md5s[CIFAR10.meta["filename"]]},
    }


if __name__ == "__main__":
    from trainer.core.config import parse_args
    from trainer.train import main

    for attribute, value in accepted_checksums(Path(parse_args(sys.argv[1:]).data.root)).items():
        setattr(CIFAR10, attribute, value)
    sys.exit(main(sys.argv[1:]))
