"""Stratified carving of a validation split and of a smaller training subset.

Both are seeded by ``cfg.split_seed``, never by the run seed: every arm and every seed of an
ablation is trained and scored on the same images.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def _generator(seed: int, purpose: str) -> torch.Generator:
    digest = hashlib.sha256(f"alexnet-split/{purpose}/{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def class_quotas(counts: Tensor, total: int) -> Tensor:
    """Split ``total`` over classes in proportion to ``counts`` (largest remainder), so each
    class gets the floor or the ceiling of its exact share and the quotas sum to ``total``."""
    exact = counts.double() * total / max(int(counts.sum()), 1)
    quotas = exact.floor().long()
    short = total - int(quotas.sum())
    if short > 0:
        # Stable sort: ties go to the lower class index, so the result is deterministic.
        order = torch.sort(exact - quotas, descending=True, stable=True).indices
        quotas[order[:short]] += 1
    return torch.minimum(quotas, counts)


def stratified_pick(labels: Tensor, total: int, seed: int, purpose: str) -> Tensor:
    """Boolean mask picking ``total`` items of ``labels``, stratified by class, at random."""
    labels = labels.cpu()
    n = labels.numel()
    picked = torch.zeros(n, dtype=torch.bool)
    if total <= 0 or n == 0:
        return picked
    counts = torch.bincount(labels)
    quotas = class_quotas(counts, min(total, n))
    # Random order, then group by class (stable), so the rank inside each class is random.
    shuffled = torch.randperm(n, generator=_generator(seed, purpose))
    grouped = shuffled[torch.sort(labels[shuffled], stable=True).indices]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - starts[labels[grouped]]
    picked[grouped[rank < quotas[labels[grouped]]]] = True
    return picked


def carve_val(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train indices, val indices), val a stratified ``fraction`` of ``labels``."""
    is_val = stratified_pick(labels, round(fraction * labels.numel()), seed, "val")
    return (~is_val).nonzero().flatten(), is_val.nonzero().flatten()


def subset(indices: Tensor, labels: Tensor, max_count: int | None, seed: int) -> Tensor:
    """At most ``max_count`` of ``indices``, stratified by their labels (for CPU-sized runs)."""
    if max_count is None or max_count >= indices.numel():
        return indices
    keep = stratified_pick(labels[indices], max_count, seed, "max_train")
    return indices[keep]
