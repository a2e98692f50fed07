"""CIFAR-10/100 through torchvision: its python-pickle release.

The validation split is carved from train (``loader``). The test split is decoded only when
the final model is scored on it, once, at the end of a run.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path
from typing import NamedTuple
from urllib.error import URLError

import torch
import torchvision
from torch import Tensor

from alexnet.config import DataConfig
from alexnet.data.cache import cache_dir, first_line
from alexnet.data.folder import to_canvas
from alexnet.errors import DataError


class Release(NamedTuple):
    dataset: str  # torchvision's class name
    folder: str  # the folder its archive extracts to
    train_files: list[str]  # torchvision's train_list and meta
    test_file: str  # torchvision's test_list
    test_size: int  # images in the test split, as published (and MD5-checked by torchvision)


RELEASES = {
    "cifar10": Release("CIFAR10", "cifar-10-batches-py",
                       [f"data_batch_{i}" for i in range(1, 6)] + ["batches.meta"],
                       "test_batch", 10_000),
    "cifar100": Release("CIFAR100", "cifar-100-python", ["train", "meta"], "test", 10_000),
}


def root_of(cfg: DataConfig) -> Path:
    """Where the extracted folder's parent is; the folder itself is accepted too."""
    folder = RELEASES[cfg.source].folder
    root = Path(cfg.root).expanduser() if cfg.root else cache_dir(cfg) / "cifar"
    return root.parent if root.name == folder else root


def dataset_class(source: str) -> type:
    # Looked up at call time, so tests can stand in a fake for torchvision's class.
    return getattr(torchvision.datasets, RELEASES[source].dataset)


def release_files(source: str, root: Path) -> list[Path]:
    """Every file of the release. The test file is one of them: torchvision checks the
    release as a whole, so a copy without it cannot be read at all, not even its train."""
    release = RELEASES[source]
    return [root / release.folder / name
            for name in (*release.train_files, release.test_file)]


def ensure_present(cfg: DataConfig, root: Path) -> None:
    """Download and extract when the release is absent; a DataError when that fails."""
    missing = [p.name for p in release_files(cfg.source, root) if not p.is_file()]
    if not missing:
        return
    name, folder = RELEASES[cfg.source].dataset, RELEASES[cfg.source].folder
    if not cfg.download:
        reason = f"download is off; missing: {', '.join(missing[:3])}"
    else:
        try:
            dataset_class(cfg.source)(str(root), train=True, download=True)
            return
        except (URLError, RuntimeError, OSError, EOFError, tarfile.TarError) as err:
            reason = f"download failed: {first_line(err)}"
    hint = ""
    if (root / "train").is_dir():
        hint = "; for a folder of images use data.source=imagefolder"
    raise DataError(f"{cfg.source}: no {name} release in {root / folder} ({reason}); pass "
                    f"--data-root with the parent of the extracted '{folder}' folder{hint}")


def files_key(cfg: DataConfig, root: Path) -> str:
    """Content hash of the release files (MD5, as torchvision checks them), so the same
    CIFAR gets the same fingerprint on every machine; ~0.4 s for CIFAR-10."""
    h = hashlib.sha256(f"{cfg.source}/{cfg.image_size}".encode())
    for path in release_files(cfg.source, root):
        md5 = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                md5.update(block)
        h.update(f"{path.name}\0{path.stat().st_size}\0{md5.hexdigest()}\n".encode())
    return h.hexdigest()[:16]


def decode(cfg: DataConfig, root: Path, *, train: bool = True) -> dict[str, Tensor | list[str]]:
    """The training split, or with ``train=False`` the test split, as uint8 canvases."""
    release = RELEASES[cfg.source]
    folder = root / release.folder
    try:
        ds = dataset_class(cfg.source)(str(root), train=train, download=False)
    except (RuntimeError, OSError, EOFError) as err:
        raise DataError(f"{cfg.source}: cannot read {folder} ({first_line(err)}); delete it "
                        "to download again, or pass --data-root with a good copy") from None
    if not train and len(ds.data) != release.test_size:
        raise DataError(f"{cfg.source}: {folder / release.test_file} holds {len(ds.data)} "
                        f"images, not the release's {release.test_size}; delete {folder} to "
                        "download again, or pass --data-root with a good copy")
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    if cfg.image_size != images.shape[-1]:
        images = torch.cat([to_canvas(c, cfg.image_size) for c in images.split(1024)])
    return {"images": images, "labels": torch.as_tensor(ds.targets, dtype=torch.long),
            "classes": list(ds.classes)}
