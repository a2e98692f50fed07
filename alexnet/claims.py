"""The paper's claims as data: one place that a report row, a test and the README share.

Deltas are the design choice minus what it is compared with, in percentage points of
error (negative = the design choice lowers the error). ``relu_speed`` is a ratio:
epochs to 25% training error of the baseline (tanh) over the design choice (ReLU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Metric = Literal["val_error", "val_error_top5", "epochs_to_target_ratio", "gap"]


@dataclass(frozen=True)
class Claim:
    id: str
    section: str
    statement: str
    metric: Metric  # what is compared: top-1 error, the epochs ratio, or train-val gap
    axis: str  # the ablation axis that varies
    arm: str  # the design choice the paper recommends
    baseline: str  # what it is compared with
    paper_delta: float | None  # arm - baseline (pp), or the ratio; None where only words
    direction: Literal["lower", "higher"]  # the sign the paper claims for the measured delta
    paper_text: str  # the paper's figure, as written
    paper_delta_top5: float | None = None
    reproduction: str | None = None  # Mishkin et al. 2016, ImageNet at 128 px, where tested
    reproduction_delta: float | None = None  # same sign convention, top-1 error in pp
    ablation: str | None = None  # the shipped ablation that tests it


CLAIMS: dict[str, Claim] = {c.id: c for c in [
    Claim("relu_speed", "3.1, Fig. 1",
          "a four-layer CNN with ReLUs reaches 25% training error on CIFAR-10 six times "
          "faster than with tanh", "epochs_to_target_ratio", "activation", "relu", "tanh",
          6.0, "higher", "6× fewer epochs",
          reproduction="ReLU 47.0% vs tanh 40.1% top-1 accuracy (ReLU −6.9 pp error)",
          reproduction_delta=-6.9, ablation="relu_vs_tanh"),
    Claim("two_towers", "3.2", "two towers vs one tower with half the kernels",
          "val_error", "towers", "two", "one", -1.7, "lower", "−1.7% top-1, −1.2% top-5",
          paper_delta_top5=-1.2, ablation="towers"),
    Claim("lrn", "3.3", "local response normalization lowers the error",
          "val_error", "norm", "lrn", "none", -1.4, "lower",
          "−1.4% top-1, −1.2% top-5 (ImageNet); CIFAR-10 13% → 11%",
          paper_delta_top5=-1.2,
          reproduction="LRN 47.0% vs none 47.1% accuracy (LRN +0.1 pp error: no gain)",
          reproduction_delta=0.1, ablation="normalization"),
    Claim("overlap_pool", "3.4", "overlapping pooling (3/2) beats non-overlapping (2/2)",
          "val_error", "pool", "overlap", "nonoverlap", -0.4, "lower",
          "−0.4% top-1, −0.3% top-5", paper_delta_top5=-0.3,
          reproduction="3/2 47.0% vs 2/2 48.4% accuracy (overlap +1.4 pp error; confounded)",
          reproduction_delta=1.4, ablation="pooling"),
    Claim("augmentation", "4.1", "without random crops and flips the net overfits substantially",
          "gap", "augmentation", "on", "off", None, "lower",
          "without: \"substantial overfitting\"", ablation="augmentation"),
    Claim("pca_lighting", "4.1", "PCA colour augmentation lowers top-1 error by over 1%",
          "val_error", "pca_lighting", "on", "off", -1.0, "lower", "top-1 down \"by over 1%\"",
          ablation="pca_lighting"),
    Claim("dropout", "4.2", "without dropout the net overfits substantially",
          "gap", "dropout", "on", "off", None, "lower",
          "without: \"substantial overfitting\"; ~2× the iterations to converge with it",
          reproduction="dropout 0.5: 47.0% vs 0.3: 49.7% accuracy (0.5 +2.7 pp error)",
          reproduction_delta=2.7, ablation="dropout"),
    # Measured without extra training: the softmax outputs of an arm's seeds averaged on the
    # held-out split, against the same seeds' single errors (an ``ablate.kind=ensemble`` run).
    Claim("ensemble", "6, Table 2", "averaging five CNNs beats one", "val_error", "ensemble",
          "average", "single", -2.6, "lower", "40.7/18.2 → 38.1/16.4 (−2.6 top-1, −1.8 top-5)",
          paper_delta_top5=-1.8, ablation="ensemble"),
    # The full net against the mean of the arms that each lack one middle conv layer.
    Claim("depth", "7", "removing any middle conv layer costs about 2% top-1", "val_error",
          "depth", "full", "shallower", -2.0, "lower", "about +2% top-1 without a middle layer",
          ablation="depth"),
]}
