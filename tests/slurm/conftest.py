from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.slurm.cluster import Cluster, shared_cluster


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Cluster]:
    """A running two-node local Slurm; skips the test when Slurm cannot be had here."""
    with shared_cluster() as cluster:
        yield cluster
