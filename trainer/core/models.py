"""The DCGAN generator and discriminator (Radford et al. 2015; the PyTorch DCGAN example).

At 64x64 these are exactly the classic nets: G is transposed convs nz-512-256-128-64-3 with
BatchNorm+ReLU and Tanh; D is convs 3-64-128-256-512-1 with BatchNorm (none on the first layer)
and LeakyReLU(0.2). Other powers of two add or drop a middle block. D returns logits: the loss is
BCE-with-logits, the same objective as Sigmoid+BCE but stable under autocast.
"""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from torch import nn

from trainer.core.config import Config, ModelConfig


def _num_blocks(resolution: int) -> int:
    """Number of 2x up/down-sampling blocks between 4x4 and `resolution`."""
    return int(math.log2(resolution)) - 2


class Generator(nn.Module):
    def __init__(self, nz: int = 100, ngf: int = 64, resolution: int = 64) -> None:
        super().__init__()
        self.nz = nz
        n = _num_blocks(resolution)
        ch = ngf * 2 ** (n - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(nz, ch, 4, 1, 0, bias=False),  # 1x1 -> 4x4
            nn.BatchNorm2d(ch),
            nn.ReLU(True),
        ]
        for _ in range(n - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, 3, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z.view(z.shape[0], self.nz, 1, 1))


class Discriminator(nn.Module):
    def __init__(self, ndf: int = 64, resolution: int = 64) -> None:
        super().__init__()
        n = _num_blocks(resolution)
        layers: list[nn.Module] = [nn.Conv2d(3, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        ch = ndf
        for _ in range(n - 1):
            layers += [
                nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(ch * 2),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            ch *= 2
        layers += [nn.Conv2d(ch, 1, 4, 1, 0, bias=False)]  # 4x4 -> 1x1 logit
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).view(-1)


def init_weights(module: nn.Module) -> None:
    """DCGAN init: conv weights N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_models(cfg: ModelConfig, seed: int, sync_bn: bool) -> tuple[Generator, Discriminator]:
    """G and D initialised from `seed` alone, so every rank builds identical weights."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        generator = Generator(cfg.nz, cfg.ngf, cfg.resolution)
        discriminator = Discriminator(cfg.ndf, cfg.resolution)
        generator.apply(init_weights)
        discriminator.apply(init_weights)
    if sync_bn:
        generator = nn.SyncBatchNorm.convert_sync_batchnorm(generator)
        discriminator = nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)
    return generator, discriminator


def build_networks(
    cfg: Config, accelerator: Accelerator, use_sync_bn: bool
) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, torch.optim.Optimizer]:
    """G and D and their Adam optimizers, ready for `accelerator.prepare` (shared with trainer.bench)."""
    generator, discriminator = build_models(cfg.model, cfg.run.seed, use_sync_bn)
    if cfg.train.channels_last:  # NHWC: the layout oneDNN and cuDNN convolutions run fastest in
        generator.to(memory_format=torch.channels_last)
        discriminator.to(memory_format=torch.channels_last)
    fused = accelerator.device.type == "cuda" or None  # one kernel for the whole update on CUDA
    adam = {"lr": cfg.train.lr, "betas": tuple(cfg.train.betas), "fused": fused}
    return (
        generator,
        discriminator,
        torch.optim.Adam(generator.parameters(), **adam),
        torch.optim.Adam(discriminator.parameters(), **adam),
    )
