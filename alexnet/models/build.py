"""``build_model``: a model by name, its axis options validated as a run config's are."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import ValidationError
from torch import nn

from alexnet.config import ModelConfig, describe_validation_error
from alexnet.errors import ConfigError
from alexnet.models.registry import build_model_from_config


def build_model(name: str, num_classes: int = 1000, **axis_options: Any) -> nn.Module:
    """Build ``name`` with the given axis options; the rest take ModelConfig's defaults.

    ``build_model("alexnet", towers=2)`` is the paper's network. Unknown names, options or
    values raise a one-line ConfigError that lists what is allowed.
    """
    options = [f for f in ModelConfig.model_fields if f != "name"]
    for option in axis_options:
        if option not in options:
            close = difflib.get_close_matches(option, options, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"unknown model option {option!r}; {hint}choose from "
                              f"{', '.join(options)}")
    try:
        cfg = ModelConfig(name=name, **axis_options)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, "model")) from None
    return build_model_from_config(cfg, num_classes)
