"""The 32x32 nets: AlexNet's shape at CIFAR size, and the paper's four-layer CIFAR-10 net.

Both run at CIFAR's own 32x32. Upsampling CIFAR to 227 to feed the ImageNet net, as
some re-implementations do, costs about 50x the compute and tests nothing the paper did.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from alexnet.models.alexnet import AlexNet
from alexnet.models.layers import (
    LocallyConnected2d,
    conv_block,
    get_pool,
    output_shape,
    paper_lrn,
    scaled,
)
from alexnet.models.weight_init import init_weights

CIFAR_INPUT_SIZE = 32

# alexnet_cifar: the five-conv / three-fc structure of Section 3.5, with LRN, pooling,
# groups and the bias-1 init in the same places; only conv1 changes, because an 11x11
# stride-4 kernel would leave 6x6 maps after the first layer of a 32x32 image.
#
#   layer   kernels (x width)  kernel/stride/pad  out, overlap 3/2  out, nonoverlap 2/2
#   input                                         32                32
#   conv1    96                5x5 / 1 / 2        32 -> pool 15     32 -> pool 16
#   conv2   256, groups=T      5x5 / 1 / 2        15 -> pool  7     16 -> pool  8
#   conv3   384                3x3 / 1 / 1         7                 8
#   conv4   384, groups=T      3x3 / 1 / 1         7                 8
#   conv5   256, groups=T      3x3 / 1 / 1         7 -> pool  3      8 -> pool  4
#   fc6    4096 (in 256*3*3 = 2,304 | 256*4*4 = 4,096 at width 1)
#   fc7    4096
#   fc8    num_classes
#
# ``remove_conv`` leaves out conv2, conv3 or conv4 as in alexnet.py; the sizes stay.
#
# At width 1 that is about 0.3 G multiply-accumulates per image (the ImageNet net: 0.7 G);
# at width 0.125 about 6 M, a few seconds per epoch of a small dataset on a CPU.
ALEXNET_CIFAR_STEM = (5, 1, 2)


def alexnet_cifar(num_classes: int = 10, **axis_options: object) -> AlexNet:
    """AlexNet for 32x32 inputs (see the table above); ``axis_options`` as ``AlexNet``."""
    return AlexNet(
        num_classes, input_size=CIFAR_INPUT_SIZE, stem=ALEXNET_CIFAR_STEM, **axis_options
    )


class ConvNet4(nn.Module):
    """The four-layer CIFAR-10 net of the LRN (Section 3.3) and ReLU (Figure 1) claims.

    cuda-convnet's layers-conv-local-11pct (with LRN) / -13pct (without), whose 11% vs 13%
    test error is the paper's CIFAR-10 LRN result:

        layer    maps (x width)  kernel        out, overlap 3/2   out, nonoverlap 2/2
        conv1    64              5x5 pad 2     32 -> pool 15      32 -> pool 16   -> LRN
        conv2    64              5x5 pad 2     15 -> LRN -> pool 7  16 -> pool 8
        local3   32              3x3 pad 1      7                  8   unshared weights
        local4   32              3x3 pad 1      7                  8   unshared weights
        fc       num_classes                   in 32*7*7 = 1,568 | 32*8*8 = 2,048

    LRN is the paper's (cross-map, n=5, k=2, alpha=1e-4, beta=0.75), after pool1 and
    before pool2 as cuda-convnet orders them. With ``norm="bn"`` BatchNorm follows every
    conv and local layer, before its activation. cuda-convnet's 3/2 pooling rounds its
    output up (32 -> 16); PyTorch's rounds down (32 -> 15), kept here so both nets share
    one pooling factory.
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        activation: str = "relu",
        norm: str = "lrn",
        pool: str = "overlap",
        dropout: float = 0.0,
        init: str = "paper",
        width: float = 1.0,
        input_size: int = CIFAR_INPUT_SIZE,
    ) -> None:
        super().__init__()
        c12, c34 = scaled(64, width), scaled(32, width)

        def lrn(i: int) -> list:
            return [(f"lrn{i}", paper_lrn())] if norm == "lrn" else []

        def block(i: int, layer: nn.Module, channels: int, kind: str = "conv") -> list:
            return conv_block(i, layer, channels, activation, norm, lrn_here=False, kind=kind)

        convs = [
            *block(1, nn.Conv2d(3, c12, 5, padding=2), c12),
            ("pool1", get_pool(pool)),
            *lrn(1),
            *block(2, nn.Conv2d(c12, c12, 5, padding=2), c12),
            *lrn(2),
            ("pool2", get_pool(pool)),
        ]
        # A locally connected layer has one filter per position, so it must know its input
        # size; that depends on the pooling arm, so it is measured, not assumed.
        size = output_shape(nn.Sequential(OrderedDict(convs)), 3, input_size)[-1]
        local3 = LocallyConnected2d(c12, c34, 3, size, padding=1)
        local4 = LocallyConnected2d(c34, c34, 3, local3.output_size, padding=1)
        self.features = nn.Sequential(
            OrderedDict([*convs, *block(3, local3, c34, "local"), *block(4, local4, c34, "local")])
        )
        flat = c34 * local4.output_size**2
        self.classifier = nn.Sequential(
            OrderedDict([("drop", nn.Dropout(dropout)), ("fc", nn.Linear(flat, num_classes))])
        )
        # "paper": N(0, 0.01) weights and every bias 0. The paper's bias-1 rule names
        # ImageNet layers (conv2, conv4, conv5, the hidden fc layers) this net does not
        # have, and cuda-convnet's own configs start these biases at 0.
        init_weights(self, init, activation, bias_one=(), output_layer="fc")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))
