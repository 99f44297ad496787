"""An offline quality measure: a small CIFAR-10 classifier as a torch-fidelity feature extractor.

Real FID needs the InceptionV3 weights, which machines without internet cannot fetch. This module
trains a small convnet on the CIFAR-10 JPEG copy once (about 9 minutes on one CPU thread) and
registers it with torch-fidelity as `cifar10-classifier`: its penultimate features (global average
pool, 256-d) feed the library's FID and KID maths, its logits the Inception Score's. The numbers are
comparable with each other (same weights), never with published Inception FIDs.

    python -m trainer.quality.classifier train --data <cifar10-jpg>            # once
    python -m trainer.quality.classifier calibrate --data <cifar10-jpg> --out docs/calibration.md
    python -m trainer.evaluate runs/x eval.feature_extractor=cifar10-classifier

Weights live outside the repository in `<user cache>/dcgan-trainer/classifier/`, named by a hash of
the training recipe (`Recipe`), as safetensors; `eval.feature_extractor_weights` points elsewhere.
"""

from __future__ import annotations

import trainer  # noqa: F401  (installs the torchvision import shim)

# isort: split

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from trainer.core.config import user_cache_dir
from trainer.core.data import to_model_input, to_uint8
from trainer.util.errors import EvaluationError, UserError

NAME = "cifar10-classifier"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ARCH_VERSION = 1  # bump when SmallConvNet or `to_input` change: it is part of the weights' cache key
# Per-channel statistics of the CIFAR-10 training set, fixed so that inputs never depend on the data at hand.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
TRAIN_COMMAND = "python -m trainer.quality.classifier train --data <cifar10-jpg root with train/ and test/>"


@dataclass(frozen=True)
class Recipe:
    """Everything the trained weights depend on; its hash names the weights file."""

    widths: tuple[int, ...] = (32, 64, 128, 256)
    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.2  # peak of a one-cycle schedule (linear warm-up, then linear decay to 0)
    warmup_epochs: float = 2.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: str = "flip+crop4"  # horizontal flips and random 32x32 crops of the 4-pixel reflect-padded image
    precision: str = "bf16"  # autocast on the CPU (AVX512-BF16): about 1.8x fp32 here; the weights stay fp32
    seed: int = 0

    def digest(self) -> str:
        blob = json.dumps({"arch": ARCH_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_weights_path(recipe: Recipe | None = None) -> Path:
    recipe = recipe or Recipe()
    return user_cache_dir("classifier") / f"{NAME}-{recipe.digest()}.safetensors"


# ---- the network -------------------------------------------------------------------------------
class SmallConvNet(nn.Module):
    """Four 3x3 conv-BN-ReLU blocks at 32, 16, 8 and 4 pixels, global average pool, linear classifier.

    About 15 M multiply-adds per image: ~1,600 training images/s on one idle CPU thread in bf16 (measured).
    """

    def __init__(self, widths: tuple[int, ...] = Recipe.widths, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i, width in enumerate(widths):
            if i:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)]
            channels = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate features, logits) of normalised 32x32 input."""
        features = self.body(x).mean(dim=(2, 3))
        return features, self.head(features)


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) of any size -> normalised float 32x32, the classifier's input.

    Downsampling (e.g. a 64x64 generator's output) is antialiased bilinear, as the data path's is;
    generated 64x64 images and real ones upsampled to 64 then take exactly the same path.
    """
    x = images.float()
    if x.shape[-2:] != (32, 32):
        antialias = x.shape[-1] > 32
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=antialias)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std


def load_network(path: Path) -> SmallConvNet:
    """The classifier in a weights file written by `train` (its widths ride in the metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    widths = tuple(json.loads(meta["recipe"])["widths"]) if "recipe" in meta else Recipe.widths
    network = SmallConvNet(widths)
    network.load_state_dict(load_file(str(path)))
    return network.eval()


# ---- the torch-fidelity extractor ------------------------------------------------------------------
class ClassifierFeatureExtractor(FeatureExtractorBase):
    """`cifar10-classifier`: penultimate features for FID / KID, logits for the Inception Score.

    Takes uint8 Bx3xHxW images of any size, like torch-fidelity's InceptionV3 (resized to 32 inside).
    """

    FEATURES = ("penultimate", "logits")

    def __init__(
        self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **kwargs
    ) -> None:
        super().__init__(name, features_list)
        path = Path(feature_extractor_weights_path) if feature_extractor_weights_path else classifier_weights(None)
        self.network = load_network(path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ClassifierFeatureExtractor.FEATURES

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "penultimate", "kid": "penultimate", "prc": "penultimate"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    @staticmethod
    def default_weights(configured: str | None) -> Path:
        """Where `trainer.quality.fid.resolve_weights` finds this extractor's weights file."""
        return classifier_weights(configured)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expects uint8 Bx3xHxW images, got {x.dtype} {tuple(x.shape)}")
        features, logits = self.network(to_input(x))
        out = {"penultimate": features, "logits": logits}
        return tuple(out[name].float() for name in self.features_list)


if NAME not in FEATURE_EXTRACTORS_REGISTRY:  # run as `python -m`, this file is imported twice (__main__ and by name)
    register_feature_extractor(NAME, ClassifierFeatureExtractor)


def classifier_weights(configured: str | None) -> Path:
    """`eval.feature_extractor_weights`, else the default recipe's cached file; names the train command if missing."""
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise EvaluationError(
                f"eval.feature_extractor_weights={configured!r} is not a file; train it: {TRAIN_COMMAND}"
            )
        return path
    path = default_weights_path()
    if not path.is_file():
        raise EvaluationError(
            f"the {NAME} weights are not at {path}: train them once (a few CPU minutes) with "
            f"`{TRAIN_COMMAND}`, or set eval.feature_extractor_weights=<a .safetensors file>"
        )
    return path


# ---- data ----------------------------------------------------------------------------------------
def load_split(root: Path, split: str, limit: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 (N, 3, 32, 32), int64 labels) of `root/split/<class>/*`, ImageFolder order; `limit`: a seeded subset."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise UserError(f"{folder} is not a directory; --data must hold train/<class>/ and test/<class>/ folders")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if tuple(classes) != tuple(sorted(CLASSES)):
        raise UserError(f"{folder} has class folders {classes}; expected the 10 CIFAR-10 classes {sorted(CLASSES)}")
    files = [(f, CLASSES.index(c)) for c in classes for f in sorted((folder / c).iterdir()) if f.is_file()]
    if limit is not None and limit < len(files):
        picks = np.random.default_rng(seed).permutation(len(files))[:limit]
        files = [files[i] for i in sorted(picks)]
    images = np.empty((len(files), 32, 32, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(files):
        with Image.open(path) as im:
            images[i] = np.asarray(
                im.convert("RGB").resize((32, 32), Image.BILINEAR) if im.size != (32, 32) else im.convert("RGB")
            )
    labels = torch.tensor([label for _, label in files], dtype=torch.long)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and random 32x32 crops of the 4-pixel reflect-padded uint8 batch."""
    n = images.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip.view(n, 1, 1, 1), images.flip(3), images)
    padded = F.pad(images.float(), (4, 4, 4, 4), mode="reflect")
    dx, dy = torch.randint(0, 9, (2, n), generator=generator).tolist()
    return torch.stack([padded[i, :, y : y + 32, x : x + 32] for i, (x, y) in enumerate(zip(dx, dy, strict=True))])


# ---- training ------------------------------------------------------------------------------------
@torch.no_grad()
def accuracy(network: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    network.eval()
    correct = 0
    for x, y in zip(images.split(batch), labels.split(batch), strict=True):
        correct += int((network(to_input(x))[1].argmax(1) == y).sum())
    return correct / len(labels)


def train_classifier(
    train: tuple[torch.Tensor, torch.Tensor],
    recipe: Recipe,
    log: Callable[[str], None] = print,
) -> SmallConvNet:
    """SGD with Nesterov momentum on a one-cycle schedule; autocast per `recipe.precision`."""
    images, labels = train
    torch.manual_seed(recipe.seed)
    network = SmallConvNet(recipe.widths).to(memory_format=torch.channels_last)  # oneDNN's fast layout
    decay = [p for p in network.parameters() if p.dim() > 1]  # no weight decay on BatchNorm and biases
    rest = [p for p in network.parameters() if p.dim() <= 1]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=recipe.lr,
        momentum=recipe.momentum,
        nesterov=True,
    )
    steps_per_epoch = len(labels) // recipe.batch_size
    total, warmup = recipe.epochs * steps_per_epoch, recipe.warmup_epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total - s) / (total - warmup))
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    start = time.perf_counter()
    for epoch in range(recipe.epochs):
        network.train()
        order = torch.randperm(len(labels), generator=generator)[: steps_per_epoch * recipe.batch_size]
        running = 0.0
        for idx in order.view(steps_per_epoch, recipe.batch_size):
            x = to_input(augment(images[idx], generator)).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.precision == "bf16"):
                loss = F.cross_entropy(network(x)[1].float(), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += float(loss.detach())
        log(
            f"epoch {epoch + 1}/{recipe.epochs}: loss {running / steps_per_epoch:.3f}, {time.perf_counter() - start:.0f}s"
        )
    return network.to(memory_format=torch.contiguous_format).eval()


def save_weights(network: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Atomic (temporary file + rename), so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        save_file({k: v.detach().contiguous() for k, v in network.state_dict().items()}, str(tmp), metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def command_train(args: argparse.Namespace) -> int:
    recipe = Recipe(epochs=args.epochs) if args.epochs else Recipe()
    out = Path(args.out) if args.out else default_weights_path(recipe)
    if out.exists() and not args.force:
        print(f"{out} exists (recipe {recipe.digest()}); nothing to do (--force retrains it)")
        return 0
    replacing = out.exists()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train_set = load_split(Path(args.data), "train")
    test_set = load_split(Path(args.data), "test")
    print(f"loaded {len(train_set[1])} train and {len(test_set[1])} test images in {time.perf_counter() - start:.0f}s")
    start = time.perf_counter()
    network = train_classifier(train_set, recipe)
    train_s = time.perf_counter() - start
    test_acc = accuracy(network, *test_set)
    meta = {
        "recipe": json.dumps({"arch": ARCH_VERSION, **asdict(recipe)}),
        "test_accuracy": f"{test_acc:.4f}",
        "train_seconds": f"{train_s:.0f}",
        "threads": str(args.threads),
        "data": str(Path(args.data).resolve()),
    }
    save_weights(network, out, meta)
    print(f"test accuracy {test_acc:.2%}; trained in {train_s:.0f}s on {args.threads} thread(s); saved {out}")
    if replacing:  # the reference-statistics cache knows the weights by file name only
        print(
            f"note: delete cached reference statistics made with the old weights ({user_cache_dir('reference-stats')})"
        )
    return 0


# ---- calibration ---------------------------------------------------------------------------------
def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    from torchvision.transforms.functional import gaussian_blur

    size = 2 * math.ceil(2 * sigma) + 1
    return gaussian_blur(images, [size, size], [sigma, sigma])


def _noisy(images: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=generator) * std
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


def _upsampled(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Real images through the trainer's data path at `resolution`, then quantized as generated images are."""
    return to_uint8(to_model_input(images, resolution))


def command_calibrate(args: argparse.Namespace) -> int:
    # Imported here: trainer.quality.fid finds this module's extractor through torch-fidelity's registry.
    from trainer.quality.fid import (
        Reference,
        compute_metrics,
        extract,
        fid_statistics,
        layers_for,
        load_feature_extractor,
        resolve_weights,
    )

    torch.set_num_threads(args.threads)
    weights = resolve_weights(NAME, args.weights)
    extractor = load_feature_extractor(NAME, weights)
    layers = layers_for(NAME)
    test, test_labels = load_split(Path(args.data), "test")
    real, _ = load_split(Path(args.data), "train", limit=args.num, seed=1)

    def features(images: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = [extract(extractor, chunk) for chunk in images.split(500)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    ref_features = features(test)
    stats = fid_statistics(ref_features[layers.fid])
    reference = Reference(stats["mu"], stats["sigma"], ref_features[layers.kid], Path("test"))
    g = torch.Generator().manual_seed(0)
    variants: list[tuple[str, Callable[[], torch.Tensor]]] = [
        ("real train images (32x32)", lambda: real),
        ("real train, upsampled to 64 (data path) and back", lambda: _upsampled(real, 64)),
        ("real train, Gaussian blur sigma 0.5 px", lambda: _blur(real, 0.5)),
        ("real train, Gaussian blur sigma 1 px", lambda: _blur(real, 1.0)),
        ("real train, Gaussian blur sigma 2 px", lambda: _blur(real, 2.0)),
        ("real train + Gaussian noise std 8/255", lambda: _noisy(real, 8.0, g)),
        ("real train + Gaussian noise std 32/255", lambda: _noisy(real, 32.0, g)),
        ("uniform noise images", lambda: torch.randint(0, 256, real.shape, dtype=torch.uint8, generator=g)),
    ]
    rows = [
        f"`{NAME}` ({weights.name}); reference: the {len(test_labels)} CIFAR-10 test images; "
        f"each row {len(real)} images; FID/KID on penultimate features, classifier score = IS on logits",
        "",
        "| images | FID (classifier) | KID x 1000 | classifier score |",
        "|---|---:|---:|---:|",
    ]
    for label, make in variants:
        start = time.perf_counter()
        m = compute_metrics(reference, features(make()), layers, kid_subsets=100, kid_subset_size=1000)
        rows.append(
            f"| {label} | {m['fid']:.2f} | {1000 * m['kid_mean']:.2f} | {m['is_mean']:.2f} ± {m['is_std']:.2f} |"
        )
        print(rows[-1], f"({time.perf_counter() - start:.0f}s)", flush=True)
    m = compute_metrics(reference, ref_features, layers, 100, 1000)
    rows.append(
        f"| (test images themselves: the classifier score's real-data value) | 0 | - | {m['is_mean']:.2f} ± {m['is_std']:.2f} |"
    )
    text = "\n".join(rows) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.quality.classifier", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the classifier once and cache its weights")
    t.add_argument("--data", required=True, help="CIFAR-10 JPEG root holding train/<class>/ and test/<class>/")
    t.add_argument("--out", help=f"weights file (default: {default_weights_path()})")
    t.add_argument("--epochs", type=int, help=f"override the recipe's {Recipe.epochs} epochs (another cache key)")
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    t.add_argument("--force", action="store_true", help="retrain even if the weights file exists")
    c = sub.add_parser("calibrate", help="the measure on real, upsampled, blurred and noisy images")
    c.add_argument("--data", required=True, help="CIFAR-10 JPEG root holding train/ and test/")
    c.add_argument("--weights", help="weights file (default: the cached default recipe)")
    c.add_argument("--num", type=int, default=10000, help="train images per row (default 10000)")
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--out", help="also write the Markdown table here")
    args = parser.parse_args(argv)
    try:
        return command_train(args) if args.command == "train" else command_calibrate(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
