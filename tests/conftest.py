"""Shared fixtures. The hub is unreachable here: everything runs offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """A small built-in dataset (240 train samples in 8 shards of 30, 2 val images per class,
    32 px), made once per test session; treat it as read-only."""
    from data.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("synthetic") / "ds"
    return make_synthetic(
        out, train_samples=240, val_per_class=2, image_size=32, seed=0, samples_per_shard=30
    )
