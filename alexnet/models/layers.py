"""The building blocks, and the factories that turn an ablation arm's name into a layer.

A design choice reaches a model as a name (``get_activation("tanh")``), the way timm's
``create_act`` / ``create_norm`` do it: the models never branch on the axis themselves,
so adding an arm means adding one line to a table here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from alexnet.errors import ConfigError

T = TypeVar("T")
LEAKY_SLOPE = 0.01  # PyTorch's default; the kaiming gain in weight_init uses the same value


class CrossChannelLRN(nn.LocalResponseNorm):
    """``nn.LocalResponseNorm`` (same arguments, same function), with the sum of squares
    over the window of neighbouring channels done as one matmul with a 0/1 band matrix.

    torch's own route (pad + ``avg_pool3d``) runs in fp32 only on the CPU: under bf16
    autocast every LRN casts its whole input up and back, and cost more than the convs.
    The matmul runs in bf16 there; forward + backward of one (128, 96, 32, 32) LRN is
    about 5x faster under CPU bf16 autocast and no slower in fp32 (benchmarks/RESULTS.md).
    The denominator's power d**-beta is taken as exp(-beta * log d) (d >= k > 0): the CPU's
    vectorized exp and log are 2x faster than ``pow`` with a fractional exponent in bf16,
    and up to 10x in fp32 on small maps, forward and backward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return super().forward(x)
        # torch's window for output channel d: channels d - size//2 .. d + (size-1)//2.
        channel = torch.arange(x.shape[1], device=x.device)
        offset = channel[None, :] - channel[:, None]
        band = ((offset >= -(self.size // 2)) & (offset <= (self.size - 1) // 2)).to(x.dtype)
        squares = x * x
        if squares.is_contiguous(memory_format=torch.channels_last):  # channels are rows' last
            window_sum = (squares.permute(0, 2, 3, 1) @ band.T).permute(0, 3, 1, 2)
        else:  # (C, C) @ (N, C, H*W), the band broadcast over the batch
            window_sum = (band @ squares.flatten(2)).view_as(x)
        denominator = window_sum * (self.alpha / self.size) + self.k
        return x * torch.exp(torch.log(denominator) * -self.beta)


def paper_lrn() -> nn.LocalResponseNorm:
    """Section 3.3: k=2, n=5, alpha=1e-4, beta=0.75.

    PyTorch divides alpha by the window size (it averages the squares where the paper sums
    them), so the paper's alpha=1e-4 is written alpha=5e-4 here. Writing 1e-4 is the
    common 5x slip (Caffe's reference model has it too).
    """
    return CrossChannelLRN(size=5, alpha=5 * 1e-4, beta=0.75, k=2.0)


# Each axis is a table of name -> layer factory: the keys are the arms the run config
# accepts (config.py validates against them), the values what each arm builds. Adding an
# arm is adding a line here.

# Section 3.1. In-place where it is safe and common: saves one activation map per layer.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "leaky_relu": lambda: nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
    "elu": nn.ELU,
    "sigmoid": nn.Sigmoid,
}
# ``lrn`` is the paper's cross-map LRN (Section 3.3); ``bn`` is BatchNorm2d (Ioffe & Szegedy
# 2015, a modern substitute the paper could not have used); ``none`` is the identity. Where
# each goes is the model's business (see ``conv_block``).
NORMS: dict[str, Callable[[int], nn.Module]] = {
    "lrn": lambda channels: paper_lrn(),
    "bn": nn.BatchNorm2d,
    "none": lambda channels: nn.Identity(),
}
# Section 3.4: ``overlap`` is max-pool 3x3 stride 2, ``nonoverlap`` is 2x2 stride 2.
POOLS: dict[str, Callable[[], nn.Module]] = {
    "overlap": lambda: nn.MaxPool2d(kernel_size=3, stride=2),
    "nonoverlap": lambda: nn.MaxPool2d(kernel_size=2, stride=2),
}


def pick(table: dict[str, T], axis: str, name: str) -> T:
    """``table[name]``, or a one-line ConfigError listing the allowed names."""
    if name not in table:
        raise ConfigError(f"unknown {axis} {name!r}; choose one of {', '.join(table)}")
    return table[name]


def get_activation(name: str) -> nn.Module:
    """A fresh activation module for an arm of the ``activation`` axis."""
    return pick(ACTIVATIONS, "activation", name)()


def get_norm(name: str, channels: int) -> nn.Module:
    """A normalization layer for an arm of the ``norm`` axis."""
    return pick(NORMS, "norm", name)(channels)


def get_pool(name: str) -> nn.Module:
    """A max-pooling layer for an arm of the ``pool`` axis."""
    return pick(POOLS, "pool", name)()


def conv_block(
    index: int,
    conv: nn.Module,
    channels: int,
    activation: str,
    norm: str,
    lrn_here: bool,
    kind: str = "conv",
) -> list[tuple[str, nn.Module]]:
    """``conv{i}`` (or ``{kind}{i}``) and what follows it, as named layers for a Sequential.

    - ``bn``: BatchNorm after every conv, before its activation, as Ioffe & Szegedy place
      it. A departure from the paper, which has no BN; it is an arm, not the default.
    - ``lrn``: after the activation, and only where the model asks (``lrn_here``): the
      paper normalizes conv1 and conv2 only, after their ReLU (Section 3.3).
    - ``none``: conv and activation alone.
    """
    layers: list[tuple[str, nn.Module]] = [(f"{kind}{index}", conv)]
    if norm == "bn":
        layers.append((f"bn{index}", get_norm("bn", channels)))
    layers.append((f"act{index}", get_activation(activation)))
    if norm == "lrn" and lrn_here:
        layers.append((f"lrn{index}", get_norm("lrn", channels)))
    return layers


def scaled(channels: int, width: float, divisor: int = 1) -> int:
    """``channels * width`` rounded to the nearest multiple of ``divisor`` (at least one).

    With two towers every conv width must split evenly into the two groups, so the
    divisor is the number of towers.
    """
    return max(divisor, round(channels * width / divisor) * divisor)


class LocallyConnected2d(nn.Module):
    """A convolution whose filters are not shared across positions (cuda-convnet "local").

    Every output position (i, j) has its own ``out_channels x in_channels x k x k`` filter
    and its own bias, so the layer needs the input's (square) spatial size up front. The
    input is cut into patches with ``F.unfold`` and each position's patches meet that
    position's filter in one batched matmul (``einsum``), instead of a Python loop over
    positions.

    weight: (positions, out_channels, in_channels * k * k); bias: (out_channels, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        input_size: int,
        stride: int = 1,
        padding: int = 0,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.input_size = input_size
        self.output_size = (input_size + 2 * padding - kernel_size) // stride + 1
        if self.output_size < 1:
            raise ConfigError(
                f"locally connected layer: input {input_size}x{input_size} is smaller than "
                f"its {kernel_size}x{kernel_size} kernel"
            )
        positions = self.output_size**2
        self.weight = nn.Parameter(
            torch.empty(positions, out_channels, in_channels * kernel_size**2)
        )
        self.bias = nn.Parameter(torch.zeros(out_channels, self.output_size, self.output_size))
        # PyTorch-style default init (as nn.Conv2d); the models re-initialize anyway.
        bound = 1 / math.sqrt(self.fan_in)
        nn.init.uniform_(self.weight, -bound, bound)

    @property
    def fan_in(self) -> int:
        # Not weight[0].numel(): the leading dimension is positions, not output channels.
        return self.weight.shape[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            raise ValueError(
                f"LocallyConnected2d was built for {self.input_size}x{self.input_size} "
                f"inputs, got {tuple(x.shape[-2:])}"
            )
        patches = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)
        out = torch.einsum("bkl,lok->bol", patches, self.weight)  # (batch, out, positions)
        # Under autocast the einsum's matmul gives bf16; the bias follows it, as a conv's
        # does, rather than promoting the whole output back to fp32.
        bias = self.bias.to(out.dtype)
        return out.reshape(x.shape[0], self.out_channels, self.output_size, -1) + bias

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"input_size={self.input_size}, stride={self.stride}, padding={self.padding}"
        )


@torch.no_grad()
def output_shape(module: nn.Module, in_channels: int, size: int) -> torch.Size:
    """The shape ``module`` gives a (1, in_channels, size, size) input: one dummy forward.

    This is how flatten sizes are computed rather than hard-coded (they change with the
    pooling arm on 32x32 inputs). Eval mode, so BatchNorm's running statistics are not
    touched by the dummy zeros.
    """
    was_training = module.training
    module.eval()
    try:
        return module(torch.zeros(1, in_channels, size, size)).shape
    finally:
        module.train(was_training)
