"""Distributed DCGAN trainer: Accelerate (DDP, AMP), typed configs, exact resume.

Layers, each importing only from the ones above it (docs/architecture.md has the picture):

    trainer.util      errors, atomic writes, "the main process decides" across ranks, import shims
    trainer.core      config, data, models, the GAN step, checkpoints, the Accelerator
    trainer.monitor   what watches a run: console, trackers, per-step measurements, health, stops, grids
    trainer.quality   FID / IS / KID and their feature extractors
    trainer.loop      one training run, from config to final weights
    entry points      train, prepare, evaluate, sample, bench (python -m trainer.<name>)

Tools that need the repository checkout (the GPU check, quality comparisons) live beside it in tools/.
"""

from trainer.util import compat as _compat

_compat.install()  # before anything imports torchvision: see that module
__version__ = "0.1.0"
del _compat
