"""Augmented training batches/s: the device-resident path against the usual DataLoader.

    python benchmarks/data_path.py --data-root ../shared/data/cifar10 [--batches 200]

Both sides produce the same thing from the same 50,000 images: random 32x32 crops of the
4-padded image, horizontal flips, PCA lighting (Section 4.1) and normalisation, in batches
of 128. One side is ``open_data`` (a uint8 tensor on the device, batch ops); the other is
torchvision ``ImageFolder`` + per-image transforms + ``DataLoader(num_workers=2)``. The
one-time decode (or cache read) is done first and not timed, as is DataLoader start-up.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from alexnet.config import DataConfig
from alexnet.data import Data, open_data
from alexnet.data.augment import Lighting


def device_batches(data: Data, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for epoch in itertools.count():
        yield from data.train_batches(epoch, batch_size, seed=0)


def rate(batches: Iterator, n: int, device: torch.device) -> float:
    """Batches per second over ``n`` batches, after one untimed batch (start-up)."""
    next(batches)
    started = time.perf_counter()
    for _ in itertools.islice(batches, n):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, help="folder holding train/<class>/*.jpg")
    parser.add_argument("--batches", type=int, default=200, help="timed batches per path")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (baseline)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the device path; 1 avoids oversubscribing a "
                             "shared CPU, and the baseline gets --workers processes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    cfg = DataConfig(source="imagefolder", root=args.data_root, cache_dir=args.cache_dir,
                     val_fraction=0.0, image_size=32, crop_size=32, crop_padding=4,
                     random_crop=True, flip=True, pca_lighting=True, pca_std=0.1)
    started = time.perf_counter()
    data = open_data(cfg, device)
    print(f"data: {args.data_root}: {data.train_size:,} images, {data.num_classes} classes, "
          f"batch {args.batch_size}, {args.batches} timed batches per path")
    print(f"warm-up, not timed: open_data (decode or cache read, stats) took "
          f"{time.perf_counter() - started:.1f} s; DataLoader start-up not timed either")

    ours = rate(device_batches(data, args.batch_size), args.batches, device)
    print(f"device-resident (open_data on {device}, {args.threads} thread(s)): "
          f"{ours:8.1f} batches/s ({ours * args.batch_size:,.0f} images/s)")

    s = data.stats
    baseline = datasets.ImageFolder(
        f"{args.data_root}/train",
        transform=transforms.Compose([
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            Lighting(s, cfg.pca_std),
            transforms.Normalize(s.mean.tolist(), s.std.tolist()),
        ]))
    loader = DataLoader(baseline, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.workers, pin_memory=device.type == "cuda",
                        persistent_workers=args.workers > 0)
    moved = ((x.to(device, non_blocking=True), y.to(device, non_blocking=True))
             for x, y in itertools.chain.from_iterable(itertools.repeat(loader)))
    theirs = rate(moved, args.batches, device)
    print(f"torchvision ImageFolder + transforms + DataLoader(num_workers={args.workers}): "
          f"{theirs:8.1f} batches/s ({theirs * args.batch_size:,.0f} images/s)")
    print(f"speedup: {ours / theirs:.1f}x")


if __name__ == "__main__":
    main()
