"""Section 4.1's augmentation as batch ops on the data's device.

Training: a random ``crop``-pixel crop of the canvas (padded by ``pad`` first, the CIFAR
habit; ``pad=0`` with a 256 canvas and 227 crops is the paper's own scheme), a horizontal
flip, and PCA lighting, then normalisation by the training set's mean/std. Crop and flip are
one gather; lighting is one (B,3)x(3,3) matmul; lighting and normalisation fuse into one
multiply-add. Nothing here reads a tensor value on the host, so no batch forces a sync.

Evaluation: the centre crop, or the paper's ten crops (four corners, centre, and their
mirror images) of the same canvas that training crops come from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from alexnet.config import DataConfig
from alexnet.data.stats import Stats


@dataclass(frozen=True)
class Augment:
    canvas: int  # stored image side (cfg.image_size)
    crop: int  # model input side (cfg.crop_size)
    pad: int  # zero padding before random crops (cfg.crop_padding)
    random_crop: bool
    flip: bool
    pca_lighting: bool
    pca_std: float

    @classmethod
    def from_config(cls, cfg: DataConfig) -> Augment:
        return cls(cfg.image_size, cfg.crop_size, cfg.crop_padding, cfg.random_crop,
                   cfg.flip, cfg.pca_lighting, cfg.pca_std)

    @property
    def eval_pad(self) -> int:
        # Ten crops come from the canvas training crops come from: padded only when
        # training crops are random (with fixed centre crops the padding is never seen).
        return self.pad if self.random_crop else 0


class Draws(NamedTuple):
    """One epoch's random choices, one row per position in the epoch's order."""

    offsets: Tensor  # (n, 2) int64: top, left of the crop in the padded canvas
    flips: Tensor  # (n,) bool
    alpha: Tensor  # (n, 3) float32, ~ N(0, pca_std): Section 4.1's alpha_i

    def window(self, start: int, stop: int) -> Draws:
        return Draws(self.offsets[start:stop], self.flips[start:stop], self.alpha[start:stop])


def draw_epoch(n: int, aug: Augment, generator: torch.Generator) -> Draws:
    """All of an epoch's draws at once, from ``generator`` on its own device.

    All three are drawn, in a fixed order, whatever is switched on: arms that differ in one
    switch then see the same crops and flips for the same (seed, epoch), a paired comparison.
    """
    device = generator.device
    span = aug.canvas + 2 * aug.pad - aug.crop + 1
    offsets = torch.randint(0, span, (n, 2), generator=generator, device=device)
    flips = torch.rand(n, generator=generator, device=device) < 0.5
    alpha = torch.randn(n, 3, generator=generator, device=device) * aug.pca_std
    return Draws(offsets, flips, alpha)


def crop_flip(x: Tensor, top: Tensor, left: Tensor, crop: int, flip: Tensor | None) -> Tensor:
    """Per-image ``crop`` x ``crop`` windows at (top, left), mirrored where ``flip``.

    One gather over flattened pixels: ~10x faster on a CPU than 4-D advanced indexing,
    and the mirror costs nothing, it only reverses the column indices.
    """
    b, c, h, w = x.shape
    j = torch.arange(crop, device=x.device)
    rows = top[:, None] + j
    cols = left[:, None] + j
    if flip is not None:
        cols = torch.where(flip[:, None], left[:, None] + (crop - 1) - j, cols)
    index = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, crop * crop)
    return x.reshape(b, c, h * w).gather(2, index.expand(b, c, -1)).view(b, c, crop, crop)


def lighting_offsets(alpha: Tensor, stats: Stats) -> Tensor:
    """Section 4.1: add sum_i p_i * alpha_i * lambda_i to every pixel; (B,3), [0,1] units."""
    return (alpha * stats.eigvals) @ stats.eigvecs.T


def normalize(x: Tensor, stats: Stats, offset: Tensor | None = None) -> Tensor:
    """uint8 (B,3,H,W) -> float32 ((x/255 + offset) - mean) / std as one multiply-add.

    No clamp to [0,1] after lighting: the paper does not clip, and clipping would undo
    part of the colour shift on bright images.
    """
    scale = (1.0 / (255.0 * stats.std)).view(3, 1, 1)
    shift = -stats.mean if offset is None else offset - stats.mean
    bias = (shift / stats.std)[..., None, None]
    return torch.addcmul(bias, x.float(), scale)


def train_batch(x: Tensor, draws: Draws, aug: Augment, stats: Stats) -> Tensor:
    """Augment and normalise a uint8 batch (B,3,canvas,canvas) -> float32 (B,3,crop,crop)."""
    b = x.shape[0]
    if aug.random_crop:
        if aug.pad:
            x = F.pad(x, (aug.pad,) * 4)
        top, left = draws.offsets[:, 0], draws.offsets[:, 1]
    else:
        centre = (aug.canvas - aug.crop) // 2
        top = left = torch.full((b,), centre, dtype=torch.long, device=x.device)
    flip = draws.flips if aug.flip else None
    if aug.random_crop or flip is not None or aug.crop != aug.canvas:
        x = crop_flip(x, top, left, aug.crop, flip)
    offset = lighting_offsets(draws.alpha, stats) if aug.pca_lighting else None
    return normalize(x, stats, offset)


def centre_crop(x: Tensor, crop: int) -> Tensor:
    top = (x.shape[-2] - crop) // 2
    left = (x.shape[-1] - crop) // 2
    return x[..., top:top + crop, left:left + crop]


def ten_crop(x: Tensor, crop: int, pad: int = 0) -> Tensor:
    """(B,3,H,W) -> (B,10,3,crop,crop): corners TL, TR, BL, BR, centre, then the mirror
    image of each of those five in the same order (Section 4.1)."""
    if pad:
        x = F.pad(x, (pad,) * 4)
    h, w = x.shape[-2:]
    corners = [(0, 0), (0, w - crop), (h - crop, 0), (h - crop, w - crop)]
    crops = [x[..., top:top + crop, left:left + crop] for top, left in corners]
    crops.append(centre_crop(x, crop))
    five = torch.stack(crops, 1)
    return torch.cat([five, five.flip(-1)], 1)


def eval_batch(x: Tensor, aug: Augment, stats: Stats, ten: bool) -> Tensor:
    """Normalised centre crops (B,3,c,c), or ten crops (B,10,3,c,c)."""
    if ten:
        return normalize(ten_crop(x, aug.crop, aug.eval_pad), stats)
    return normalize(centre_crop(x, aug.crop), stats)


class Lighting(torch.nn.Module):
    """PCA lighting for one float image (3,H,W) in [0,1], as a per-sample transform.

    For the streaming path and the benchmark baseline; draws from torch's global RNG like
    every torchvision transform.
    """

    def __init__(self, stats: Stats, std: float) -> None:
        super().__init__()
        self.eigvals, self.eigvecs, self.std = stats.eigvals, stats.eigvecs, std

    def forward(self, img: Tensor) -> Tensor:
        alpha = torch.randn(3) * self.std
        return img + (self.eigvecs @ (alpha * self.eigvals)).view(3, 1, 1)
