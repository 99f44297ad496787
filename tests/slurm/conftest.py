"""Fixtures for tests that need the throwaway local Slurm cluster (tests/slurm_cluster.py)."""

import sys
from pathlib import Path

try:
    from tests.slurm_cluster import require_slurm, slurm_cluster_fixture
except ImportError:  # tests/ is not importable as a package: import the module by path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from slurm_cluster import require_slurm, slurm_cluster_fixture


def pytest_runtest_setup(item):
    if item.get_closest_marker("slurm"):
        require_slurm()


# One two-node cluster per test module (starts in well under a second).
slurm_cluster = slurm_cluster_fixture(scope="module", nodes=2)
