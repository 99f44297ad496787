"""An offline quality measure: a small CIFAR-10 classifier as a torch-fidelity feature extractor.

Real FID needs the InceptionV3 weights, which machines without internet cannot fetch. A small
convnet, trained once on the CIFAR-10 JPEG copy (about 9 minutes on one CPU thread), is registered
here with torch-fidelity as `cifar10-classifier`: its penultimate features (global average pool,
256-d) feed the library's FID and KID maths, its logits the Inception Score's. The numbers are
comparable with each other (same weights), never with published Inception FIDs.

This module is what evaluation needs: the network, the extractor and where its weights are. Training
and calibrating it are tooling, run from a checkout of the repository (tools/classifier.py):

    python -m tools.classifier train --data <cifar10-jpg>            # once
    python -m tools.classifier calibrate --data <cifar10-jpg> --out calibration.md
    python -m trainer.evaluate runs/x eval.feature_extractor=cifar10-classifier

Weights live outside the repository in `<user cache>/dcgan-trainer/classifier/`, named by a hash of
the training recipe (`Recipe`), as safetensors; `eval.feature_extractor_weights` points elsewhere.
"""

from __future__ import annotations

import trainer  # noqa: F401  (installs the torchvision import shim)

# isort: split

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from trainer.util.errors import EvaluationError
from trainer.util.paths import user_cache_dir

NAME = "cifar10-classifier"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ARCH_VERSION = 1  # bump when SmallConvNet or `to_input` change: it is part of the weights' cache key
# Per-channel statistics of the CIFAR-10 training set, fixed so that inputs never depend on the data at hand.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
# Training needs the repository (tools/classifier.py), not only the installed package.
TRAIN_COMMAND = "python -m tools.classifier train --data <cifar10-jpg root with train/ and test/>"


@dataclass(frozen=True)
class Recipe:
    """Everything the trained weights depend on; its hash names the weights file (tools/classifier.py trains it)."""

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
    """The classifier in a weights file written by `python -m tools.classifier train` (its widths ride in the metadata)."""
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


if NAME not in FEATURE_EXTRACTORS_REGISTRY:  # torch-fidelity refuses to register a name twice
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
            f"the {NAME} weights are not at {path}: train them once (a few CPU minutes), from a checkout of "
            f"the repository, with `{TRAIN_COMMAND}`, or set eval.feature_extractor_weights=<a .safetensors file>"
        )
    return path
