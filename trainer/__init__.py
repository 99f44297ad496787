"""Distributed DCGAN trainer: Accelerate (DDP, AMP), typed configs, exact resume."""

from trainer import _torchvision_compat  # noqa: F401  (before anything imports torchvision)

__version__ = "0.1.0"
