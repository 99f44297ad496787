import pytest
import torch
from torch import nn

from trainer.core.config import ModelConfig
from trainer.core.models import Discriminator, Generator, build_models


def _convs(module, kind):
    return [m for m in module.modules() if isinstance(m, kind)]


def test_classic_64_architecture():
    g, d = build_models(ModelConfig(), seed=0, sync_bn=False)
    g_channels = [(c.in_channels, c.out_channels) for c in _convs(g, nn.ConvTranspose2d)]
    d_channels = [(c.in_channels, c.out_channels) for c in _convs(d, nn.Conv2d)]
    assert g_channels == [(100, 512), (512, 256), (256, 128), (128, 64), (64, 3)]
    assert d_channels == [(3, 64), (64, 128), (128, 256), (256, 512), (512, 1)]
    assert len(_convs(g, nn.BatchNorm2d)) == 4 and len(_convs(d, nn.BatchNorm2d)) == 3
    assert isinstance(g.main[-1], nn.Tanh)
    assert all(m.negative_slope == 0.2 for m in _convs(d, nn.LeakyReLU))
    assert not any(isinstance(m, nn.Sigmoid) for m in d.modules())  # D returns logits


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_shapes(resolution):
    g, d = Generator(16, 8, resolution), Discriminator(8, resolution)
    x = g(torch.randn(5, 16))
    assert x.shape == (5, 3, resolution, resolution)
    assert x.abs().max() <= 1.0
    assert d(x).shape == (5,)


def test_init_is_dcgan_and_identical_for_a_seed():
    g1, d1 = build_models(ModelConfig(), seed=3, sync_bn=False)
    g2, d2 = build_models(ModelConfig(), seed=3, sync_bn=False)
    for a, b in zip(
        list(g1.state_dict().values()) + list(d1.state_dict().values()),
        list(g2.state_dict().values()) + list(d2.state_dict().values()),
        strict=True,
    ):
        assert torch.equal(a, b)
    w = torch.cat([c.weight.flatten() for c in _convs(g1, nn.ConvTranspose2d)])
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 1e-3
    bn = _convs(d1, nn.BatchNorm2d)[0]
    assert abs(bn.weight.mean().item() - 1) < 0.01 and torch.count_nonzero(bn.bias) == 0


def test_building_models_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_models(ModelConfig(), seed=0, sync_bn=False)
    assert torch.equal(torch.rand(3), expected)


def test_sync_bn_conversion_keeps_state_dict_keys():
    g, d = build_models(ModelConfig(ngf=8, ndf=8), seed=0, sync_bn=True)
    assert _convs(g, nn.SyncBatchNorm) and _convs(d, nn.SyncBatchNorm)
    plain_g, _ = build_models(ModelConfig(ngf=8, ndf=8), seed=0, sync_bn=False)
    plain_g.load_state_dict(g.state_dict())  # weights exported from a SyncBatchNorm run load into BatchNorm
