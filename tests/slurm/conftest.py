from __future__ import annotations

import pytest

from tests.slurm.cluster import Cluster, get_cluster


@pytest.fixture(scope="session")
def slurm_cluster() -> Cluster:
    """A running two-node local Slurm; skips the test when Slurm cannot be had here."""
    return get_cluster()
