"""The one way a finished cell's weights become a classifier of raw images, for `ablate
predict`, the MLflow model that `ablate serve` serves, and `ablate demo`.

Nothing here unpickles: the network is built from the run's resolved config (YAML, read
with ``yaml.safe_load``), its weights are a state dict read with ``weights_only=True``, and
the class names and pixel statistics are JSON. The input is what a user has: an image file
of the size the cell trained on (``data.image_size``, e.g. 32×32 for CIFAR nets); it is
prepared exactly as evaluation prepares a held-out image (``augment.eval_batch``: centre
crop, or the paper's ten crops, then the training split's mean/std), so a prediction here
is the prediction that the cell's validation error counted.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alexnet.config import RunConfig
from alexnet.data.augment import Augment, eval_batch
from alexnet.data.stats import Stats
from alexnet.errors import ConfigError, DataError

PREPROCESS_FORMAT = 1
TOP_K = 5


@dataclass(frozen=True)
class Prediction:
    """One image's classes: the top ``TOP_K`` (best first) and every class's probability."""

    top: list[tuple[str, float]]
    probabilities: dict[str, float]

    @property
    def label(self) -> str:
        return self.top[0][0]

    def as_dict(self) -> dict[str, Any]:
        """What the served model answers per image (JSON-able)."""
        return {"class": self.top[0][0], "probability": self.top[0][1],
                "top5": [{"class": c, "probability": p} for c, p in self.top],
                "probabilities": self.probabilities}


def preprocess_facts(classes: list[str], stats: Stats) -> dict[str, Any]:
    """What the weights need beside the config to classify an image: the class names (from
    the data: ``Data.classes``) and the training split's pixel statistics."""
    return {"format": PREPROCESS_FORMAT, "classes": list(classes),
            "stats": {k: v.tolist() for k, v in stats.to_dict().items()}}


class Classifier:
    """A cell's trained network and the preprocessing its evaluation used."""

    def __init__(self, cfg: RunConfig, model: nn.Module, classes: list[str], stats: Stats,
                 device: torch.device) -> None:
        from alexnet.train import use_channels_last

        # The layout and precision evaluation used (train.py), so that an image gets the
        # probabilities its cell's held-out scores counted.
        self.channels_last = use_channels_last(device, cfg)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.cfg, self.model, self.classes, self.device = cfg, model.eval(), classes, device
        self.stats = stats.to(device)
        self.augment = Augment.from_config(cfg.data)

    @property
    def input_size(self) -> int:
        """The side of the square images it takes: the size its training images had."""
        return self.cfg.data.image_size

    def check_size(self, width: int, height: int, what: str) -> None:
        size = self.input_size
        if (width, height) != (size, size):
            raise DataError(f"{what} is {width}×{height}; this model takes {size}×{size} images "
                            f"(the size it was trained on): resize or crop it to {size}×{size}")

    @torch.no_grad()
    def probabilities(self, images: Tensor) -> Tensor:
        """uint8 images (N,3,S,S) at the input size -> float32 softmax outputs (N,classes)."""
        from alexnet.train import autocast_for, softmax_probs

        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise DataError(f"expected uint8 RGB images (N,3,H,W), got {images.dtype} "
                            f"{tuple(images.shape)}")
        self.check_size(images.shape[3], images.shape[2], "an image")
        x = eval_batch(images.to(self.device), self.augment, self.stats, self.cfg.data.ten_crop)
        with autocast_for(self.device, self.cfg):
            return softmax_probs(self.model, x, self.channels_last).float().cpu()

    def predict(self, images: Tensor) -> list[Prediction]:
        probs = self.probabilities(images)
        k = min(TOP_K, len(self.classes))
        top = probs.topk(k, dim=1)
        return [Prediction([(self.classes[i], float(p)) for p, i in zip(ps.tolist(), idx.tolist(),
                                                                       strict=True)],
                           dict(zip(self.classes, row.tolist(), strict=True)))
                for ps, idx, row in zip(top.values, top.indices, probs, strict=True)]

    def read(self, data: bytes, what: str) -> Tensor:
        """An encoded image file (PNG, JPEG, ...) of the input size -> uint8 (3,S,S)."""
        return decode_image(data, what, self.check_size)


def decode_image(data: bytes, what: str, check_size: Any = None) -> Tensor:
    """uint8 RGB (3,H,W) from an image file's bytes; a DataError naming ``what`` when it is
    no image. ``check_size(width, height, what)`` runs on the header, before any pixel is
    decoded, so a huge or wrongly sized image costs nothing."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if check_size is not None:
                check_size(im.width, im.height, what)
            rgb = im.convert("RGB")
    except UnidentifiedImageError:
        raise DataError(f"{what} is not an image PIL can read (PNG, JPEG, BMP, WebP, ...); "
                        "pass an image file") from None
    except Image.DecompressionBombError as err:  # more pixels than PIL will ever decode
        raise DataError(f"{what} is too large to decode ({err}); pass a smaller image"
                        ) from None
    except OSError as err:  # truncated or corrupt
        raise DataError(f"{what} cannot be decoded ({str(err).strip() or type(err).__name__}); "
                        "pass an intact image file") from None
    return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(
        rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()


def read_image_file(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass the path of an image")
    return path.read_bytes()


def load_classifier(config: Path, weights: Path, preprocess: Path,
                    device: str = "auto") -> Classifier:
    """The classifier from a cell run's three artifacts: ``config.yaml``,
    ``weights/model.pt`` and ``weights/preprocess.json`` (or their copies inside the MLflow
    model). Reads nothing that can run code."""
    import yaml
    from pydantic import ValidationError

    from alexnet.config import describe_validation_error
    from alexnet.models import build_model_from_config
    from alexnet.train import resolve_device

    try:
        cfg = RunConfig.model_validate(yaml.safe_load(config.read_text(encoding="utf-8")))
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, str(config))) from None
    facts = json.loads(preprocess.read_text(encoding="utf-8"))
    if facts.get("format") != PREPROCESS_FORMAT:
        raise ConfigError(f"{preprocess}: format {facts.get('format')!r} is not "
                          f"{PREPROCESS_FORMAT}; rerun the cell with this version (--force)")
    stats = Stats.from_dict({k: torch.tensor(v) for k, v in facts["stats"].items()})
    classes = [str(c) for c in facts["classes"]]
    target = resolve_device(device)
    model = build_model_from_config(cfg.model, num_classes=len(classes))
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return Classifier(cfg, model.to(target), classes, stats, target)
