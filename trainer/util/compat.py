"""Make `import torchvision` work with a CPU-only torch and a CUDA-linked torchvision wheel.

PyPI's torchvision wheels link their C++ ops against torch's CUDA libraries. Paired with a CPU
build of torch (e.g. `torch==2.13.0+cpu`, as CI installs), the ops library fails to load, which
torchvision tolerates, except that `torchvision._meta_registrations` then registers a fake kernel
for the missing `torchvision::nms` and `torchvision::qnms` ops and the import dies with "operator
torchvision::nms does not exist". We use only torchvision's pure-Python parts (transforms, datasets,
utils), so declaring the two ops' schemas (no kernel: calling them still fails loudly) is enough.
With a matching torch/torchvision pair nothing is declared.

Why it is still needed (checked against PyPI on 2026-11-30): PyPI has no CPU build of torch for
Linux. Its torch 2.13.0 manylinux x86_64 wheel is the CUDA build (527 MB, plus nvidia-* wheels);
the `+cpu` builds come from PyTorch's own index (download.pytorch.org/whl/cpu). PyPI's one
torchvision 0.28.0 wheel for Linux x86_64 requires torch==2.13.0, which 2.13.0+cpu satisfies, and
its `_C.so` links libtorch_cuda.so, libc10_cuda.so and libcudart.so.13. So a CPU-only machine that
reaches only PyPI (CI installs the CPU torch from a local wheel) gets exactly this mismatched pair,
and no torchvision on PyPI matches a CPU torch. Installing both from PyTorch's CPU index, or both
CUDA builds from PyPI, gives a matching pair, and this module then does nothing.

`install()` (called once, by `trainer/__init__.py`) puts a finder in front of the import system
that does this just before the first `import torchvision`, wherever it comes from (our modules,
torch-fidelity): importing the package costs nothing, and `trainer.core.config` stays free of torch.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

_declared: object | None = None  # the torch.library.Library holding the schemas, kept alive


def declare_missing_ops() -> None:
    """Load torchvision's C++ ops the way torchvision does; if they cannot load, declare the schemas
    its meta registrations need. Loading the same library again later is a no-op."""
    global _declared
    spec = importlib.machinery.PathFinder.find_spec("torchvision")
    libraries = sorted(Path(next(iter(spec.submodule_search_locations))).glob("_C.*")) if spec else []
    if not libraries or _declared is not None:
        return
    import torch

    try:
        torch.ops.load_library(str(libraries[0]))
    except OSError:  # undefined CUDA symbols: a CUDA-linked wheel beside a CPU-only torch
        _declared = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            _declared.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "torchvision":
            sys.meta_path.remove(self)
            declare_missing_ops()
        return None  # the regular finders import it


def install() -> None:
    if "torchvision" not in sys.modules and not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
