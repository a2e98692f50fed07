"""Embedded synthetic images: no files, generated in well under a second, deterministic.

Each class has a colour (a hue on a wheel around grey, at one of three brightnesses) and a
smooth random texture of its own scale and colour axis. An image is its class texture
shifted by a random circular translation, with random contrast, a random colour cast that
blurs neighbouring hues, a faint texture of another class mixed in, and pixel noise. The
colour is a quick, partial cue (neighbouring hues overlap); telling the rest apart takes
the texture, which the translation keeps from being a pixel lookup. A small CNN gets well
above chance in a few epochs, and not to 100% at once.

The images depend on ``cfg.synthetic`` alone (its own seed, not the run's): every run of
an ablation sees the same data.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from alexnet.config import SyntheticConfig

# Bump when the generator changes what it produces: it is part of the fingerprint.
GENERATOR_VERSION = 1
_CHUNK = 1024  # part of the generator's definition: noise is drawn chunk by chunk


def _generator(seed: int, purpose: str) -> torch.Generator:
    digest = hashlib.sha256(f"alexnet-synthetic/{purpose}/{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def templates(num_classes: int, size: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per class: a colour offset from grey (C,3) and a zero-mean, unit-std smooth periodic
    texture (C,3,S,S) with its own scale (a frequency band) and colour axis."""
    # Colours: hues evenly spaced (in a random order) in the plane orthogonal to grey, at
    # three brightness levels, so no two classes share a colour, but neighbours are close.
    u = torch.tensor([1.0, -1.0, 0.0]) / 2**0.5
    v = torch.tensor([1.0, 1.0, -2.0]) / 6**0.5
    hue = 2 * torch.pi * torch.randperm(num_classes, generator=g) / num_classes
    level = 0.1 * ((torch.arange(num_classes) % 3) - 1).float()
    colour = 0.25 * (hue.cos()[:, None] * u + hue.sin()[:, None] * v) + level[:, None] / 3**0.5

    f = torch.fft.fftfreq(size) * size  # cycles per image
    radius = (f[:, None] ** 2 + f[None, :] ** 2).sqrt()
    centre = 1.0 + 4.0 * torch.rand(num_classes, 1, 1, generator=g)  # cycles per image
    band = torch.exp(-((radius - centre) ** 2) / 2.0)  # (C,S,S)
    band[:, 0, 0] = 0.0  # zero mean: the colour above is the only DC cue
    axis = torch.nn.functional.normalize(torch.randn(num_classes, 3, generator=g), dim=1)
    luma = torch.fft.ifft2(torch.fft.fft2(torch.randn(num_classes, size, size, generator=g))
                           * band).real
    rgb = torch.fft.ifft2(torch.fft.fft2(torch.randn(num_classes, 3, size, size, generator=g))
                          * band[:, None]).real
    luma = luma / luma.flatten(1).std(1).view(-1, 1, 1)
    rgb = rgb / rgb.flatten(1).std(1).view(-1, 1, 1, 1)
    texture = axis[:, :, None, None] * luma[:, None] + 0.5 * rgb
    return colour, texture / texture.flatten(1).std(1).view(-1, 1, 1, 1)


def shifted(t: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """Each image (N,3,S,S) rolled by its own (dy, dx): one gather over flat pixels."""
    n, c, s, _ = t.shape
    j = torch.arange(s)
    rows = (j[None, :] - dy[:, None]) % s
    cols = (j[None, :] - dx[:, None]) % s
    index = (rows[:, :, None] * s + cols[:, None, :]).view(n, 1, s * s).expand(n, c, -1)
    return t.reshape(n, c, s * s).gather(2, index).view(n, c, s, s)


def sample(colour: Tensor, tmpl: Tensor, n: int, noise: float,
           g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` images (uint8 N,3,S,S) and labels, classes balanced and in random order."""
    num_classes, _, s, _ = tmpl.shape
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    other = (labels + torch.randint(1, num_classes, (n,), generator=g)) % num_classes
    max_shift = max(1, s // 4)
    dy, dx, oy, ox = torch.randint(-max_shift, max_shift + 1, (4, n), generator=g)
    contrast = 0.12 + 0.08 * torch.rand(n, 1, 1, 1, generator=g)
    cast = colour[labels].view(n, 3, 1, 1) + 0.06 * torch.randn(n, 3, 1, 1, generator=g)
    images = torch.empty(n, 3, s, s, dtype=torch.uint8)
    for a in range(0, n, _CHUNK):  # bounded float memory for large train_size
        b = min(a + _CHUNK, n)
        x = (0.5 + cast[a:b]
             + contrast[a:b] * shifted(tmpl[labels[a:b]], dy[a:b], dx[a:b])
             + 0.04 * shifted(tmpl[other[a:b]], oy[a:b], ox[a:b])
             + 0.25 * noise * torch.randn(b - a, 3, s, s, generator=g))
        images[a:b] = (x.clamp(0, 1) * 255).round()
    return images, labels


def generate(cfg: SyntheticConfig) -> dict[str, Tensor]:
    """train_images, train_labels, val_images, val_labels; each split from its own stream,
    so changing ``train_size`` leaves the validation images as they were."""
    colour, tmpl = templates(cfg.num_classes, cfg.image_size,
                             _generator(cfg.seed, "templates"))
    train_x, train_y = sample(colour, tmpl, cfg.train_size, cfg.noise,
                              _generator(cfg.seed, "train"))
    val_x, val_y = sample(colour, tmpl, cfg.val_size, cfg.noise, _generator(cfg.seed, "val"))
    return {"train_images": train_x, "train_labels": train_y,
            "val_images": val_x, "val_labels": val_y}


def class_names(num_classes: int) -> list[str]:
    width = len(str(num_classes - 1))
    return [f"class_{i:0{width}d}" for i in range(num_classes)]


def fingerprint(cfg: SyntheticConfig) -> str:
    text = f"synthetic/{GENERATOR_VERSION}/{cfg.model_dump_json()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]
