"""Shared by every layer: errors, atomic writes, cross-rank decisions, import shims."""
