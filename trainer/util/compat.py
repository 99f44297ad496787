"""Make `import torchvision` work with a CPU-only torch and a CUDA-linked torchvision wheel.

PyPI's torchvision wheels link their C++ ops against torch's CUDA libraries. Paired with a CPU
build of torch (e.g. `torch==2.13.0+cpu`, as CI installs), the ops library fails to load, which
torchvision tolerates, except that `torchvision._meta_registrations` then registers a fake kernel
for the missing `torchvision::nms` and `torchvision::qnms` ops and the import dies with "operator
torchvision::nms does not exist". We use only torchvision's pure-Python parts (transforms, datasets,
utils), so declaring the two ops' schemas (no kernel: calling them still fails loudly) is enough. With a
matching torch/torchvision pair this module does nothing.
"""

from __future__ import annotations

import sys

import torch

_library: torch.library.Library | None = None  # keeps the definition alive


def ensure_importable() -> None:
    global _library
    try:
        import torchvision  # noqa: F401
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc) or _library is not None:
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _library = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            _library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision  # noqa: F401


ensure_importable()
