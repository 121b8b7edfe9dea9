"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def pytest_configure(config):
    # The test machines are small and shared: with several processes busy, a 2-thread OpenMP
    # pool spins against the others and a tiny training step went from 0.05 s to 1.8 s.
    # One thread per test process is both faster and steadier. MISHIELD_TEST_THREADS overrides.
    torch.set_num_threads(int(os.environ.get("MISHIELD_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory) -> Path:
    """The embedded Fashion-MNIST subset as an ImageFolder: <dir>/train/<class>/*.png and <dir>/val/...

    All 10 classes, 300 train + 100 val images each (28x28 grayscale PNGs). Session-scoped and
    shared: treat it as read-only (copy or subset the items in a test instead of writing here).
    """
    from mishield.data import materialize_fashion_mnist

    return materialize_fashion_mnist(tmp_path_factory.mktemp("fmnist"))
