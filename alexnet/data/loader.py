"""``open_data``: a source decoded (or read from the cache) into uint8 tensors on the device.

The whole training split lives on the training device as one uint8 tensor (airbench's
design): an epoch is a permutation, and every batch is an index, a gather and a
multiply-add on that device; the host never waits on a tensor value.

The test split is not decoded here: ``TensorData.test_batches`` decodes it (into a cache
file of its own, beside the training split's) the first time the final model is scored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from alexnet.config import DataConfig
from alexnet.data import cifar, folder, synthetic
from alexnet.data.augment import draw_epoch, eval_batch, train_batch
from alexnet.data.base import Data, epoch_seed
from alexnet.data.cache import cache_dir, cached, digest
from alexnet.data.split import carve_val, subset
from alexnet.data.stats import Stats, compute_stats
from alexnet.errors import ConfigError, DataError

log = logging.getLogger(__name__)

STATS_VERSION = 1
T = TypeVar("T")


TestLoader = Callable[[], tuple[Tensor, Tensor]]  # () -> uint8 images (N,3,S,S), labels


@dataclass
class Decoded:
    """A source's images before splitting; ``val_images`` None means carve from train."""

    images: Tensor  # uint8 (N,3,S,S), CPU
    labels: Tensor  # int64 (N,)
    classes: list[str]
    val_images: Tensor | None
    val_labels: Tensor | None
    fingerprint: str  # covers the test split's files too
    cache_file: Path | None  # stats are cached beside it; None: not cached (synthetic)
    test_size: int = 0  # images in the test split; 0: none
    load_test: TestLoader | None = None  # decodes the test split; called at most once


def open_data(cfg: DataConfig, device: torch.device | str, num_workers: int = 4) -> Data:
    """Load ``cfg``'s source, split it, compute its stats, and put it on ``device``.

    ``in_memory=False`` streams an image folder through DataLoader workers (``num_workers``
    of them); synthetic and CIFAR data are small and always held in memory.
    """
    device = torch.device(device)
    check_geometry(cfg)
    if cfg.source == "imagefolder" and not cfg.in_memory:
        from alexnet.data.stream import open_stream

        return open_stream(cfg, device, num_workers)

    started = time.perf_counter()
    src = decode_source(cfg)
    if src.val_images is None:
        train_idx, val_idx = carve_val(src.labels, cfg.val_fraction, cfg.split_seed)
        val_images, val_labels = src.images[val_idx], src.labels[val_idx]
    else:
        train_idx = torch.arange(src.labels.numel())
        val_images, val_labels = src.val_images, src.val_labels
    train_idx = subset(train_idx, src.labels, cfg.max_train, cfg.split_seed)
    if train_idx.numel() == 0:
        raise DataError(f"{cfg.source}: the training split is empty after carving "
                        f"val_fraction={cfg.val_fraction}; lower data.val_fraction")
    train_images, train_labels = src.images[train_idx], src.labels[train_idx]
    stats = split_stats(cfg, src, train_images)
    data = TensorData(cfg, device, train_images, train_labels, val_images, val_labels,
                      src.classes, src.fingerprint, stats, src.test_size, src.load_test)
    log.info("data ready in %.1f s: %r", time.perf_counter() - started, data)
    return data


def check_geometry(cfg: DataConfig) -> None:
    if cfg.crop_size > cfg.image_size:
        raise ConfigError(
            f"data.crop_size={cfg.crop_size} is larger than data.image_size={cfg.image_size};"
            " crops (and the evaluation centre crop) come from the image_size canvas")


def decode_source(cfg: DataConfig) -> Decoded:
    if cfg.source == "synthetic":
        return decode_synthetic(cfg)
    if cfg.source in cifar.RELEASES:
        return decode_cifar(cfg)
    return decode_folder(cfg)


def decode_synthetic(cfg: DataConfig) -> Decoded:
    """Generated in well under a second, so never cached."""
    g = synthetic.generate(cfg.synthetic)
    train, val = g["train_images"], g["val_images"]
    if cfg.image_size != cfg.synthetic.image_size:
        train, val = (folder.to_canvas(x, cfg.image_size) for x in (train, val))
    fingerprint = digest("synthetic", synthetic.fingerprint(cfg.synthetic), cfg.image_size)
    return Decoded(train, g["train_labels"], synthetic.class_names(cfg.synthetic.num_classes),
                   val, g["val_labels"], fingerprint, None)


def decode_cifar(cfg: DataConfig) -> Decoded:
    root = cifar.root_of(cfg)
    cifar.ensure_present(cfg, root)
    key = cifar.files_key(cfg, root)
    path = cache_file(cfg, str(root.resolve()))
    payload = cached(path, key, lambda: timed(f"decoding {cfg.source} from {root}",
                                              lambda: cifar.decode(cfg, root)))

    def load_test() -> tuple[Tensor, Tensor]:
        test = cached(test_cache_file(path), key, lambda: timed(
            f"decoding the {cfg.source} test split (once)",
            lambda: cifar.decode(cfg, root, train=False)))
        return test["images"], test["labels"]

    return Decoded(payload["images"], payload["labels"], payload["classes"], None, None,
                   key, path, cifar.RELEASES[cfg.source].test_size, load_test)


def decode_folder(cfg: DataConfig) -> Decoded:
    listing = folder.scan(cfg.root)
    key = listing.key(cfg.image_size)
    path = cache_file(cfg, str(listing.root.resolve()))

    def build() -> dict[str, Any]:
        train = folder.decode_all([p for p, _ in listing.train], cfg.image_size,
                                  what="decoding train")
        out = {"images": train, "labels": labels_of(listing.train),
               "classes": listing.classes}
        if listing.val is not None:
            out["val_images"] = folder.decode_all([p for p, _ in listing.val], cfg.image_size,
                                                  what="decoding val")
            out["val_labels"] = labels_of(listing.val)
        return out

    n = len(listing.train) + len(listing.val or [])
    payload = cached(path, key, lambda: timed(
        f"decoding {n:,} images from {listing.root} (once; cached in {path})", build))
    test = listing.test or []

    def load_test() -> tuple[Tensor, Tensor]:
        out = cached(test_cache_file(path), key, lambda: timed(
            f"decoding the {len(test):,} test images of {listing.root} (once)",
            lambda: {"images": folder.decode_all([p for p, _ in test], cfg.image_size,
                                                 what="decoding test"),
                     "labels": labels_of(test)}))
        return out["images"], out["labels"]

    return Decoded(payload["images"], payload["labels"], payload["classes"],
                   payload.get("val_images"), payload.get("val_labels"), key, path,
                   len(test), load_test if test else None)


def labels_of(samples: list[tuple[str, int]]) -> Tensor:
    return torch.tensor([label for _, label in samples], dtype=torch.long)


def cache_file(cfg: DataConfig, location: str) -> Path:
    """One file per (source, location, image size); the key of its files is inside."""
    return cache_dir(cfg) / f"{cfg.source}-{digest(location, cfg.image_size)}.pt"


def test_cache_file(train_cache: Path) -> Path:
    """The test split's own file: decoded lazily, so never inside the training split's."""
    return train_cache.with_name(f"{train_cache.stem}.test.pt")


def split_stats(cfg: DataConfig, src: Decoded, train_images: Tensor) -> Stats:
    """Stats of this training split, cached beside the data (keyed by its fingerprint)."""
    if src.cache_file is None:
        return compute_stats(train_images)
    split = digest(STATS_VERSION, src.val_images is None, cfg.val_fraction, cfg.split_seed,
                   cfg.max_train)
    path = src.cache_file.with_name(f"{src.cache_file.stem}.stats-{split}.pt")
    return Stats.from_dict(cached(path, src.fingerprint,
                                  lambda: compute_stats(train_images).to_dict()))


def timed(what: str, build: Callable[[], T]) -> T:
    log.info("%s ...", what)
    started = time.perf_counter()
    out = build()
    log.info("%s: done in %.1f s", what, time.perf_counter() - started)
    return out


class TensorData(Data):
    """The in-memory path: uint8 tensors on ``device``, augmented there batch by batch."""

    def __init__(self, cfg: DataConfig, device: torch.device, train_images: Tensor,
                 train_labels: Tensor, val_images: Tensor, val_labels: Tensor,
                 classes: list[str], fingerprint: str, stats: Stats, test_size: int = 0,
                 load_test: TestLoader | None = None) -> None:
        super().__init__(cfg, device, classes, fingerprint, stats)
        self.train_images = train_images.to(device)
        self.train_labels = train_labels.to(device)
        self.val_images = val_images.to(device)
        self.val_labels = val_labels.to(device)
        self.train_size = int(train_labels.numel())
        self.val_size = int(val_labels.numel())
        self.test_size = test_size if load_test is not None else 0
        self._load_test = load_test
        self._test: tuple[Tensor, Tensor] | None = None  # decoded on first use, then kept
        self._stats = stats.to(device)

    def train_batches(
        self, epoch: int, batch_size: int, seed: int
    ) -> Iterator[tuple[Tensor, Tensor]]:
        n, steps = self.train_size, self.steps_per_epoch(batch_size)
        g = torch.Generator(device=self.device)
        g.manual_seed(epoch_seed(seed, epoch))
        # The permutation first, then the augmentation draws: the streaming path draws its
        # permutation first too, so on a CPU both shuffle identically.
        order = torch.randperm(n, generator=g, device=self.device)
        draws = draw_epoch(n, self.aug, g)
        for i in range(steps):
            a, b = i * batch_size, min((i + 1) * batch_size, n)
            idx = order[a:b]
            x = train_batch(self.train_images[idx], draws.window(a, b), self.aug, self._stats)
            yield x, self.train_labels[idx]

    def eval_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        return self._crops(self.val_images, self.val_labels, batch_size)

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        if self._load_test is None:
            raise ValueError(f"{self!r} has no test split (test_size is 0)")
        if self._test is None:
            images, labels = self._load_test()
            self._test = images.to(self.device), labels.to(self.device)
        return self._crops(*self._test, batch_size)

    def _crops(self, images: Tensor, labels: Tensor, batch_size: int
               ) -> Iterator[tuple[Tensor, Tensor]]:
        for a in range(0, labels.numel(), batch_size):
            x, y = images[a:a + batch_size], labels[a:a + batch_size]
            yield eval_batch(x, self.aug, self._stats, self.ten_crop), y
