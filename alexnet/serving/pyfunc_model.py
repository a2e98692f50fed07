"""The MLflow "model from code" of a cell: MLflow stores this file, as text, in the model
and runs it when the model is loaded (``mlflow models serve``, ``mlflow.pyfunc.load_model``).

It holds no weights and no pickle: ``load_context`` builds the classifier from the model's
artifacts (the run's config, its state dict, its class names and pixel statistics) through
``classifier.load_classifier``, the path `ablate predict` takes too.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

BASE64 = re.compile(rb"[A-Za-z0-9+/=\s]+")


class CellModel(PythonModel):
    """Image-file bytes (column ``image``) -> class, probability, top5, probabilities."""

    def load_context(self, context: Any) -> None:
        from pathlib import Path

        from alexnet.serving.classifier import load_classifier

        paths = {k: Path(v) for k, v in context.artifacts.items()}
        self.classifier = load_classifier(paths["config"], paths["weights"], paths["preprocess"])

    # A DataFrame hint: MLflow passes the frame as it is and infers no second signature.
    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        import torch

        from alexnet.errors import AblateError

        if "image" not in model_input:
            raise MlflowException("the input needs a column 'image' of image-file bytes "
                                  '(JSON: {"dataframe_records": [{"image": "<base64>"}]})',
                                  error_code=INVALID_PARAMETER_VALUE)
        try:
            images = [self.classifier.read(file_bytes(data), f"image {i}")
                      for i, data in enumerate(model_input["image"])]
            if not images:
                return []
            return [p.as_dict() for p in self.classifier.predict(torch.stack(images))]
        except AblateError as err:  # a user's bad image: HTTP 400 with the one line
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None


def file_bytes(value: Any) -> bytes:
    """An image file's bytes. MLflow decodes base64 for the ``dataframe_*`` JSON formats
    (the signature says binary), not for ``{"inputs": ...}``: that text is decoded here. An
    image file is never all base64 characters (its magic bytes are not), so nothing else is
    mistaken for it."""
    raw = value.encode() if isinstance(value, str) else bytes(value)
    if raw and BASE64.fullmatch(raw):
        with contextlib.suppress(binascii.Error):
            return base64.b64decode(raw)
    return raw


mlflow.models.set_model(CellModel())
