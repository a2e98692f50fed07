"""Model names → builders; the one place a run config's ``model`` section becomes a net."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, get_args

from pydantic import ValidationError
from torch import nn

from alexnet.config import ModelConfig, ModelName, describe_validation_error
from alexnet.errors import ConfigError
from alexnet.models.alexnet import IMAGENET_INPUT_SIZE, AlexNet
from alexnet.models.cifar import CIFAR_INPUT_SIZE, ConvNet4, alexnet_cifar
from alexnet.models.layers import check_choice

MODEL_NAMES: tuple[str, ...] = get_args(ModelName)
# The axis options are ModelConfig's fields, so build_model and the run config accept
# exactly the same keys with the same defaults.
AXIS_OPTIONS: tuple[str, ...] = tuple(f for f in ModelConfig.model_fields if f != "name")


def _convnet4(
    num_classes: int, *, towers: int = 1, remove_conv: str = "none", **axis_options: Any
) -> ConvNet4:
    # The two-tower layout is an ImageNet-net idea (Section 3.2); this net has no groups.
    if towers != 1:
        raise ConfigError("towers applies to alexnet and alexnet_cifar")
    # Section 7's depth claim is about the ImageNet net's middle conv layers.
    if remove_conv != "none":
        raise ConfigError("remove_conv applies to alexnet and alexnet_cifar")
    return ConvNet4(num_classes, **axis_options)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "alexnet": AlexNet,
    "alexnet_cifar": alexnet_cifar,
    "convnet4": _convnet4,
}
_INPUT_SIZES = {
    "alexnet": IMAGENET_INPUT_SIZE,
    "alexnet_cifar": CIFAR_INPUT_SIZE,
    "convnet4": CIFAR_INPUT_SIZE,
}
assert set(_BUILDERS) == set(MODEL_NAMES) == set(_INPUT_SIZES)


def input_size(name: str) -> int:
    """The square input size the model is built for: 227 for alexnet, 32 for the others."""
    check_choice("model", name, MODEL_NAMES)
    return _INPUT_SIZES[name]


def build_model_from_config(model_cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The network a run config's (already validated) ``model`` section describes."""
    if num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
    options = model_cfg.model_dump(exclude={"name"})
    return _BUILDERS[model_cfg.name](num_classes, **options)


def build_model(name: str, num_classes: int = 1000, **axis_options: Any) -> nn.Module:
    """Build ``name`` with the given axis options; the rest take ModelConfig's defaults.

    ``build_model("alexnet", towers=2)`` is the paper's network. Unknown names, options or
    values raise a one-line ConfigError that lists what is allowed.
    """
    check_choice("model", name, MODEL_NAMES)
    for option in axis_options:
        check_choice("model option", option, AXIS_OPTIONS)
    try:
        cfg = ModelConfig(name=name, **axis_options)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, "model")) from None
    return build_model_from_config(cfg, num_classes)
