"""A small stand-in for InceptionV3, plugged in through torch-fidelity's feature-extractor registry.

The real InceptionV3 weights cannot be downloaded on the test machines. This extractor is a fixed,
randomly initialised conv net (seeded, so every process and every run builds the same one): its
features are meaningless as a quality measure, but they are deterministic, they separate image
distributions (noise, blur and colour shifts move them), and the library's FID / IS / KID maths
runs on them unchanged. Select it with `eval.feature_extractor=tests.standin_extractor:StandInExtractor`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import trainer  # noqa: F401  (installs the torchvision import shim before torch_fidelity imports it)

# isort: split
from torch_fidelity import FeatureExtractorBase  # after `trainer`, whose shim torchvision needs here


class StandInExtractor(FeatureExtractorBase):
    FEATURES = ("pool", "logits")

    def __init__(self, name: str, features_list: list[str], **kwargs) -> None:
        super().__init__(name, features_list)
        generator = torch.Generator().manual_seed(0)
        widths = [3, 16, 32, 64]
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.fc = nn.Linear(widths[-1], 10)
        with torch.no_grad():
            for layer in [*self.convs, self.fc]:
                fan_in = layer.weight[0].numel()
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
                layer.bias.zero_()
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return StandInExtractor.FEATURES

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "pool", "kid": "pool", "prc": "pool"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3, "expects uint8 Bx3xHxW images"
        h = F.interpolate(x.float() / 127.5 - 1.0, size=(32, 32), mode="bilinear", align_corners=False)
        for conv in self.convs:
            h = F.relu(conv(h))
        # Scaled so that the features are about as large as InceptionV3's pool features (KID's cubic
        # kernel is sensitive to it) and the logits peaked enough for the Inception Score to vary.
        pool = 3.0 * h.mean(dim=(2, 3))
        features = {"pool": pool, "logits": 20.0 * self.fc(pool)}
        return tuple(features[name] for name in self.features_list)
