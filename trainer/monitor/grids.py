"""What a run leaves for people: fixed-noise sample grids, a grid of real images, final weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.utils import save_image

from trainer.core.config import ModelConfig


def fixed_noise(count: int, nz: int, seed: int) -> torch.Tensor:
    """The same latent vectors for every grid of a run (and across resumes)."""
    return torch.randn(count, nz, generator=torch.Generator().manual_seed(seed))


def _atomic_save_image(images: torch.Tensor, path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    save_image(images.float(), tmp, format="png", nrow=8, normalize=True, value_range=(-1, 1), padding=2)
    os.replace(tmp, path)


@torch.no_grad()
def save_generator_grid(generator: nn.Module, noise: torch.Tensor, path: Path, autocast) -> None:
    """`generator` must be the unwrapped module: a DDP forward on rank 0 alone would hang the others.

    Eval mode uses BatchNorm's running statistics, so the grid neither updates them nor needs
    the other ranks (SyncBatchNorm in train mode would wait for them).
    """
    was_training = generator.training
    generator.eval()
    try:
        with autocast():
            images = generator(noise.to(next(generator.parameters()).device))
    finally:
        generator.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save_image(images, path)


def save_real_grid(images: torch.Tensor, path: Path) -> None:
    """`images` as the model sees them: resized, in [-1, 1]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save_image(images, path)


def export_weights(module: nn.Module, path: Path, model_cfg: ModelConfig, step: int) -> None:
    """A safetensors file that needs no trainer to read; the model settings ride in its metadata."""
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    metadata = {"model": json.dumps(vars(model_cfg)), "step": str(step), "format": "pt"}
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)
