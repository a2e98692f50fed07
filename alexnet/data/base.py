"""The interface the training loop sees, shared by the in-memory and the streaming path.

Both paths agree on four rules that make runs comparable, resumable and honest:

- an epoch's randomness (shuffle, crops, flips, lighting) comes only from ``(seed, epoch)``,
  so a run resumed at epoch k replays epoch k exactly;
- the last partial training batch is kept when it holds at least half a batch and dropped
  otherwise (see ``steps_per_epoch``);
- evaluation crops come from the same canvas as training crops (Section 4.1);
- validation steers training (schedule, early stop, sweeps); the test split, when there is
  one, is read only by ``test_batches``, which the training loop calls once, on the final
  model. Statistics (mean, std, PCA) come from the training split alone.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from torch import Tensor

from alexnet.config import DataConfig
from alexnet.data.augment import Augment
from alexnet.data.stats import Stats
from alexnet.errors import ConfigError


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed from (run seed, epoch) alone: the same on every machine and process."""
    digest = hashlib.sha256(f"alexnet-data/{seed}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def steps_for(n: int, batch_size: int) -> int:
    """Training batches in an epoch of ``n`` images.

    The tail batch is kept when it is at least half a batch (or the only batch): dropping it
    would lose up to half a batch of images per epoch on small subsets, while a tiny tail
    would be a noisy step whose few images weigh as much as a whole batch. The dropped
    images differ every epoch, since the shuffle does.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    full, tail = divmod(n, batch_size)
    keep_tail = tail > 0 and (full == 0 or 2 * tail >= batch_size)
    return full + int(keep_tail)


class Data(ABC):
    """A dataset ready for training: batches on ``device``, normalised, augmented."""

    classes: list[str]
    train_size: int
    val_size: int
    test_size: int = 0  # 0: no test split
    fingerprint: str  # short hex id of the source and its files, logged as a tag
    input_size: int  # == cfg.crop_size, what the model sees
    stats: Stats  # of the training split, on the CPU
    device: torch.device

    def __init__(self, cfg: DataConfig, device: torch.device, classes: list[str],
                 fingerprint: str, stats: Stats) -> None:
        """What both paths share: identity, statistics, and the augmentation to apply."""
        self.device = device
        self.classes = list(classes)
        self.fingerprint = fingerprint
        self.input_size = cfg.crop_size
        self.stats = stats
        self.aug = Augment.from_config(cfg)
        self.ten_crop = cfg.ten_crop

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def check_batch_size(self, batch_size: int) -> None:
        """A ConfigError when one training batch would be more than the whole split: every
        "epoch" would be one smaller batch, silently a different experiment."""
        if batch_size > self.train_size:
            raise ConfigError(
                f"train.batch_size={batch_size} is larger than the training split "
                f"({self.train_size} images); use --set train.batch_size={self.train_size} "
                "or less, or more training data (raise data.max_train or lower data.val_fraction)")

    def steps_per_epoch(self, batch_size: int) -> int:
        self.check_batch_size(batch_size)
        return steps_for(self.train_size, batch_size)

    @abstractmethod
    def train_batches(
        self, epoch: int, batch_size: int, seed: int
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Augmented float32 images (B,3,c,c) and int64 labels, shuffled by (seed, epoch)."""

    @abstractmethod
    def eval_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Validation images, centre crop (B,3,c,c) or ten crops (B,10,3,c,c), and labels."""

    @abstractmethod
    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Test images with ``eval_batches``' crops. The first call reads (decodes) them:
        call it once, on the final model. A ValueError when ``test_size`` is 0."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(classes={self.num_classes}, train={self.train_size}, "
                f"val={self.val_size}, test={self.test_size}, input={self.input_size}, "
                f"fingerprint={self.fingerprint}, device={self.device})")
