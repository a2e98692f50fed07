"""Section 6 / Table 2: average the softmax outputs of several trained nets, score them.

The paper's "five similar CNNs" are five independently trained nets whose predictions
are averaged: 40.7% top-1 for one, 38.1% for five. Here the members are the final models
of one ablation arm's seeds, so the claim costs no extra training: one pass over the
held-out images runs every member on each batch, and both each member alone and their
average are scored with the training loop's own evaluation (``train.softmax_probs``,
``train.score_batch``), so a member's numbers are exactly what ``train.evaluate`` reports
for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from statistics import fmean

import torch
from torch import Tensor, nn

from alexnet.errors import DataError
from alexnet.train import score_batch, softmax_probs


@dataclass(frozen=True)
class Scores:
    """Mean loss (negative log of the scored probabilities), top-1 and top-5 error."""

    loss: float
    error: float
    error_top5: float


@dataclass(frozen=True)
class EnsembleResult:
    members: tuple[Scores, ...]  # each model alone, in the order given
    ensemble: Scores  # their softmax outputs averaged
    images: int

    @property
    def single(self) -> Scores:
        """The members' mean: what one model scores on average (Table 2's "1 CNN")."""
        return Scores(*(fmean(getattr(m, f) for m in self.members)
                        for f in ("loss", "error", "error_top5")))

    @property
    def delta(self) -> float:
        """Ensemble minus single top-1 error; negative when averaging helps (paper: -2.6 pp)."""
        return self.ensemble.error - self.single.error

    @property
    def delta_top5(self) -> float:
        return self.ensemble.error_top5 - self.single.error_top5


def member_probs(models: Sequence[nn.Module], images: Tensor,
                 channels_last: bool = False) -> Tensor:
    """Every model's softmax outputs for one batch, (models, B, classes); ten crops
    (B, 10, C, H, W) are averaged per model first, as in evaluation. Their mean over the
    first dimension is the ensemble's prediction."""
    return torch.stack([softmax_probs(m, images, channels_last) for m in models])


@torch.no_grad()
def evaluate_ensemble(
    models: Sequence[nn.Module],
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    *,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    channels_last: bool = False,
) -> EnsembleResult:
    """Score each of ``models`` (already on ``device``) and the average of their softmax
    outputs on ``batches`` (images, labels), in one pass.

    ``autocast`` makes the context each forward runs in; pass the one the runs were
    evaluated under so the members' numbers match their logged validation error. The
    models are put in eval mode and handed back in the mode they came in.
    """
    if not models:
        raise ValueError("evaluate_ensemble needs at least one model")
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    totals: Tensor | None = None  # (models + 1, 3): each member, then the ensemble
    n = 0
    try:
        for images, labels in batches:
            images, labels = images.to(device), labels.to(device)
            with autocast():
                probs = member_probs(models, images, channels_last)
            probs = torch.cat([probs, probs.mean(0, keepdim=True)])
            k = min(5, probs.shape[-1])
            batch = torch.stack([score_batch(p, labels, k) for p in probs])
            totals = batch if totals is None else totals + batch
            n += labels.shape[0]
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
    if totals is None or n == 0:
        raise DataError("the held-out split has no images to evaluate the ensemble on")
    scores = [Scores(*(v / n for v in row)) for row in totals.tolist()]  # one sync
    return EnsembleResult(members=tuple(scores[:-1]), ensemble=scores[-1], images=n)
