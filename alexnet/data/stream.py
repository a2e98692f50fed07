"""The streaming path: an image folder too large for memory (ImageNet), read per epoch.

torchvision ``ImageFolder`` + per-image transforms in ``DataLoader`` workers, with the
in-memory path's rules: the same split, the same crop/flip/lighting scheme, a shuffle and
augmentation that depend on (seed, epoch) alone, the same tail-batch rule, and evaluation
crops made on the device by the same code. A ``test/`` folder becomes the test split, read
only by ``test_batches``. Not the default (DESIGN.md: small datasets live on the device).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from alexnet.config import DataConfig
from alexnet.data import folder, progress
from alexnet.data.augment import Lighting, eval_batch
from alexnet.data.base import Data, epoch_seed, steps_for
from alexnet.data.cache import cache_dir, cached, digest
from alexnet.data.split import carve_val, subset
from alexnet.data.stats import PixelMoments, Stats
from alexnet.errors import DataError

log = logging.getLogger(__name__)

# Stats of a streamed folder come from a stratified sample of its training split: exact for
# small folders, and within ~1e-3 of the full-set values for ImageNet, at a fraction of a pass.
STATS_SAMPLE = 10_000
STATS_VERSION = 1


class ListedFolder(ImageFolder):
    """torchvision's ImageFolder over a listing already scanned and checked (no rescan)."""

    def __init__(self, root: Path, classes: list[str], samples: list[tuple[str, int]],
                 transform: v2.Transform) -> None:
        self._listed = classes, samples
        super().__init__(str(root), transform=transform, loader=folder.load_image)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = self._listed[0]
        return classes, {name: i for i, name in enumerate(classes)}

    def make_dataset(self, *args, **kwargs) -> list[tuple[str, int]]:  # type: ignore[override]
        return self._listed[1]


class Seeded(Dataset):
    """Runs the wrapped dataset's random transforms under a per-sample seed, so an image's
    crop, flip and lighting depend on (seed, epoch, position) only: not on the number of
    workers, their scheduling, or the caller's global RNG (restored afterwards)."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        index, seed = key
        # The CPU generator alone (what the transforms draw from): 4 us a sample, where
        # torch.manual_seed + fork_rng, which visit every backend, take 110 us.
        rng = torch.default_generator
        saved = rng.get_state()
        rng.manual_seed(seed)
        try:
            return self.base[index]
        finally:
            rng.set_state(saved)


class EpochOrder(Sampler[list[tuple[int, int]]]):
    """Batches of (dataset index, sample seed) in the epoch's (seed, epoch) order."""

    def __init__(self, indices: list[int], batch_size: int, seed: int, epoch: int) -> None:
        self.indices, self.batch_size = indices, batch_size
        self.seed, self.epoch = seed, epoch

    def __len__(self) -> int:
        return steps_for(len(self.indices), self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        n = len(self.indices)
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=g).tolist()  # first, as in the in-memory path
        seeds = torch.randint(0, 2**62, (n,), generator=g).tolist()
        for i in range(len(self)):
            span = range(i * self.batch_size, min((i + 1) * self.batch_size, n))
            yield [(self.indices[order[j]], seeds[j]) for j in span]


def canvas_transform(cfg: DataConfig) -> v2.Transform:
    # Section 4.1: short side to image_size, then the central square.
    return v2.Compose([v2.Resize(cfg.image_size, antialias=True),
                       v2.CenterCrop(cfg.image_size)])


def train_transform(cfg: DataConfig, stats: Stats) -> v2.Transform:
    steps: list = [canvas_transform(cfg)]
    if cfg.random_crop:
        steps.append(v2.RandomCrop(cfg.crop_size, padding=cfg.crop_padding or None))
    else:
        steps.append(v2.CenterCrop(cfg.crop_size))
    if cfg.flip:
        steps.append(v2.RandomHorizontalFlip())
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if cfg.pca_lighting:
        steps.append(Lighting(stats, cfg.pca_std))
    steps.append(v2.Normalize(stats.mean.tolist(), stats.std.tolist()))
    return v2.Compose(steps)


def open_stream(cfg: DataConfig, device: torch.device, num_workers: int = 4) -> Data:
    listing = folder.scan(cfg.root)
    labels = torch.tensor([label for _, label in listing.train], dtype=torch.long)
    if listing.val is None:
        train_idx, val_idx = carve_val(labels, cfg.val_fraction, cfg.split_seed)
    else:
        train_idx, val_idx = torch.arange(labels.numel()), None
    train_idx = subset(train_idx, labels, cfg.max_train, cfg.split_seed)
    if train_idx.numel() == 0:
        raise DataError(f"imagefolder: the training split of {listing.root} is empty after "
                        f"carving val_fraction={cfg.val_fraction}; lower data.val_fraction")
    key = listing.key(cfg.image_size)
    stats = stream_stats(cfg, listing, train_idx, labels, key)

    train = ListedFolder(listing.root / "train", listing.classes, listing.train,
                         train_transform(cfg, stats))
    canvas = canvas_transform(cfg)
    if listing.val is None:
        val: Dataset = Subset(ListedFolder(listing.root / "train", listing.classes,
                                           listing.train, canvas), val_idx.tolist())
    else:
        val = ListedFolder(listing.root / "val", listing.classes, listing.val, canvas)
    # Listed, not read: ListedFolder opens an image only when a batch asks for it.
    test = (None if listing.test is None else
            ListedFolder(listing.root / "test", listing.classes, listing.test, canvas))
    return StreamData(cfg, device, num_workers, train, train_idx.tolist(), val,
                      listing.classes, key, stats, test)


def stream_stats(cfg: DataConfig, listing: folder.Listing, train_idx: Tensor,
                 labels: Tensor, key: str) -> Stats:
    split = digest(STATS_VERSION, listing.val is None, cfg.val_fraction, cfg.split_seed,
                   cfg.max_train, STATS_SAMPLE)
    location = digest(str(listing.root.resolve()), cfg.image_size)
    path = cache_dir(cfg) / f"imagefolder-{location}.stream-stats-{split}.pt"

    def build() -> dict[str, Tensor]:
        sample = subset(train_idx, labels, STATS_SAMPLE, cfg.split_seed).tolist()
        log.info("pixel statistics of %d training images of %s (once)", len(sample),
                 listing.root)
        moments = PixelMoments()
        for a in range(0, len(sample), 256):  # bounded memory at 256x256 canvases
            progress.report("pixel statistics", a, len(sample))
            paths = [listing.train[i][0] for i in sample[a:a + 256]]
            moments.add(folder.decode_all(paths, cfg.image_size, what=None))
        return moments.stats().to_dict()

    return Stats.from_dict(cached(path, key, build))


def worker_error(err: DataError) -> DataError:
    """A DataError raised in a worker comes back with its traceback as the message;
    keep the original one-line message."""
    last = str(err).strip().splitlines()[-1]
    return DataError(last.split("DataError: ", 1)[-1])


class StreamData(Data):
    def __init__(self, cfg: DataConfig, device: torch.device, num_workers: int,
                 train: Dataset, train_indices: list[int], val: Dataset, classes: list[str],
                 fingerprint: str, stats: Stats, test: Dataset | None = None) -> None:
        super().__init__(cfg, device, classes, fingerprint, stats)
        self.num_workers = num_workers
        self.train, self.train_indices, self.val = Seeded(train), train_indices, val
        self.test = test
        self.train_size = len(train_indices)
        self.val_size = len(val)  # type: ignore[arg-type]
        self.test_size = 0 if test is None else len(test)  # type: ignore[arg-type]
        self._stats = stats.to(device)
        self._loader = functools.partial(
            DataLoader, num_workers=num_workers, pin_memory=device.type == "cuda")

    def train_batches(
        self, epoch: int, batch_size: int, seed: int
    ) -> Iterator[tuple[Tensor, Tensor]]:
        self.check_batch_size(batch_size)
        order = EpochOrder(self.train_indices, batch_size, seed, epoch)
        try:
            for x, y in self._loader(self.train, batch_sampler=order):
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        except DataError as err:
            raise worker_error(err) from None

    def eval_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        return self._crops(self.val, batch_size)

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        if self.test is None:
            raise ValueError(f"{self!r} has no test split (test_size is 0)")
        return self._crops(self.test, batch_size)

    def _crops(self, canvases: Dataset, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        try:
            for x, y in self._loader(canvases, batch_size=batch_size):
                x = x.to(self.device, non_blocking=True)
                yield (eval_batch(x, self.aug, self._stats, self.ten_crop),
                       y.to(self.device, non_blocking=True))
        except DataError as err:
            raise worker_error(err) from None
