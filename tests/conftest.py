"""Shared test set-up: real data and GPU tests skip, with the reason, when absent."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Decoded-data caches and the like go to a folder of this test session, not ~/.cache.
os.environ.setdefault("ALEXNET_CACHE", tempfile.mkdtemp(prefix="alexnet-test-cache-"))
os.environ.pop("MLFLOW_TRACKING_URI", None)  # every test picks its own store


def cifar10_path() -> Path:
    return Path(os.environ.get("ALEXNET_CIFAR10_ROOT",
                               REPO.parent / "shared" / "data" / "cifar10"))


@pytest.fixture
def cifar10_root() -> Path:
    root = cifar10_path()
    if not (root / "train").is_dir():
        pytest.skip(f"real CIFAR-10 images not found at {root}; set ALEXNET_CIFAR10_ROOT to a "
                    "folder holding train/<class>/*.jpg")
    return root


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
