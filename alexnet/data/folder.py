"""An image folder: ``root/train/<class>/...``, an optional ``root/val/<class>/...`` and an
optional ``root/test/<class>/...``.

Validation comes from ``val/``, or is carved from train when there is none; it steers
schedules, early stops and sweeps. ``test/`` is the held-out split: it is listed when the
folder is opened (so a mismatch fails before training), but its images are decoded only
when the final model is scored on it, once, at the end of a run.

Files are listed in torchvision ``ImageFolder``'s order (classes sorted, then a sorted
walk), so the in-memory and the streaming path index the same images the same way.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as TF

from alexnet.data import progress
from alexnet.data.cache import first_line
from alexnet.errors import DataError

HINT = ("pass --data-root with a folder holding train/<class>/<image> (and optionally val/ "
        "and test/)")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Listing:
    root: Path
    classes: list[str]
    train: list[tuple[str, int]]  # (path, class index), ImageFolder order
    val: list[tuple[str, int]] | None  # from val/, or None: carve from train
    test: list[tuple[str, int]] | None  # from test/, or None: no test split

    def key(self, image_size: int) -> str:
        """Hash of every file's relative path, size and mtime: any change means stale.

        A folder without test/ keeps the key it had before test/ was read at all."""
        h = hashlib.sha256(f"imagefolder/{image_size}/{self.classes}".encode())
        for part, samples in zip(SPLITS, (self.train, self.val or [], self.test or []),
                                 strict=True):
            for path, label in samples:
                st = os.stat(path)
                rel = os.path.relpath(path, self.root)
                h.update(f"{part}\0{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]


def scan(root: str | Path | None) -> Listing:
    if root is None:
        raise DataError(f"imagefolder: no data root given; {HINT}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"imagefolder: {root} is not a directory; {HINT}")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"imagefolder: no train/ folder in {root}; {HINT}")
    classes = class_names(train_dir)
    if len(classes) < 2:
        # One class trains to 0% error and says nothing: refuse it rather than report it.
        raise DataError(f"imagefolder: needs at least 2 class folders in {train_dir}, found "
                        f"{len(classes)} ({classes[0]!r}); add a folder per class")
    train = list_images(train_dir, classes)
    val, test = (other_split(root / name, train_dir, classes) for name in SPLITS[1:])
    return Listing(root, classes, train, val, test)


def other_split(split_dir: Path, train_dir: Path, classes: list[str]
                ) -> list[tuple[str, int]] | None:
    """The images of val/ or test/, None when the folder is absent; its class folders must
    be train/'s, or labels would mean other classes."""
    if not split_dir.is_dir():
        return None
    found = class_names(split_dir)
    if found != classes:
        only_train = sorted(set(classes) - set(found))
        only_here = sorted(set(found) - set(classes))
        name = split_dir.name
        fix = ("remove val/ to carve it from train" if name == "val"
               else "remove test/ to train without a test split")
        raise DataError(
            f"imagefolder: the classes of {split_dir} differ from those of {train_dir} "
            f"(only in train: {only_train[:5]}, only in {name}: {only_here[:5]}); "
            f"give {name}/ the same class folders, or {fix}")
    return list_images(split_dir, classes)


def class_names(split_dir: Path) -> list[str]:
    names = sorted(e.name for e in os.scandir(split_dir)
                   if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise DataError(f"imagefolder: no class folders in {split_dir}; {HINT}")
    return names


def list_images(split_dir: Path, classes: list[str]) -> list[tuple[str, int]]:
    samples = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        found = [
            os.path.join(folder, fname)
            for folder, _, fnames in sorted(os.walk(class_dir, followlinks=True))
            for fname in sorted(fnames)
            if fname.lower().endswith(IMG_EXTENSIONS) and not fname.startswith(".")
        ]
        if not found:
            raise DataError(
                f"imagefolder: class folder {class_dir} holds no images "
                f"({', '.join(IMG_EXTENSIONS)}); add images or remove the folder")
        samples += [(path, label) for path in found]
    return samples


def to_canvas(img: Tensor, size: int) -> Tensor:
    """Short side resized to ``size``, centre-cropped square (Section 4.1's 256x256)."""
    if img.shape[-2:] == (size, size):
        return img
    img = TF.resize(img, [size], antialias=True)
    return TF.center_crop(img, [size, size])


def load_image(path: str) -> Tensor:
    """uint8 RGB (3,H,W). torchvision's decoder first (JPEG, PNG, WebP, GIF: fast, and it
    releases the GIL, so threads decode in parallel); PIL for the other formats."""
    try:
        img = decode_image(read_file(path), mode=ImageReadMode.RGB)
        return img[0] if img.ndim == 4 else img  # an animated GIF: its first frame
    except (RuntimeError, ValueError, OSError):
        pass
    try:
        with Image.open(path) as im:
            return TF.pil_to_tensor(im.convert("RGB"))
    except Exception as err:
        raise DataError(f"imagefolder: cannot read image {path} ({first_line(err)}); "
                        "delete or replace the file") from None


def load_canvas(path: str, size: int) -> Tensor:
    return to_canvas(load_image(path), size)


def decode_all(paths: list[str], size: int, workers: int | None = None,
               what: str | None = "decoding images") -> Tensor:
    """uint8 (N,3,size,size). Threads over chunks: reading and decoding both release the GIL,
    so 50k CIFAR JPEGs take ~4 s on 2 cores, against ~10 s in one thread. Reports ``what``
    with the images done so far after every chunk (``alexnet.data.progress``); None: the
    caller reports."""
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)

    def fill(start: int, stop: int) -> int:
        for i in range(start, stop):
            out[i] = load_canvas(paths[i], size)
        return stop - start

    if workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        workers = min(8, 2 * cores)  # 2x: some of the time goes to waiting on the disk
    chunk = 512
    chunks = [(s, min(s + chunk, len(paths))) for s in range(0, len(paths), chunk)]
    done = 0

    def told(n: int) -> None:
        if what is not None:
            progress.report(what, n, len(paths))

    told(done)
    if workers <= 1 or len(chunks) <= 1:
        for start, stop in chunks:
            done += fill(start, stop)
            told(done)
        return out
    with ThreadPoolExecutor(workers) as pool:
        jobs = [pool.submit(fill, start, stop) for start, stop in chunks]
        try:
            for job in as_completed(jobs):
                done += job.result()  # re-raises a DataError naming the bad file
                told(done)
        except BaseException:
            for job in jobs:
                job.cancel()
            raise
    return out
