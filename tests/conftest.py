"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory) -> Path:
    """The embedded Fashion-MNIST subset as an ImageFolder: <dir>/train/<class>/*.png and <dir>/val/...

    All 10 classes, 300 train + 100 val images each (28x28 grayscale PNGs). Session-scoped and
    shared: treat it as read-only (copy or subset the items in a test instead of writing here).
    """
    from mishield.data import materialize_fashion_mnist

    return materialize_fashion_mnist(tmp_path_factory.mktemp("fmnist"))
