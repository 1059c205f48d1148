"""GPU tests: real runs on CUDA through the project's own entry points (docs/gpu_check.md).

Every test under tests/gpu gets the `gpu` marker, and where CUDA is not available a skip with
the reason "CUDA is not available", so `make test` on a CPU machine reports them as skipped.
On a GPU machine run them with `bash bench/gpu_check.sh` (which first installs the wheels the
machine lacks) or `python -m pytest -q tests/gpu`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.gpu.jobs import JobPool, define_jobs

GPU_DIR = Path(__file__).resolve().parent
WANTED = pytest.StashKey[set]()


def _ours(item: pytest.Item) -> bool:
    return GPU_DIR in Path(item.path).resolve().parents


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Called with every collected item of the session, not only this folder's.
    ours = [item for item in items if _ours(item)]
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="CUDA is not available")
    wanted: set[str] = set()
    for item in ours:
        item.add_marker(pytest.mark.gpu)
        if skip is not None:
            item.add_marker(skip)
        wanted.update(getattr(getattr(item, "function", None), "gpu_jobs", ()))
    config.stash[WANTED] = wanted


@pytest.fixture(scope="session")
def gpu_jobs(request, synthetic_dir, tmp_path_factory):
    """The jobs of tests/gpu/jobs.py on the session's synthetic data; those the selected tests
    declared all start at the first `get`."""
    jobs = define_jobs(tmp_path_factory.mktemp("gpu_jobs"), Path(synthetic_dir))
    pool = JobPool(jobs, request.config.stash.get(WANTED, set()) & jobs.keys())
    yield pool
    pool.stop_all()
