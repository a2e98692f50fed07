"""alexnet-ablate: which of AlexNet's design choices matter, measured."""

from alexnet.config import RunConfig, build_config
from alexnet.errors import AblateError, ConfigError, DataError, StoreError

__all__ = ["AblateError", "ConfigError", "DataError", "RunConfig", "StoreError", "build_config"]
__version__ = "0.1.0"
