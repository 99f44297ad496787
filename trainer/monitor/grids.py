"""Sample grids a run leaves for people: the fixed-noise grids of the generator, and a grid of real images."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.utils import save_image

from trainer.util.atomic import write_atomic


def fixed_noise(count: int, nz: int, seed: int) -> torch.Tensor:
    """The same latent vectors for every grid of a run (and across resumes)."""
    return torch.randn(count, nz, generator=torch.Generator().manual_seed(seed))


def _save_grid(images: torch.Tensor, path: Path) -> None:
    write_atomic(
        path,
        lambda tmp: save_image(
            images.float(), tmp, format="png", nrow=8, normalize=True, value_range=(-1, 1), padding=2
        ),
    )


@torch.no_grad()
def generate_grid(generator: nn.Module, noise: torch.Tensor, autocast) -> torch.Tensor:
    """The grid's images. `generator` must be the unwrapped module: a DDP forward on rank 0 alone
    would hang the others.

    Eval mode uses BatchNorm's running statistics, so the grid neither updates them nor needs
    the other ranks (SyncBatchNorm in train mode would wait for them).
    """
    was_training = generator.training
    generator.eval()
    try:
        with autocast():
            return generator(noise.to(next(generator.parameters()).device))
    finally:
        generator.train(was_training)


def save_generator_grid(generator: nn.Module, noise: torch.Tensor, path: Path, autocast) -> None:
    _save_grid(generate_grid(generator, noise, autocast), path)


def save_real_grid(images: torch.Tensor, path: Path) -> None:
    """`images` as the model sees them: resized, in [-1, 1]."""
    _save_grid(images, path)
