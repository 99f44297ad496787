"""One GAN update: the discriminator step, then the generator step.

Returns detached metric tensors and never synchronises with the host, so the loop decides when
to pay for a sync (at log steps only).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn


def step_noise_seed(run_seed: int, rank: int, step: int) -> int:
    """Seed of the latent noise for `step` on `rank`: differs across ranks, fixed across resumes."""
    return int(np.random.SeedSequence([run_seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits, target, dtype=torch.float32))


class GANStep:
    def __init__(
        self,
        accelerator: Accelerator,
        generator: nn.Module,
        discriminator: nn.Module,
        opt_g: torch.optim.Optimizer,
        opt_d: torch.optim.Optimizer,
        nz: int,
        run_seed: int,
    ) -> None:
        self.acc = accelerator
        self.G, self.D = generator, discriminator
        self.opt_g, self.opt_d = opt_g, opt_d
        self.nz = nz
        self.run_seed = run_seed
        self.noise = torch.Generator(device=accelerator.device)

    def __call__(self, real: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        acc, G, D = self.acc, self.G, self.D
        self.noise.manual_seed(step_noise_seed(self.run_seed, acc.process_index, step))
        z = torch.randn(real.shape[0], self.nz, device=real.device, generator=self.noise)
        fake = G(z)

        # D step: maximise log D(x) + log(1 - D(G(z))). Real and fake go through D separately, so
        # each BatchNorm normalises one distribution, as in the classic recipe.
        logits_real = D(real)
        logits_fake = D(fake.detach())
        loss_d = _bce(logits_real, 1.0) + _bce(logits_fake, 0.0)
        self.opt_d.zero_grad(set_to_none=True)
        acc.backward(loss_d)
        self.opt_d.step()

        # G step: maximise log D(G(z)). D is frozen (no gradients computed for it) and under
        # no_sync, so DDP does not all-reduce D gradients that nobody uses.
        D.requires_grad_(False)
        with acc.no_sync(D):
            logits_after = D(fake)
            loss_g = _bce(logits_after, 1.0)
            self.opt_g.zero_grad(set_to_none=True)
            acc.backward(loss_g)
        D.requires_grad_(True)
        self.opt_g.step()

        return {
            "loss_D": loss_d.detach(),
            "loss_G": loss_g.detach(),
            "D(x)": torch.sigmoid(logits_real.detach().float()).mean(),
            "D(G(z))_before": torch.sigmoid(logits_fake.detach().float()).mean(),
            "D(G(z))_after": torch.sigmoid(logits_after.detach().float()).mean(),
        }
