"""Decoded datasets cached on disk as uint8 tensors, so decoding happens once.

One file per (source, location, image size); inside it, the key of the files it was built
from. A file whose key differs (the files changed: stale), that cannot be read, or whose
checksum does not match (truncated, overwritten: corrupt) is rebuilt. Writes go to a
temporary file renamed into place, so a killed process never leaves half a cache, and a
file lock makes concurrent runs on one machine decode once and share the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from alexnet.config import DataConfig

log = logging.getLogger(__name__)

# Bump when what a cache file holds, or how images are decoded into it, changes.
CACHE_FORMAT = 1


def cache_dir(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("ALEXNET_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "alexnet-ablate"


def digest(*parts: Any) -> str:
    """A short stable hex id of JSON-able parts."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def checksum(payload: dict[str, Any]) -> int:
    """crc32 over every value: ~4 GB/s, so checking 150 MB of CIFAR costs ~40 ms."""
    crc = 0
    for name in sorted(payload):
        value = payload[name]
        crc = zlib.crc32(name.encode(), crc)
        if isinstance(value, torch.Tensor):
            crc = zlib.crc32(str((value.dtype, tuple(value.shape))).encode(), crc)
            crc = zlib.crc32(value.detach().cpu().contiguous().numpy(), crc)
        else:
            crc = zlib.crc32(json.dumps(value, sort_keys=True).encode(), crc)
    return crc


def read(path: Path, key: str) -> dict[str, Any] | None:
    """The payload cached at ``path`` for ``key``; None when absent, stale or corrupt."""
    if not path.exists():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        ok = (isinstance(stored, dict) and stored.get("format") == CACHE_FORMAT
              and isinstance(stored.get("payload"), dict))
    except Exception as err:  # truncated zip, garbage bytes, wrong pickle: all "corrupt"
        log.warning("cache %s is unreadable (%s); rebuilding it", path, first_line(err))
        return None
    if not ok:
        log.warning("cache %s has an unknown layout; rebuilding it", path)
        return None
    if stored.get("key") != key:
        log.info("cache %s is stale (its source files changed); rebuilding it", path)
        return None
    if stored.get("checksum") != checksum(stored["payload"]):
        log.warning("cache %s fails its checksum; rebuilding it", path)
        return None
    return stored["payload"]


def write(path: Path, key: str, payload: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same folder, fsynced, renamed into place."""
    record = {"format": CACHE_FORMAT, "key": key, "checksum": checksum(payload),
              "payload": payload}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cached(
    path: Path, key: str, build: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """The payload at ``path`` if it is there for ``key``, else ``build()`` it and save it.

    An unwritable cache folder is not fatal: the data is built and used, with a warning.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        lock.acquire()
    except OSError as err:
        log.warning("cannot use the cache folder %s (%s); set data.cache_dir or "
                    "ALEXNET_CACHE to a writable folder", path.parent, first_line(err))
        return build()
    try:
        payload = read(path, key)
        if payload is None:
            payload = build()
            try:
                write(path, key, payload)
            except OSError as err:
                log.warning("cannot write the cache %s (%s)", path, first_line(err))
        return payload
    finally:
        lock.release()


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
