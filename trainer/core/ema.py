"""An exponential moving average of the generator's weights (`train.ema_decay`), checkpointed with the rest.

After every step, ema = decay * ema + (1 - decay) * G for every floating-point parameter and
buffer (BatchNorm's running statistics too, as torch's `AveragedModel(use_buffers=True)` does);
integer buffers (BatchNorm's batch counter) are copied. The averaging is torch's
`get_ema_multi_avg_fn` (one fused `_foreach_lerp_`); `AveragedModel` itself is not used because
its update reads a device counter on the host every step, a sync the loop avoids.

The EMA lives in every checkpoint as `generator_ema.safetensors` (safetensors, never pickle),
written and read through Accelerate's save/load-state hooks, so every `save_state`/`load_state`
(saves, resume, rollback after divergence) carries it. A checkpoint without one (EMA switched on
mid-run) starts the EMA from that checkpoint's generator.
"""

from __future__ import annotations

import copy
import itertools
import json
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from trainer.core.checkpoint import EMA_FILE, GENERATOR_FILE


class GeneratorEMA:
    def __init__(self, generator: nn.Module, decay: float, accelerator: Accelerator) -> None:
        """`generator` must not have been through `accelerator.prepare` yet: prepare patches the
        module's forward for mixed precision, and the copy must stay a plain full-precision module."""
        self.decay = decay
        self.module = copy.deepcopy(generator).to(accelerator.device).eval().requires_grad_(False)
        self._average = get_ema_multi_avg_fn(decay)
        self._is_main = accelerator.is_main_process
        self._device = accelerator.device
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

    def _pairs(self, generator: nn.Module):
        mine = itertools.chain(self.module.parameters(), self.module.buffers())
        theirs = itertools.chain(generator.parameters(), generator.buffers())
        return zip(mine, theirs, strict=True)

    @torch.no_grad()
    def update(self, generator: nn.Module) -> None:
        """One EMA step towards `generator` (the unwrapped module). Device work only, no host sync."""
        averaged, current = [], []
        for ema, live in self._pairs(generator):
            if ema.is_floating_point():
                averaged.append(ema)
                current.append(live.detach())
            else:
                ema.copy_(live)
        self._average(averaged, current, None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}

    # Accelerate calls these on every rank, inside save_state / load_state.
    def _save_hook(self, models: list, weights: list, output_dir: str) -> None:
        if self._is_main:
            save_file(self.state_dict(), str(Path(output_dir) / EMA_FILE), metadata={"decay": json.dumps(self.decay)})

    def _load_hook(self, models: list, input_dir: str) -> None:
        path = Path(input_dir) / EMA_FILE
        if not path.is_file():
            path = Path(input_dir) / GENERATOR_FILE
            if self._is_main:
                warnings.warn(
                    f"{input_dir} holds no EMA of the generator (trained with train.ema_decay off?); "
                    "the EMA starts from its generator",
                    stacklevel=2,
                )
        self.module.load_state_dict(load_file(str(path), device=str(self._device)))
