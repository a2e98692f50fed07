"""The ``init`` axis: the paper's initialization (Section 5) or Kaiming's.

The paper's N(0, 0.01) for every layer is known to stall deep nets without
normalization (the loss sits at ln(N) for a long time), which is why a modern init is an
ablation arm of its own rather than a silent fix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection

from torch import nn

from alexnet.models.layers import LEAKY_SLOPE, LocallyConnected2d, pick

PAPER_STD = 0.01

# Kaiming's gain for each activation. torch knows relu, leaky_relu, tanh and sigmoid; for
# gelu and elu, which are ReLU-like for positive inputs, the ReLU gain is the usual choice.
_GAIN = {
    "relu": nn.init.calculate_gain("relu"),
    "leaky_relu": nn.init.calculate_gain("leaky_relu", LEAKY_SLOPE),
    "tanh": nn.init.calculate_gain("tanh"),
    "sigmoid": nn.init.calculate_gain("sigmoid"),
    "gelu": nn.init.calculate_gain("relu"),
    "elu": nn.init.calculate_gain("relu"),
    "linear": 1.0,
}

_WEIGHTED = (nn.Conv2d, nn.Linear, LocallyConnected2d)


def fan_in(module: nn.Module) -> int:
    """Inputs feeding one output unit: in_channels/groups * k * k for a conv."""
    if isinstance(module, LocallyConnected2d):
        return module.fan_in
    return module.weight[0].numel()


def kaiming_std(module: nn.Module, activation: str) -> float:
    return _GAIN[activation] / math.sqrt(fan_in(module))


# The ``init`` axis: name -> the weights' standard deviation for a layer and activation.
INITS: dict[str, Callable[[nn.Module, str], float]] = {
    "paper": lambda module, activation: PAPER_STD,
    "kaiming": kaiming_std,
}


def init_weights(
    model: nn.Module,
    scheme: str,
    activation: str,
    bias_one: Collection[str] = (),
    output_layer: str = "",
) -> None:
    """Initialize every conv, locally connected and linear layer of ``model`` in place.

    - ``paper`` (Section 5): weights N(0, 0.01); biases 1 in the layers named in
      ``bias_one`` (the paper's conv2, conv4, conv5, fc6, fc7: positive inputs to the ReLUs
      "accelerate the early stages of learning"), 0 elsewhere.
    - ``kaiming``: N(0, gain/sqrt(fan_in)) (He et al. 2015, fan_in mode) with the gain of
      the model's activation; all biases 0. ``output_layer`` (the logits) gets gain 1:
      no activation follows it, and max-pooling already inflates the activations' scale,
      so the activation's gain there only makes the first steps less stable.

    BatchNorm starts as the identity (weight 1, bias 0) in both.
    Layers are matched by their own name (``features.conv2`` → ``conv2``).
    """
    std_of = pick(INITS, "init", scheme)
    for name, module in model.named_modules():
        if isinstance(module, _WEIGHTED):
            short = name.rsplit(".", 1)[-1]
            std = std_of(module, "linear" if short == output_layer else activation)
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                one = scheme == "paper" and short in bias_one
                nn.init.constant_(module.bias, 1.0 if one else 0.0)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
