"""Tooling that needs the repository (run from a checkout: python -m tools.<name>); not installed with the package."""
