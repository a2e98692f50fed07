"""Errors a user can fix. The CLI prints their message as one line and exits with 2."""

from __future__ import annotations


class AblateError(Exception):
    """Bad input: a config, an ablation file, a CLI argument, data or a store.

    The message is one line that names what is wrong and how to fix it.
    """


class ConfigError(AblateError):
    """A run config or ablation file that does not validate."""


class DataError(AblateError):
    """Data that cannot be loaded: a missing directory, an empty class, a bad image."""


class StoreError(AblateError):
    """A tracking or study store that cannot be reached or is not what we expect."""
