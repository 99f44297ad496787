"""Train and calibrate the offline quality measure's classifier (`cifar10-classifier`).

The network, its torch-fidelity extractor and where its weights live belong to the package
(trainer/quality/classifier.py: all that evaluation needs). Training it on the CIFAR-10 JPEG copy
and calibrating the measure on real, blurred and noisy images are tooling, run from a checkout:

    python -m tools.classifier train --data <cifar10-jpg>            # once: about 9 minutes on one CPU thread
    python -m tools.classifier calibrate --data <cifar10-jpg> --out calibration.md

`train` writes the weights where evaluation looks for them (`<user cache>/dcgan-trainer/classifier/`,
named by a hash of the recipe) unless `--out` says otherwise.
"""

from __future__ import annotations

import trainer  # noqa: F401  (installs the torchvision import shim)

# isort: split

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from trainer.core.data import to_model_input, to_uint8
from trainer.quality.classifier import (
    ARCH_VERSION,
    CLASSES,
    NAME,
    Recipe,
    SmallConvNet,
    default_weights_path,
    to_input,
)
from trainer.quality.fid import (
    Reference,
    compute_metrics,
    extract,
    fid_statistics,
    layers_for,
    load_feature_extractor,
    resolve_weights,
)
from trainer.util.atomic import write_atomic
from trainer.util.errors import UserError
from trainer.util.paths import user_cache_dir


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
    """Atomic (trainer.util.atomic), so evaluation never reads half a file."""
    tensors = {k: v.detach().contiguous() for k, v in network.state_dict().items()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata))


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
    parser = argparse.ArgumentParser(prog="python -m tools.classifier", description=__doc__.split("\n\n")[0])
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
