"""The models at work: each ablated arm against its reference arm on the held-out split.

Every finished cell logs its final model's prediction for every held-out image (and the
images of the first few it got wrong: ``alexnet.serving.record``); this module reads those
artifacts out of MLflow and compares two arms: a confusion matrix each (summed over the
seeds both arms finished), the per-class error delta (paired by seed), and the images on
which they disagree. Reading is here (``load``); the rest is pure, for tests on hand-made
arrays.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import zip_longest

import numpy as np
import pandas as pd

from alexnet import store
from alexnet.serving.artifacts import HELDOUT_ARTIFACT, fetch, read_heldout

GALLERY = 18  # images in a disagreement gallery (three rows of six)
SPLITS = {"test": "test", "val": "validation"}


@dataclass
class HeldOut:
    """One run's final model on the held-out split."""

    split: str
    classes: list[str]
    label: np.ndarray  # (n,) true class per image
    predicted: np.ndarray  # (n,)
    confidence: np.ndarray  # (n,) probability of the predicted class
    pool_size: int  # images 0..pool_size-1: those this run got wrong are in ``pool``
    pool: dict[int, np.ndarray]  # held-out index -> uint8 (h,w,3)

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> HeldOut:
        return cls(str(a["split"]), [str(c) for c in a["classes"]], a["label"],
                   a["predicted"], a["confidence"], int(a["pool_size"]),
                   dict(zip(a["pool_index"].tolist(), a["pool_images"], strict=True)))

    def confusion(self) -> np.ndarray:
        """Counts (true class, predicted class)."""
        k = len(self.classes)
        return np.bincount(self.label * k + self.predicted, minlength=k * k).reshape(k, k)


@dataclass
class Disagreement:
    index: int  # in the held-out split
    image: np.ndarray
    label: str
    reference: tuple[str, float]  # (predicted class, probability)
    arm: tuple[str, float]


@dataclass
class Comparison:
    """An ablated arm against the reference arm of its axis (other axes at reference)."""

    axis: str
    reference: str  # arm labels, as the runs' ``arm`` tags have them
    arm: str
    seeds: list[int]
    split: str
    classes: list[str]
    confusion_reference: np.ndarray  # counts summed over ``seeds``
    confusion_arm: np.ndarray
    class_errors: pd.DataFrame  # class, seed, reference, arm, delta (errors in %)
    disagree: float  # share of held-out images (over all seeds) the arms label differently
    gallery_seed: int
    gallery: list[Disagreement] = field(default_factory=list)
    pool_size: int = 0

    @property
    def images(self) -> int:
        return int(self.confusion_reference.sum() // max(len(self.seeds), 1))

    def error(self, which: str) -> float:
        m = self.confusion_reference if which == "reference" else self.confusion_arm
        return 100.0 * (1 - np.trace(m) / m.sum())

    def per_class(self) -> pd.DataFrame:
        """Mean over seeds per class: reference, arm and delta (arm − reference), in %."""
        return (self.class_errors.groupby("class", sort=False)[["reference", "arm", "delta"]]
                .mean().reset_index())


def load(uri: str, runs: pd.DataFrame) -> dict[str, HeldOut]:
    """run id -> its held-out predictions, for the runs of ``runs`` that logged them (a
    reused run's come from the run it reuses)."""
    c = store.client(uri, create=False)
    sources = dict(zip(runs["run_id"], runs.get("reused_from", runs["run_id"])
                       .fillna(runs["run_id"]), strict=True))

    def one(source: str) -> HeldOut | None:
        with tempfile.TemporaryDirectory(prefix="ablate-report-") as tmp:
            path = fetch(c, source, HELDOUT_ARTIFACT, tmp)  # None: logged before they were
            return HeldOut.from_arrays(read_heldout(path)) if path is not None else None

    with ThreadPoolExecutor(max_workers=8) as pool:
        found = dict(zip(sources, pool.map(one, sources.values()), strict=True))
    return {run: held for run, held in found.items() if held is not None}


def comparisons(used: pd.DataFrame, reference: dict[str, str], held: dict[str, HeldOut],
                order: list[str]) -> tuple[list[Comparison], list[str]]:
    """Each arm of each axis against the axis's reference arm, other axes held at theirs;
    and notes on what could not be compared."""
    out, notes = [], []
    for axis, ref in reference.items():
        column = f"axis.{axis}"
        if column not in used:
            continue
        held_rest = pd.Series(True, index=used.index)
        for other, other_ref in reference.items():
            if other != axis and f"axis.{other}" in used:
                held_rest &= used[f"axis.{other}"] == other_ref
        rows = used[held_rest]
        labels = {arm: rows.loc[rows[column] == arm, "arm"].iloc[0]
                  for arm in rows[column].dropna().unique()}
        if ref not in labels:
            continue
        for arm in sorted((a for a in labels if a != ref),
                          key=lambda a: order.index(labels[a]) if labels[a] in order else 0):
            ref_runs = _by_seed(rows[rows[column] == ref], held)
            arm_runs = _by_seed(rows[rows[column] == arm], held)
            seeds = sorted(set(ref_runs) & set(arm_runs))
            if not seeds:
                notes.append(f"{labels[arm]} against {labels[ref]}: no seed has held-out "
                             "predictions for both (runs logged before they were)")
                continue
            if not all(_same_images(ref_runs[s], arm_runs[s]) for s in seeds):
                notes.append(f"{labels[arm]} against {labels[ref]}: the arms were scored on "
                             "different held-out images; not compared")
                continue
            out.append(compare(axis, labels[ref], labels[arm],
                               [ref_runs[s] for s in seeds], [arm_runs[s] for s in seeds],
                               seeds))
    return out, notes


def _by_seed(runs: pd.DataFrame, held: dict[str, HeldOut]) -> dict[int, HeldOut]:
    return {int(r.seed): held[r.run_id] for r in runs.itertuples() if r.run_id in held}


def _same_images(a: HeldOut, b: HeldOut) -> bool:
    return a.split == b.split and a.classes == b.classes and np.array_equal(a.label, b.label)


def compare(axis: str, reference: str, arm: str, ref: list[HeldOut], other: list[HeldOut],
            seeds: list[int]) -> Comparison:
    """Two arms' held-out predictions, seed by seed (``ref[i]`` and ``other[i]`` share
    ``seeds[i]``)."""
    classes = ref[0].classes
    rows = []
    for seed, a, b in zip(seeds, ref, other, strict=True):
        ea, eb = class_errors(a), class_errors(b)
        rows += [{"class": name, "seed": seed, "reference": x, "arm": y, "delta": y - x}
                 for name, x, y in zip(classes, ea, eb, strict=True)]
    differ = sum(int((a.predicted != b.predicted).sum()) for a, b in zip(ref, other,
                                                                          strict=True))
    total = sum(len(a.label) for a in ref)
    return Comparison(axis, reference, arm, seeds, ref[0].split, classes,
                      sum(a.confusion() for a in ref), sum(b.confusion() for b in other),
                      pd.DataFrame(rows), differ / total, seeds[0],
                      disagreements(ref[0], other[0]), min(ref[0].pool_size, other[0].pool_size))


def class_errors(h: HeldOut) -> np.ndarray:
    """Top-1 error per true class, in % (nan for a class with no held-out image)."""
    m = h.confusion()
    count = m.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, 100.0 * (1 - np.diag(m) / count), np.nan)


def disagreements(ref: HeldOut, other: HeldOut, limit: int = GALLERY) -> list[Disagreement]:
    """Images among the first ``pool_size`` where the arms' predictions differ, with the
    image from whichever run kept it (the one that got it wrong). Ordered to show both
    directions: the reference right and the arm wrong, then the other way round,
    alternately, each most confident mistake first; then both wrong."""
    pool = min(ref.pool_size, other.pool_size)
    idx = np.flatnonzero(ref.predicted[:pool] != other.predicted[:pool])
    right_a = ref.predicted[idx] == ref.label[idx]
    right_b = other.predicted[idx] == other.label[idx]
    only_ref = sorted(idx[right_a & ~right_b], key=lambda i: -other.confidence[i])
    only_arm = sorted(idx[right_b & ~right_a], key=lambda i: -ref.confidence[i])
    neither = sorted(idx[~right_a & ~right_b],
                     key=lambda i: -max(ref.confidence[i], other.confidence[i]))
    alternate = [i for pair in zip_longest(only_ref, only_arm) for i in pair if i is not None]
    out = []
    for i in [*alternate, *neither]:
        image = ref.pool.get(int(i), other.pool.get(int(i)))
        if image is None:
            continue
        names = ref.classes
        out.append(Disagreement(int(i), image, names[ref.label[i]],
                                (names[ref.predicted[i]], float(ref.confidence[i])),
                                (names[other.predicted[i]], float(other.confidence[i]))))
        if len(out) == limit:
            break
    return out

