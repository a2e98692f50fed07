"""CIFAR-10/100 through torchvision: its python-pickle release, training split only.

The validation split is carved from train (``loader``); the test split is never read.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path
from urllib.error import URLError

import torch
import torchvision
from torch import Tensor

from alexnet.config import DataConfig
from alexnet.data.cache import cache_dir, first_line
from alexnet.data.folder import to_canvas
from alexnet.errors import DataError

# source -> (torchvision class name, the folder its archive extracts to, the files the
# training split is read from: torchvision's train_list and meta)
RELEASES = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py",
                [f"data_batch_{i}" for i in range(1, 6)] + ["batches.meta"]),
    "cifar100": ("CIFAR100", "cifar-100-python", ["train", "meta"]),
}


def root_of(cfg: DataConfig) -> Path:
    """Where the extracted folder's parent is; the folder itself is accepted too."""
    folder = RELEASES[cfg.source][1]
    root = Path(cfg.root).expanduser() if cfg.root else cache_dir(cfg) / "cifar"
    return root.parent if root.name == folder else root


def dataset_class(source: str) -> type:
    # Looked up at call time, so tests can stand in a fake for torchvision's class.
    return getattr(torchvision.datasets, RELEASES[source][0])


def release_files(source: str, root: Path) -> list[Path]:
    _, folder, names = RELEASES[source]
    return [root / folder / name for name in names]


def ensure_present(cfg: DataConfig, root: Path) -> None:
    """Download and extract when the release is absent; a DataError when that fails."""
    if all(p.is_file() for p in release_files(cfg.source, root)):
        return
    name, folder, _ = RELEASES[cfg.source]
    if not cfg.download:
        reason = "download is off"
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


def decode(cfg: DataConfig, root: Path) -> dict[str, Tensor | list[str]]:
    try:
        ds = dataset_class(cfg.source)(str(root), train=True, download=False)
    except (RuntimeError, OSError, EOFError) as err:
        folder = root / RELEASES[cfg.source][1]
        raise DataError(f"{cfg.source}: cannot read {folder} ({first_line(err)}); delete it "
                        "to download again, or pass --data-root with a good copy") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    if cfg.image_size != images.shape[-1]:
        images = torch.cat([to_canvas(c, cfg.image_size) for c in images.split(1024)])
    return {"images": images, "labels": torch.as_tensor(ds.targets, dtype=torch.long),
            "classes": list(ds.classes)}
