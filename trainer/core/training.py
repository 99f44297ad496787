"""What a training run trains with, built in one place: the networks, their optimizers, the loader,
the EMA, the GAN step, all through `accelerator.prepare`.

Used by the training loop and by the benchmark (`python -m trainer.bench`), so the benchmark times
exactly the step that training runs: the same wrapping, compilation, precision and loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from trainer.core.config import Config
from trainer.core.data import build_dataloader, to_model_input
from trainer.core.ema import GeneratorEMA
from trainer.core.models import build_networks
from trainer.core.step import GANStep


@dataclass
class Training:
    generator: nn.Module  # prepared: DDP, autocast and compile wrappers on
    discriminator: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    loader: DataLoader
    gan_step: GANStep
    ema: GeneratorEMA | None
    unwrapped_g: nn.Module  # the plain generator module: DDP, compile and autocast wrappers stay on the training path
    resolution: int
    channels_last: bool

    def step(self, batch: torch.Tensor, step: int, attempt: int = 0) -> dict[str, torch.Tensor]:
        """One training step on a uint8 batch: scale (and resize) on the device, the GAN update, the EMA."""
        metrics = self.gan_step(to_model_input(batch, self.resolution, self.channels_last), step, attempt)
        if self.ema:
            self.ema.update(self.unwrapped_g)
        return metrics


def build_training(cfg: Config, accelerator: Accelerator, use_sync_bn: bool, dataset: Dataset) -> Training:
    loader = build_dataloader(dataset, cfg.train.batch_size, cfg.data.num_workers)
    generator, discriminator, opt_g, opt_d = build_networks(cfg, accelerator, use_sync_bn)
    ema = GeneratorEMA(generator, cfg.train.ema_decay, accelerator) if cfg.train.ema_decay else None  # before prepare
    # Order matters: Accelerate saves them as model (G) / model_1 (D), optimizer / optimizer_1.
    generator, discriminator, opt_g, opt_d, loader = accelerator.prepare(generator, discriminator, opt_g, opt_d, loader)
    cuda_graphs = cfg.train.compile and cfg.train.compile_mode != "default" and accelerator.device.type == "cuda"
    gan_step = GANStep(
        accelerator, generator, discriminator, opt_g, opt_d, cfg.model.nz, cfg.run.seed, cuda_graphs, cfg.train.loss
    )
    return Training(
        generator,
        discriminator,
        opt_g,
        opt_d,
        loader,
        gan_step,
        ema,
        accelerator.unwrap_model(generator, keep_torch_compile=False),
        cfg.model.resolution,
        cfg.train.channels_last,
    )
