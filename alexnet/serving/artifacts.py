"""Where a finished cell keeps what serving and the report read (artifact paths of its run),
and how they are read back. No torch here: the report imports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

CONFIG_ARTIFACT = "config.yaml"
PREPROCESS_ARTIFACT = "weights/preprocess.json"
HELDOUT_ARTIFACT = "heldout/predictions.npz"
MODEL_NAME = "model"  # the logged MLflow model: runs:/<run id>/model
MODEL_ERROR_TAG = "ablate.model_error"  # why a finished cell has no MLflow model
PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def fetch(c: Any, run_id: str, name: str, folder: str) -> Path | None:
    """The artifact ``name`` of run ``run_id`` as a local file, or None when the run has
    none: read where it lies when the store's artifacts are on this machine (a 61 M-weight
    state dict is not copied), else downloaded into ``folder``."""
    parsed = urlparse(c.get_run(run_id).info.artifact_uri)
    if parsed.scheme in ("", "file"):
        path = Path(unquote(parsed.path)) / name
        return path if path.is_file() else None
    with quiet_mlflow(), contextlib.suppress(Exception):  # absent: None
        path = Path(c.download_artifacts(run_id, name, folder))
        return path if path.is_file() else None
    return None


def read_heldout(path: Path) -> dict[str, np.ndarray]:
    """A ``heldout/predictions.npz`` as arrays: split, classes, index, label, predicted,
    confidence, pool_size, pool_index, pool_images. Plain arrays only (no pickle)."""
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


@contextlib.contextmanager
def quiet_mlflow() -> Iterator[None]:
    """No progress bars or INFO lines from MLflow while it moves artifacts: they would cut
    through a grid's progress display or a command's output."""
    logger = logging.getLogger("mlflow")
    level, bar = logger.level, os.environ.get(PROGRESS_BAR)
    logger.setLevel(logging.WARNING)
    os.environ[PROGRESS_BAR] = "false"
    try:
        yield
    finally:
        logger.setLevel(level)
        if bar is None:
            os.environ.pop(PROGRESS_BAR, None)
        else:
            os.environ[PROGRESS_BAR] = bar
