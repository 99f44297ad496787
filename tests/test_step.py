"""The GAN update itself (trainer/core/step.py), in process on the CPU with a real Accelerator.

A learning test on a 2-D distribution, one update checked against the DCGAN update written out by
hand, the noise seeding that exact resume depends on, and fp16 skipped steps counted with a fused
optimizer (as on a GPU).
"""

from __future__ import annotations

import copy
import math
import typing

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from trainer.core.config import TrainConfig, load_config
from trainer.core.models import Discriminator, Generator
from trainer.core.step import LOSSES, GANStep, grad_norm, step_noise, step_noise_seed
from trainer.util.errors import ConfigError

DATA_MEAN = torch.tensor([2.0, -1.5])
DATA_STD = 0.3


class Shift(nn.Module):
    """G(z) = z + shift: unit-spread samples whose mean is G's only parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.shift


def _data(n: int, generator: torch.Generator) -> torch.Tensor:
    return DATA_MEAN + DATA_STD * torch.randn(n, 2, generator=generator)


def _prepared(accelerator: Accelerator, g: nn.Module, d: nn.Module, lr: float):
    opt_g = torch.optim.Adam(g.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=lr, betas=(0.5, 0.999))
    return accelerator.prepare(g, d, opt_g, opt_d)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and the result then does not depend on the core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_config_offers_exactly_the_losses_of_the_table():
    assert set(typing.get_args(typing.get_type_hints(TrainConfig)["loss"])) == set(LOSSES)
    with pytest.raises(ConfigError) as error:  # one line naming the key and every choice
        load_config(None, ["train.loss=wgan"])
    assert "train.loss" in str(error.value) and "\n" not in str(error.value)
    assert all(repr(name) in str(error.value) for name in LOSSES), str(error.value)


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("seed", [0, 1])
def test_gan_step_learns_a_2d_gaussian(seed, loss, one_thread):
    """200 steps of the real GANStep move G onto a narrow 2-D Gaussian, and D still tells them apart,
    with every loss of the table.

    G is a learned shift of unit-spread noise: it can match the data's mean (std 0.3 around (2, -1.5))
    but never its spread, so a working D keeps an edge (D(x) > D(G(z)) on fresh samples) while G's
    mean must move most of the way from 0 to the data's. Over seeds 0-29 the mean moved at least
    91% of the way and the D edge at least 0.42 with bce, 90% and 0.36 with hinge (under half a
    second a seed); the bounds below leave room.

    Checked by hand once, by applying each mutation to a copy of trainer/core/step.py and running this
    test there: it fails with G's target label flipped (`_bce(logits_after, 0.0)`: G runs away, its
    mean moves about 70% of the way in the wrong direction), with the D loss negated or its labels
    swapped (each check alone fails: D(x) near 0 and D(G(z)) near 1, and G's mean moves away), and
    with either optimizer step removed. tools/mutation_check.py repeats these checks.
    """
    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True)
    d = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
    g, d, opt_g, opt_d = _prepared(accelerator, Shift(), d, lr=2e-2)
    gan_step = GANStep(accelerator, g, d, opt_g, opt_d, nz=2, run_seed=seed, loss=loss)
    data = torch.Generator().manual_seed(seed)
    for step in range(200):
        gan_step(_data(64, data), step)

    with torch.no_grad():
        fake = g(torch.randn(4000, 2, generator=torch.Generator().manual_seed(1000 + seed)))
        d_real = torch.sigmoid(d(_data(4000, data))).mean().item()
        d_fake = torch.sigmoid(d(fake)).mean().item()
    moved = 1 - ((fake.mean(0) - DATA_MEAN).norm() / DATA_MEAN.norm()).item()  # G's mean started at 0
    assert moved > 0.75, f"G's mean moved only {moved:.0%} of the way to the data's"
    assert d_real > d_fake + 0.2, f"D(x)={d_real:.3f} is not clearly above D(G(z))={d_fake:.3f}"


def test_hinge_loss_and_its_diagnostics_are_the_formulas():
    """D: mean relu(1 - D(x)) + mean relu(1 + D(G(z))); G: -mean D(G(z)); diagnostics: the mean logits.
    (With G's sign flipped, or D's terms swapped, the learning test above fails: G's mean runs away.)"""
    real, before, after = torch.tensor([[2.0], [0.5]]), torch.tensor([[-3.0], [0.0]]), torch.tensor([[1.0], [-2.0]])
    hinge = LOSSES["hinge"]
    assert hinge.d(real, before).item() == pytest.approx((0.0 + 0.5) / 2 + (0.0 + 1.0) / 2)
    assert hinge.g(after).item() == pytest.approx(0.5)
    diagnostics = {name: value.item() for name, value in hinge.diagnostics(real, before, after).items()}
    assert diagnostics == {"D(x)_logit": 1.25, "D(G(z))_logit_before": -1.5, "D(G(z))_logit_after": -0.5}


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def _reference_step(g, d, opt_g, opt_d, real, z) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
    """The DCGAN update written out with plain autograd: returns the step's metrics and D's gradients."""
    fake = g(z)
    logits_real, logits_fake = d(real), d(fake.detach())
    loss_d = _bce(logits_real, 1.0) + _bce(logits_fake, 0.0)
    grads_d = torch.autograd.grad(loss_d, list(d.parameters()))
    for p, grad in zip(d.parameters(), grads_d, strict=True):
        p.grad = grad
    opt_d.step()
    logits_after = d(fake)  # D after its update
    loss_g = _bce(logits_after, 1.0)
    grads_g = torch.autograd.grad(loss_g, list(g.parameters()))
    for p, grad in zip(g.parameters(), grads_g, strict=True):
        p.grad = grad
    opt_g.step()
    metrics = {
        "loss_D": loss_d,
        "loss_G": loss_g,
        "D(x)": torch.sigmoid(logits_real).mean(),
        "D(G(z))_before": torch.sigmoid(logits_fake).mean(),
        "D(G(z))_after": torch.sigmoid(logits_after).mean(),
        "grad_norm_D": torch.cat([x.flatten() for x in grads_d]).norm(),
        "grad_norm_G": torch.cat([x.flatten() for x in grads_g]).norm(),
    }
    return metrics, grads_d


def test_two_steps_are_the_dcgan_update_written_out():
    """D step on real and detached fake, then a G step against the UPDATED D, with each step's noise;
    two steps in a row, so gradients left over from one step would show in the next."""
    torch.manual_seed(0)
    nz, run_seed, attempt = 3, 7, 1
    g0 = nn.Sequential(nn.Linear(nz, 4), nn.Tanh(), nn.Linear(4, 2))
    d0 = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
    g_ref, d_ref = copy.deepcopy(g0), copy.deepcopy(d0)
    ref_opt_g = torch.optim.Adam(g_ref.parameters(), lr=0.1, betas=(0.5, 0.999))
    ref_opt_d = torch.optim.Adam(d_ref.parameters(), lr=0.1, betas=(0.5, 0.999))
    accelerator = Accelerator(cpu=True)
    g, d, opt_g, opt_d = _prepared(accelerator, g0, d0, lr=0.1)
    gan_step = GANStep(accelerator, g, d, opt_g, opt_d, nz, run_seed)

    for step in (5, 6):
        real = torch.randn(6, 2)
        metrics = gan_step(real, step, attempt)
        noise = torch.Generator().manual_seed(step_noise_seed(run_seed, step, attempt))
        expected, grads_d = _reference_step(
            g_ref, d_ref, ref_opt_g, ref_opt_d, real, torch.randn(6, nz, generator=noise)
        )
        assert set(metrics) == set(expected)
        for name, value in expected.items():
            assert metrics[name].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-7), (step, name)
            assert not metrics[name].requires_grad, name
        for mine, ref in ((g, g_ref), (d, d_ref)):
            for (name, a), b in zip(mine.named_parameters(), ref.parameters(), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=f"step {step}: {name}")
        # The G step freezes D: D's gradients are still exactly those of its own loss, and D trains again next step.
        for p, grad in zip(d.parameters(), grads_d, strict=True):
            torch.testing.assert_close(p.grad, grad, rtol=1e-5, atol=1e-7)
        assert all(p.requires_grad for p in d.parameters())


def test_grad_norm_is_the_l2_norm_of_all_gradients():
    model = nn.Linear(2, 2)
    for p, value in zip(model.parameters(), (3.0, 4.0), strict=True):
        p.grad = torch.full_like(p, value)  # weight 4 entries of 3, bias 2 entries of 4
    assert grad_norm(model).item() == pytest.approx((4 * 9 + 2 * 16) ** 0.5)


def test_step_noise_depends_on_seed_step_and_attempt_and_never_changes():
    """Exact resume replays the noise of step s: the seed is a pure function, pinned here, so a
    checkpoint written by an earlier version resumes onto the same noise."""
    base = step_noise_seed(0, 0)
    assert base == step_noise_seed(0, 0, attempt=0) == 7896617691693857887
    assert (step_noise_seed(3, 7), step_noise_seed(3, 7, 2)) == (4782766539338417736, 1016266665476324714)
    variants = [step_noise_seed(1, 0), step_noise_seed(0, 1), step_noise_seed(0, 0, 1)]
    assert len({base, *variants}) == 4
    assert all(0 <= s < 2**63 for s in (base, *variants))  # a valid torch.Generator seed


def test_step_noise_is_the_global_batch_s_for_any_number_of_processes():
    """Rank r of W takes rows r*B/W .. of the global batch's latents: the ranks of 2 or 4 processes
    together draw exactly what one process draws, so a run can resume on another process count."""
    seed, nz, batch = step_noise_seed(0, 5), 3, 8
    generator = torch.Generator()
    one = step_noise(generator, seed, batch, nz, 0, 1, torch.device("cpu"))
    for world in (2, 4):
        parts = [step_noise(generator, seed, batch // world, nz, r, world, torch.device("cpu")) for r in range(world)]
        assert torch.equal(torch.cat(parts), one), world
    assert not torch.equal(parts[0], parts[1])  # ranks draw different latents


def test_each_step_draws_its_own_noise_and_a_replay_draws_the_same():
    accelerator = Accelerator(cpu=True)
    g, d = nn.Linear(2, 2), nn.Linear(2, 1)
    g, d, opt_g, opt_d = _prepared(accelerator, g, d, lr=0.0)  # lr 0: the weights stay, only noise varies
    gan_step = GANStep(accelerator, g, d, opt_g, opt_d, nz=2, run_seed=0)
    real = torch.zeros(4, 2)
    first, again, later, retry = (gan_step(real, s, a)["D(G(z))_before"] for s, a in ((3, 0), (3, 0), (4, 0), (3, 1)))
    assert first == again and first != later and first != retry
    # Rank 1 of a two-process run draws other noise for the same step (same weights, same data).
    as_rank_1 = GANStep(_AsRank(accelerator, 1, 2), g, d, opt_g, opt_d, nz=2, run_seed=0)
    assert as_rank_1(real, 3)["D(G(z))_before"] != first


class _AsRank:
    """The accelerator as seen by rank `rank` of `world`: only `process_index` and `num_processes` differ."""

    def __init__(self, accelerator: Accelerator, rank: int, world: int) -> None:
        self._accelerator, self.process_index, self.num_processes = accelerator, rank, world

    def __getattr__(self, name: str):
        return getattr(self._accelerator, name)


# ---- fp16 skipped steps with a fused optimizer --------------------------------------------------------
def _fp16_step(fused: bool) -> tuple[GANStep, torch.amp.GradScaler]:
    accelerator = Accelerator(cpu=True)
    # What Accelerate builds for fp16 on a GPU, on the CPU.
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1_000_000)
    torch.manual_seed(0)
    g, d = Generator(8, 8, 16), Discriminator(8, 16)
    for net in (g, d):  # forced non-finite gradients, as an fp16 overflow gives
        next(net.parameters()).register_hook(lambda grad: grad * float("inf"))
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, fused=fused)
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, fused=fused)
    g, d, opt_g, opt_d = accelerator.prepare(g, d, opt_g, opt_d)
    return GANStep(accelerator, g, d, opt_g, opt_d, nz=8, run_seed=0), accelerator.scaler


@pytest.mark.parametrize("fused", [True, False])
def test_fp16_skipped_steps_are_counted_with_fused_and_plain_adam(fused):
    """With fused Adam the scaler always calls optimizer.step() (the optimizer skips internally), so
    Accelerate's step_was_skipped stays False; the step counts skips from the scale instead."""
    step, scaler = _fp16_step(fused)
    real = torch.rand(4, 3, 16, 16) * 2 - 1
    for i in range(5):
        step(real, i)
    halvings = round(math.log2(2.0**16 / scaler.get_scale()))
    skipped = step.skipped.tolist()
    assert sum(skipped) == halvings > 0
    assert skipped == [5, 5]  # every D and every G step overflowed
    if fused:  # what the loop used to read: a fused optimizer is always called, so nothing looks skipped
        assert not step.opt_d.step_was_skipped and not step.opt_g.step_was_skipped


@pytest.mark.parametrize("channels_last", [False, True])
def test_in_fp32_the_trainer_s_update_is_the_classic_example_s(channels_last, one_thread, monkeypatch):
    """The sample-quality comparison with the classic loop (docs/results.md) rests on this: with the
    same weights, real batches and noise, three steps of the trainer's networks, optimizers and GAN
    step in fp32 (BCE on logits, D frozen in the G step, channels_last or not) leave G and D where
    the PyTorch DCGAN example's loop (Sigmoid + BCELoss, examples/dcgan/main.py) leaves them. What
    remains different between the two loops is the data order, the noise draws and the precision."""
    from trainer.core.config import load_config
    from trainer.core.models import build_networks

    cfg = load_config(None, ["model.ngf=8", "model.ndf=8", "model.nz=10", f"train.channels_last={channels_last}"])
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    g, d, opt_g, opt_d = build_networks(cfg, accelerator, use_sync_bn=False)
    net_g, net_d = copy.deepcopy(g), nn.Sequential(copy.deepcopy(d), nn.Sigmoid())  # the example's networks
    ref_opt_g = torch.optim.Adam(net_g.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    ref_opt_d = torch.optim.Adam(net_d.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    g, d, opt_g, opt_d = accelerator.prepare(g, d, opt_g, opt_d)

    data = torch.Generator().manual_seed(0)
    batches = [torch.rand(8, 3, 64, 64, generator=data) * 2 - 1 for _ in range(3)]
    noises = [torch.randn(8, cfg.model.nz, 1, 1, generator=data) for _ in range(3)]
    drawn = iter(noises)
    monkeypatch.setattr("trainer.core.step.step_noise", lambda *args: next(drawn).view(8, -1))
    gan_step = GANStep(accelerator, g, d, opt_g, opt_d, cfg.model.nz, cfg.run.seed)

    criterion = nn.BCELoss()
    for step, (real, noise) in enumerate(zip(batches, noises, strict=True)):
        gan_step(real.contiguous(memory_format=torch.channels_last) if channels_last else real, step)
        # examples/dcgan/main.py, one iteration
        net_d.zero_grad()
        output = net_d(real).view(-1)
        err_d_real = criterion(output, torch.full((8,), 1.0))
        err_d_real.backward()
        fake = net_g(noise)
        output = net_d(fake.detach()).view(-1)
        err_d_fake = criterion(output, torch.full((8,), 0.0))
        err_d_fake.backward()
        ref_opt_d.step()
        net_g.zero_grad()
        output = net_d(fake).view(-1)
        err_g = criterion(output, torch.full((8,), 1.0))
        err_g.backward()
        ref_opt_g.step()

    for mine, ref in ((g, net_g), (d, net_d[0])):
        for (name, a), b in zip(mine.state_dict().items(), ref.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=f"{name} after 3 steps")
