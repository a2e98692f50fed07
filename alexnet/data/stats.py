"""Per-channel mean/std and the PCA of RGB pixel values over a training set (Section 4.1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Stats:
    """Per-channel mean/std and the RGB covariance's eigen-decomposition, in [0,1] units.

    ``eigvals`` are sorted largest first; ``eigvecs[:, i]`` belongs to ``eigvals[i]``
    (columns, as in the paper's ImageNet constants).
    """

    mean: Tensor  # (3,)
    std: Tensor  # (3,)
    eigvals: Tensor  # (3,)
    eigvecs: Tensor  # (3, 3)

    def to(self, device: torch.device) -> Stats:
        return Stats(*(t.to(device=device, dtype=torch.float32) for t in self.as_tuple()))

    def as_tuple(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.mean, self.std, self.eigvals, self.eigvecs

    def to_dict(self) -> dict[str, Tensor]:
        return {"mean": self.mean, "std": self.std, "eigvals": self.eigvals,
                "eigvecs": self.eigvecs}

    @classmethod
    def from_dict(cls, d: dict[str, Tensor]) -> Stats:
        return cls(d["mean"], d["std"], d["eigvals"], d["eigvecs"])


class PixelMoments:
    """First and second moments of RGB pixels in [0,1] units, accumulated chunk by chunk.

    float64 sums: a float32 pass over 50M pixels loses digits in the covariance, and
    converting a whole dataset at once would need gigabytes.
    """

    def __init__(self) -> None:
        self.total = torch.zeros(3, dtype=torch.float64)
        self.outer = torch.zeros(3, 3, dtype=torch.float64)
        self.count = 0

    def add(self, images: Tensor) -> None:
        """uint8 images (N,3,H,W)."""
        x = images.movedim(1, 0).reshape(3, -1).double() / 255.0
        self.total += x.sum(1).cpu()
        self.outer += (x @ x.T).cpu()
        self.count += x.shape[1]

    def stats(self) -> Stats:
        if self.count == 0:
            raise ValueError("cannot compute pixel statistics of an empty training set")
        mean = self.total / self.count
        cov = self.outer / self.count - torch.outer(mean, mean)
        eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
        # Largest first, as the paper lists them; clamp: a flat channel can give -1e-17.
        eigvals, eigvecs = eigvals.flip(0).clamp_min(0.0), eigvecs.flip(1)
        # Floor at one grey level, so a flat channel is not blown up by the normalisation.
        std = cov.diagonal().clamp_min(0.0).sqrt().clamp_min(1.0 / 255.0)
        return Stats(*(t.float().contiguous() for t in (mean, std, eigvals, eigvecs)))


def compute_stats(images: Tensor, chunk: int = 1024) -> Stats:
    """Stats of uint8 images (N,3,H,W), on whichever device they are."""
    moments = PixelMoments()
    for start in range(0, images.shape[0], chunk):
        moments.add(images[start:start + chunk])
    return moments.stats()
