"""Distributed DCGAN trainer: Accelerate (DDP, AMP), typed configs, exact resume."""

__version__ = "0.1.0"
