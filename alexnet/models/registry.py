"""Model names → builders; the one place a run config's ``model`` section becomes a net."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from alexnet.errors import ConfigError
from alexnet.models.alexnet import IMAGENET_INPUT_SIZE, AlexNet
from alexnet.models.cifar import CIFAR_INPUT_SIZE, ConvNet4, alexnet_cifar
from alexnet.models.layers import pick

if TYPE_CHECKING:
    from alexnet.config import ModelConfig


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


# name -> (builder, the square input size it is built for); the keys are the model names
# the run config accepts.
MODELS: dict[str, tuple[Callable[..., nn.Module], int]] = {
    "alexnet": (AlexNet, IMAGENET_INPUT_SIZE),
    "alexnet_cifar": (alexnet_cifar, CIFAR_INPUT_SIZE),
    "convnet4": (_convnet4, CIFAR_INPUT_SIZE),
}


def input_size(name: str) -> int:
    """The square input size the model is built for: 227 for alexnet, 32 for the others."""
    return pick(MODELS, "model", name)[1]


def build_model_from_config(model_cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The network a run config's (already validated) ``model`` section describes."""
    if num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
    options = model_cfg.model_dump(exclude={"name"})
    return MODELS[model_cfg.name][0](num_classes, **options)
