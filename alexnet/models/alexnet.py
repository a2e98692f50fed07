"""AlexNet as in the paper (Section 3.5, Figure 2), with every design choice an argument.

Layer by layer, at 227x227 (the paper's text says 224; only 227 makes the arithmetic
work), for width 1:

    conv1  96 11x11 stride 4        -> 55x55   act -> LRN -> max-pool -> 27x27
    conv2 256  5x5  pad 2, groups=T -> 27x27   act -> LRN -> max-pool -> 13x13
    conv3 384  3x3  pad 1, groups=1 -> 13x13   act          (full connectivity, Section 3.2)
    conv4 384  3x3  pad 1, groups=T -> 13x13   act
    conv5 256  3x3  pad 1, groups=T -> 13x13   act -> max-pool -> 6x6
    fc6 4096, fc7 4096 (act, dropout), fc8 num_classes

T is ``towers``: 2 is the paper's two-GPU layout (60,965,224 parameters for 1000
classes), 1 a single tower of full width (62,378,344). Both pooling arms give
55->27->13->6 at 227. ``remove_conv`` (conv2, conv3 or conv4) drops one middle layer for
Section 7's depth claim; every pool stays, so the sizes above do not change.

This is not torchvision's ``alexnet``, which is the 2014 "one weird trick" variant
(64-192-384-256-256 kernels, no LRN).

The same class, with a smaller first convolution, is ``alexnet_cifar`` (see cifar.py).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from alexnet.models.layers import (
    conv_block,
    get_activation,
    get_pool,
    output_shape,
    pick,
    scaled,
)
from alexnet.models.weight_init import init_weights

IMAGENET_INPUT_SIZE = 227
# The depth axis (Section 7): which middle conv layer to remove, if any.
REMOVABLE_CONVS = {"none": None, "conv2": 2, "conv3": 3, "conv4": 4}


class AlexNet(nn.Module):
    """Five convolutions and three fully connected layers; ``features`` + ``classifier``.

    The defaults are ModelConfig's: the paper's network in one tower (``towers=2`` is its
    two-GPU layout, Section 3.2). ``stem`` is conv1's (kernel, stride, padding)
    and ``input_size`` the square input it is built for: the flatten size in front of fc6
    is measured with one dummy forward at that size, never hard-coded, because it depends
    on the pooling arm for small inputs.
    """

    # Section 5: "We initialized the neuron biases in the second, fourth, and fifth
    # convolutional layers, as well as in the fully-connected hidden layers, with the
    # constant 1." Every other bias is 0.
    PAPER_BIAS_ONE = ("conv2", "conv4", "conv5", "fc6", "fc7")

    def __init__(
        self,
        num_classes: int = 1000,
        *,
        activation: str = "relu",
        norm: str = "lrn",
        pool: str = "overlap",
        dropout: float = 0.5,
        init: str = "paper",
        towers: int = 1,
        width: float = 1.0,
        remove_conv: str = "none",
        input_size: int = IMAGENET_INPUT_SIZE,
        stem: tuple[int, int, int] = (11, 4, 0),
    ) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = (scaled(c, width, towers) for c in (96, 256, 384, 384, 256))
        hidden = scaled(4096, width)
        kernel, stride, padding = stem
        removed = pick(REMOVABLE_CONVS, "remove_conv", remove_conv)
        # The two towers of Section 3.2 are grouped convolutions: in conv2, conv4 and conv5
        # each kernel sees only the maps of its own tower; conv3 and the fc layers see
        # both. conv1 needs no groups: each tower's conv1 sees the whole image anyway.
        # One small departure: with towers=2 the paper's LRN window never crosses from one
        # GPU's maps to the other's; here it does at the one boundary (maps c/2-1, c/2).
        convs = [  # (index, out channels, kernel, stride, padding, groups, LRN after it)
            (1, c1, kernel, stride, padding, 1, True),
            (2, c2, 5, 1, 2, towers, True),
            (3, c3, 3, 1, 1, 1, False),
            (4, c4, 3, 1, 1, towers, False),
            (5, c5, 3, 1, 1, towers, False),
        ]
        pooled = {1, 2, 5}
        # Section 7: "removing any of the middle layers results in a loss of about 2% for
        # the top-1 performance". ``remove_conv`` drops one of conv2..conv4 with what is
        # its own (BN, activation, and conv2's LRN, which normalizes conv2's responses);
        # the next conv takes the previous one's maps. pool2 stays, so later layers see
        # the same 13x13 maps (7x7 at 32) and fc6 the same input: the arms differ in depth
        # alone, not also in fc6's width. Every conv width is a multiple of ``towers``, so
        # a grouped conv's new input still splits into its groups; without conv3 the two
        # towers meet only in fc6. The others keep their names, so the bias-1 rule above
        # still finds those of conv2, conv4 and conv5 that exist.
        layers: list[tuple[str, nn.Module]] = []
        in_channels = 3
        for i, out, k, s, p, groups, lrn_here in convs:
            if i != removed:
                conv = nn.Conv2d(in_channels, out, k, s, p, groups=groups)
                layers += conv_block(i, conv, out, activation, norm, lrn_here)
                in_channels = out
            if i in pooled:
                layers.append((f"pool{i}", get_pool(pool)))
        self.features = nn.Sequential(OrderedDict(layers))
        flat = output_shape(self.features, 3, input_size)[1:].numel()
        # Dropout sits in front of fc6 and fc7, as torchvision places it. The paper
        # (Section 4.2) drops the *outputs* of fc6 and fc7 instead, i.e. the inputs of fc7
        # and fc8; both put dropout on two of the three fc layers' inputs.
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("drop6", nn.Dropout(dropout)),
                    ("fc6", nn.Linear(flat, hidden)),
                    ("act6", get_activation(activation)),
                    ("drop7", nn.Dropout(dropout)),
                    ("fc7", nn.Linear(hidden, hidden)),
                    ("act7", get_activation(activation)),
                    ("fc8", nn.Linear(hidden, num_classes)),
                ]
            )
        )
        init_weights(self, init, activation, bias_one=self.PAPER_BIAS_ONE, output_layer="fc8")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))
