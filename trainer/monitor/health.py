"""Catch non-finite losses within a few steps, without a host sync every step.

Every step records, on the device, the first step at which loss_D or loss_G stopped being finite;
`check` reads that record (one tiny all-reduce and one host sync) every `check_every` steps.
fp16 overflow is a different thing: the grad scaler skips those steps and the loop counts them;
only the losses themselves going NaN or inf count as divergence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator

NETWORKS = ("discriminator", "generator")  # loss_D, loss_G


@dataclass
class NonFinite:
    network: str
    step: int  # the first step whose loss was not finite


NO_STEP = 2**62  # "finite so far"


class NonFiniteWatch:
    def __init__(self, accelerator: Accelerator, networks: dict[str, torch.nn.Module], check_every: int = 10) -> None:
        self.acc = accelerator
        self.networks = [networks[name] for name in NETWORKS]
        self.check_every = check_every
        self.first_bad = torch.full((2,), NO_STEP, dtype=torch.long, device=accelerator.device)

    def update(self, metrics: dict[str, torch.Tensor], step: int) -> None:
        """Device-side only: remember the first step whose loss was NaN or inf."""
        bad = torch.stack([~torch.isfinite(metrics["loss_D"]), ~torch.isfinite(metrics["loss_G"])])
        self.first_bad = torch.where(bad, torch.clamp(self.first_bad, max=step), self.first_bad)

    def check(self, step: int, before_save: bool = False) -> NonFinite | None:
        """Collective every `check_every` steps and before every checkpoint: all ranks get the same answer.

        Before a save the weights themselves are checked too: a NaN gradient makes the weights NaN
        one step before any loss shows it, and a checkpoint must never hold them.
        """
        if step % self.check_every and not before_save:
            return None
        first_bad = self.first_bad.clone()
        if before_save:
            for i, network in enumerate(self.networks):
                finite = torch.stack([torch.isfinite(p).all() for p in network.parameters()]).all()
                first_bad[i] = torch.where(finite, first_bad[i], torch.clamp(first_bad[i], max=step))
        if self.acc.num_processes > 1:
            torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MIN)
        steps = first_bad.tolist()
        if min(steps) == NO_STEP:
            return None
        index = 0 if steps[0] <= steps[1] else 1
        return NonFinite(NETWORKS[index], steps[index])

    def reset(self) -> None:
        self.first_bad.fill_(NO_STEP)
