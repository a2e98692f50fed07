"""What a finished cell logs so that its model can be looked at, served and reported on.

Called once per cell, when it finishes (``runner._log_artifacts``), never per epoch:

- ``weights/preprocess.json``: the class names and the training split's pixel statistics,
  beside ``config.yaml`` and ``weights/model.pt``: with them, the weights classify raw images
  (``classifier.load_classifier``), whether or not an MLflow model is logged.
- ``heldout/predictions.npz``: the final model on every held-out image (the test split when
  the data has one, else validation): true label, predicted class, its probability, the
  image's index; and the images of the first ``POOL`` held-out images that this cell got
  wrong. Two arms disagree on an image only where one of them is wrong, so the report finds
  every disagreement among those ``POOL`` images in one arm's file or the other's: a gallery
  costs at most ``POOL`` thumbnails per cell, a confusion matrix a few bytes per image, and
  the report needs neither the dataset nor a model (it reads MLflow only).
- the MLflow model ``model`` (``runtime.log_model``, on by default): see ``log_mlflow_model``.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from alexnet import tracking
from alexnet.serving.artifacts import (
    CONFIG_ARTIFACT,
    HELDOUT_ARTIFACT,
    MODEL_ERROR_TAG,
    MODEL_NAME,
    PREPROCESS_ARTIFACT,
    quiet_mlflow,
)
from alexnet.serving.classifier import preprocess_facts

if TYPE_CHECKING:
    from alexnet.ablation import Cell
    from alexnet.data import Data

log = logging.getLogger(__name__)
POOL = 256  # held-out images (the first ones) whose wrongly classified images are kept
THUMBNAIL = 64  # largest side of a kept image: enough to recognise it in a gallery
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


def log_cell_outputs(c: Any, run_id: str, cell: Cell, model: torch.nn.Module, data: Data,
                     folder: Path, weights: Path) -> None:
    """Write a finished cell's serving facts and held-out predictions into ``folder`` (the
    run's artifact folder, uploaded by the caller) and log its MLflow model.

    ``folder`` already holds ``config.yaml`` and the final state dict, ``weights``."""
    (folder / PREPROCESS_ARTIFACT).write_text(
        json.dumps(preprocess_facts(data.classes, data.stats)), encoding="utf-8")
    held = heldout_predictions(cell, model, data)
    (folder / HELDOUT_ARTIFACT).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / HELDOUT_ARTIFACT, **held)
    if cell.config.runtime.log_model:
        try:
            log_mlflow_model(c, run_id, cell, folder, weights)
        except Exception as err:  # the cell's training stands; only serving it is lost
            reason = f"{type(err).__name__}: {err}".splitlines()[0][:500]
            log.warning("run %s: its MLflow model could not be logged (%s)", run_id, reason)
            tracking.set_tags(c, run_id, {MODEL_ERROR_TAG: reason})


# --- held-out predictions ------------------------------------------------------------------


@torch.no_grad()
def heldout_predictions(cell: Cell, model: torch.nn.Module, data: Data) -> dict[str, np.ndarray]:
    """The final model on the held-out split, one row per image, and the kept images.

    The test split is read here a second time after ``train_run`` scored it: the same final
    model, after training has ended, so nothing it trained or chose has seen it (sweeps'
    trials never come here)."""
    from alexnet.train import autocast_for, resolve_device, softmax_probs, use_channels_last

    cfg = cell.config
    device = resolve_device(cfg.runtime.device)
    split = "test" if data.test_size else "val"
    batches = (data.test_batches if split == "test" else data.eval_batches)(
        cfg.train.eval_batch_size)
    channels_last = use_channels_last(device, cfg)  # the layout the model trained in
    model.eval()
    labels, predicted, confidence, pool_index, pool_images = [], [], [], [], []
    seen = 0
    for images, y in batches:
        with autocast_for(device, cfg):
            probs = softmax_probs(model, images, channels_last)
        p, k = probs.max(1)
        labels.append(y.cpu())
        predicted.append(k.cpu())
        confidence.append(p.cpu())
        if seen < POOL:
            wrong = (k != y)[:POOL - seen].nonzero().flatten()
            if wrong.numel():
                pool_index.append(wrong.cpu() + seen)
                pool_images.append(_thumbnails(images[wrong], data))
        seen += y.shape[0]
    side = min(THUMBNAIL, cfg.data.crop_size)
    return {
        "split": np.array(split), "classes": np.array(data.classes),
        "index": np.arange(seen, dtype=np.int32),
        "label": torch.cat(labels).numpy().astype(np.int32),
        "predicted": torch.cat(predicted).numpy().astype(np.int32),
        "confidence": torch.cat(confidence).float().numpy(),
        "pool_size": np.array(min(POOL, seen)),
        "pool_index": (torch.cat(pool_index) if pool_index else torch.zeros(0, dtype=torch.long)
                       ).numpy().astype(np.int32),
        "pool_images": (torch.cat(pool_images) if pool_images
                        else torch.zeros(0, side, side, 3, dtype=torch.uint8)).numpy()}


def _thumbnails(images: torch.Tensor, data: Data) -> torch.Tensor:
    """The normalised evaluation crops back as uint8 (N,h,w,3) pixels: the centre crop the
    model saw (of ten crops, the centre one), at most THUMBNAIL pixels a side. Undoing the
    normalisation needs no access to the raw split, on either data path."""
    import torch.nn.functional as F

    if images.dim() == 5:  # (B, 10, 3, c, c): Section 4.1's ten crops; index 4 = centre
        images = images[:, 4]
    stats = data.stats.to(images.device)
    pixels = (images.float() * stats.std.view(3, 1, 1) + stats.mean.view(3, 1, 1)) * 255
    if pixels.shape[-1] > THUMBNAIL:
        pixels = F.interpolate(pixels, size=(THUMBNAIL, THUMBNAIL), mode="bilinear",
                               antialias=True, align_corners=False)
    return pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


# --- the MLflow model ------------------------------------------------------------------------


def log_mlflow_model(c: Any, run_id: str, cell: Cell, folder: Path, weights: Path) -> None:
    """The cell's model as an MLflow model named ``model`` of its run (``runs:/<id>/model``).

    Why a pyfunc "model from code" and not ``mlflow.pytorch.log_model``: the pytorch flavour
    stores the whole module, pickled (loading it runs code) or as a ``torch.export`` archive
    (a traced graph: the preprocessing still needs a wrapper, and it would be a second copy
    of the 61 M weights beside this one). Here the model is a small code file of this package
    (``pyfunc_model.py``, stored as text in the model) that rebuilds the net from the logged
    config and reads the state dict with ``weights_only=True``: the same path as `ablate
    predict`. Its input is a column ``image`` of image-file bytes (base64 in JSON), of the
    training size; its output, each image's class, top-5 and every class's probability.
    """
    with quiet_mlflow():
        _log_pyfunc(c, run_id, cell, folder, weights)


def _log_pyfunc(c: Any, run_id: str, cell: Cell, folder: Path, weights: Path) -> None:
    import tempfile

    import mlflow
    import pandas as pd
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    import alexnet

    experiment_id = c.get_run(run_id).info.experiment_id
    logged = c.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                   tags={"ablation": cell.ablation, "arm": cell.arm_label,
                                         "seed": str(cell.seed)})
    c.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_NAME
        meta = Model(artifact_path=logged.artifact_location, run_id=run_id,
                     model_id=logged.model_id, model_uuid=logged.model_id)
        mlflow.pyfunc.save_model(
            path, python_model=str(PYFUNC_CODE), mlflow_model=meta,
            artifacts={"config": str(folder / CONFIG_ARTIFACT), "weights": str(weights),
                       "preprocess": str(folder / PREPROCESS_ARTIFACT)},
            signature=signature(),
            input_example=pd.DataFrame({"image": [grey_png(cell.config.data.image_size)]}),
            # Written, not inferred: inferring loads the model in a fresh Python (seconds).
            pip_requirements=[f"alexnet-ablate=={alexnet.__version__}",
                              f"torch=={torch.__version__.split('+')[0]}", "pillow"])
        c.log_model_artifacts(logged.model_id, str(path))
    c.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)


def signature() -> Any:
    """Input: ``image``, an image file's bytes. Output: class, probability, top5, and
    probabilities (class -> probability)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Map, Object, Property, Schema

    top = Object([Property("class", "string"), Property("probability", "double")])
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("string", "class"), ColSpec("double", "probability"),
                        ColSpec(Array(top), "top5"), ColSpec(Map("double"), "probabilities")]))


def grey_png(size: int) -> bytes:
    """A mid-grey PNG of ``size``×``size``: the model's input example (no held-out image is
    copied into the model)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buffer, format="PNG")
    return buffer.getvalue()
