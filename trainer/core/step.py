"""One GAN update: the discriminator step, then the generator step, with a loss from `LOSSES`.

Returns detached metric tensors and never synchronises with the host, so the loop decides when
to pay for a sync (at log steps only).

To add a loss: one `Loss` row in `LOSSES` (its D loss, G loss and diagnostics), and its name in the
`train.loss` choices of trainer/core/config.py (a test checks that the two agree).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn


def step_noise_seed(run_seed: int, step: int, attempt: int = 0) -> int:
    """Seed of the latent noise of `step`'s whole global batch: fixed across resumes and process counts.

    `attempt` counts rollbacks after divergence, so a replay from a checkpoint draws new noise.
    """
    entropy = [run_seed, step] + ([attempt] if attempt else [])
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def step_noise(
    generator: torch.Generator, seed: int, per_rank: int, nz: int, rank: int, world: int, device: torch.device
) -> torch.Tensor:
    """This rank's slice of the global batch's latents: sample i of a step gets the same vector on any
    number of processes, as the data does (split_batches), so a run can resume on another count."""
    generator.manual_seed(seed)
    z = torch.randn(per_rank * world, nz, device=device, generator=generator)
    return z[rank * per_rank : (rank + 1) * per_rank]


def grad_norm(module: nn.Module) -> torch.Tensor:
    """L2 norm of all of `module`'s gradients, as a device tensor (no host sync).

    Written out because torch.nn.utils.get_total_norm, which does the same, needs torch >= 2.6.
    """
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms))


@dataclass(frozen=True)
class Loss:
    """A GAN objective, on D's logits (losses in fp32 whatever the precision)."""

    d: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits of reals, logits of fakes) -> D's loss
    g: Callable[[torch.Tensor], torch.Tensor]  # logits of fakes, by the updated D -> G's loss
    # (reals, fakes before D's update, fakes after it) -> metrics that show how D and G are doing
    diagnostics: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits, target, dtype=torch.float32))


def _bce_d(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    # maximise log D(x) + log(1 - D(G(z)))
    return _bce(logits_real, 1.0) + _bce(logits_fake, 0.0)


def _bce_g(logits_after: torch.Tensor) -> torch.Tensor:
    # maximise log D(G(z)): the non-saturating generator loss of the DCGAN paper
    return _bce(logits_after, 1.0)


def _probabilities(real: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> dict[str, torch.Tensor]:
    """D's mean probability of "real": on reals, on fakes before D's update and after it."""
    return {
        "D(x)": torch.sigmoid(real.float()).mean(),
        "D(G(z))_before": torch.sigmoid(before.float()).mean(),
        "D(G(z))_after": torch.sigmoid(after.float()).mean(),
    }


def _hinge_d(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    # reals above +1, fakes below -1; past the margin a sample gives D no gradient
    return F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean()


def _hinge_g(logits_after: torch.Tensor) -> torch.Tensor:
    return -logits_after.float().mean()


def _mean_logits(real: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> dict[str, torch.Tensor]:
    """A hinge D gives scores, not probabilities: their means (D wins by the margin at +1 on reals, -1 on fakes)."""
    return {
        "D(x)_logit": real.float().mean(),
        "D(G(z))_logit_before": before.float().mean(),
        "D(G(z))_logit_after": after.float().mean(),
    }


LOSSES: dict[str, Loss] = {
    "bce": Loss(_bce_d, _bce_g, _probabilities),  # the classic DCGAN recipe
    "hinge": Loss(_hinge_d, _hinge_g, _mean_logits),  # Lim & Ye 2017; SNGAN, BigGAN
}


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
        cuda_graphs: bool = False,
        loss: str = "bce",
    ) -> None:
        """`cuda_graphs`: G and D are compiled with CUDA graphs (compile_mode reduce-overhead or
        max-autotune), so each call marks a new step for them. `loss`: a name in `LOSSES`."""
        self.acc = accelerator
        self.loss = LOSSES[loss]
        self.G, self.D = generator, discriminator
        self.opt_g, self.opt_d = opt_g, opt_d
        self.nz = nz
        self.run_seed = run_seed
        self.cuda_graphs = cuda_graphs
        self.noise = torch.Generator(device=accelerator.device)
        # fp16: steps the grad scaler skipped (overflow), D then G; on the device, read at log steps.
        self.skipped = torch.zeros(2, dtype=torch.long, device=accelerator.device)

    def _scale(self) -> torch.Tensor | None:
        scaler = self.acc.scaler
        return None if scaler is None else scaler._scale.clone()  # the scale tensor itself: no host sync

    def _count_if_skipped(self, index: int, scale_before: torch.Tensor | None) -> None:
        """The scaler lowers its scale exactly when it skips a step. Accelerate's `step_was_skipped`
        cannot tell: a fused optimizer (ours on CUDA) is always called and skips internally."""
        if scale_before is not None:
            self.skipped[index] += self.acc.scaler._scale < scale_before

    def __call__(self, real: torch.Tensor, step: int, attempt: int = 0) -> dict[str, torch.Tensor]:
        acc, G, D = self.acc, self.G, self.D
        if self.cuda_graphs:  # the graphs' outputs of the previous step may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()
        seed = step_noise_seed(self.run_seed, step, attempt)
        z = step_noise(self.noise, seed, real.shape[0], self.nz, acc.process_index, acc.num_processes, real.device)
        fake = G(z)

        # D step. Real and fake go through D separately, so each BatchNorm normalises one
        # distribution, as in the classic recipe.
        logits_real = D(real)
        logits_fake = D(fake.detach())
        loss_d = self.loss.d(logits_real, logits_fake)
        self.opt_d.zero_grad(set_to_none=True)
        acc.backward(loss_d)
        # fp16: unscale first so the norm is the true gradient's (the scaler then does not unscale
        # again); a no-op otherwise. After backward, DDP has averaged the gradients over ranks.
        acc.unscale_gradients(self.opt_d)
        grad_norm_d = grad_norm(D)
        scale = self._scale()
        self.opt_d.step()
        self._count_if_skipped(0, scale)

        # G step, against the updated D. D is frozen (no gradients computed for it) and under
        # no_sync, so DDP does not all-reduce D gradients that nobody uses.
        D.requires_grad_(False)
        with acc.no_sync(D):
            logits_after = D(fake)
            loss_g = self.loss.g(logits_after)
            self.opt_g.zero_grad(set_to_none=True)
            acc.backward(loss_g)
        D.requires_grad_(True)
        acc.unscale_gradients(self.opt_g)
        grad_norm_g = grad_norm(G)
        scale = self._scale()
        self.opt_g.step()
        self._count_if_skipped(1, scale)

        return {
            "loss_D": loss_d.detach(),
            "loss_G": loss_g.detach(),
            **self.loss.diagnostics(logits_real.detach(), logits_fake.detach(), logits_after.detach()),
            "grad_norm_D": grad_norm_d,
            "grad_norm_G": grad_norm_g,
        }
