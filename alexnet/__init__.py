"""alexnet-ablate: which of AlexNet's design choices matter, measured."""

from __future__ import annotations

from typing import Any

from alexnet.config import RunConfig, build_config
from alexnet.errors import AblateError, ConfigError, DataError, StoreError

__all__ = [
    "AblateError",
    "ConfigError",
    "DataError",
    "RunConfig",
    "StoreError",
    "build_config",
    "build_model",
]
__version__ = "0.1.0"

# Imported on first use: torch takes seconds to import, and the CLI imports this package
# for every command, including those (list, --help) that never build a model.
_LAZY = {"build_model": "alexnet.models"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'alexnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
