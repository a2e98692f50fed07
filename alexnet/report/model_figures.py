"""Figures of the models at work: two arms' confusion matrices, their per-class error delta,
a gallery of held-out images they disagree on, and train-against-validation curves (the
over-fitting of Sections 4.1 and 4.2). Same conventions as ``figures``: Agg canvas, one
Figure returned per call, labelled axes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from alexnet.report.figures import DPI, RC, WIDTH, _figure, _style
from alexnet.report.heldout import SPLITS, Comparison
from alexnet.report.stats import PCT

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MOST_CLASSES = 20  # beyond this, a matrix or a bar chart shows the classes that moved most
RIGHT, WRONG = "#2ca02c", "#d62728"


def _canvas(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def shown_classes(c: Comparison) -> list[int]:
    """Every class, or the MOST_CLASSES whose error changed most (by |delta|)."""
    if len(c.classes) <= MOST_CLASSES:
        return list(range(len(c.classes)))
    delta = c.per_class()["delta"].abs().to_numpy()
    return sorted(np.argsort(-np.nan_to_num(delta))[:MOST_CLASSES].tolist())


def confusion_pair(c: Comparison) -> Figure:
    """The reference arm's and the ablated arm's confusion matrices side by side: each row
    is a true class, in % of its images, summed over the compared seeds."""
    import matplotlib as mpl
    import seaborn as sns

    keep = shown_classes(c)
    names = [c.classes[i] for i in keep]
    annotate = len(keep) <= 12
    side = min(WIDTH / 2, 1.2 + 0.36 * len(keep))
    with _style(), mpl.rc_context(RC):
        fig = _canvas(WIDTH, side + 1.2)
        axes = fig.subplots(1, 2, sharey=True)
        for ax, (role, label, m) in zip(axes, (
                ("reference", c.reference, c.confusion_reference),
                ("arm", c.arm, c.confusion_arm)), strict=True):
            rows = m.sum(1, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                pct = np.where(rows > 0, PCT * m / rows, np.nan)[np.ix_(keep, keep)]
            sns.heatmap(pct, ax=ax, vmin=0, vmax=PCT, cmap="Blues", square=True,
                        annot=annotate, fmt=".0f", annot_kws={"size": 7}, cbar=ax is axes[1],
                        cbar_kws={"label": "% of the true class"},
                        xticklabels=names, yticklabels=names)
            kind = " (reference)" if role == "reference" else ""
            ax.set_title(f"{label}{kind}\n{c.error(role):.1f}% error")
            ax.set_xlabel("predicted class")
            ax.tick_params(axis="x", labelrotation=90)
        axes[0].set_ylabel("true class")
        axes[1].set_ylabel("")
        subset = "" if len(keep) == len(c.classes) else \
            f"; the {len(keep)} of {len(c.classes)} classes whose error changed most"
        fig.suptitle(f"Confusion on the held-out {SPLITS.get(c.split, c.split)} split, "
                     f"{c.images:,} images × {len(c.seeds)} seed(s){subset}")
        return fig


def class_delta(c: Comparison) -> Figure:
    """Per true class: the arm's error − the reference's, in percentage points; bar = mean
    over seeds, dots = each seed. Sorted, largest increase on top."""
    import matplotlib as mpl

    per = c.per_class()
    keep = {c.classes[i] for i in shown_classes(c)}
    per = per[per["class"].isin(keep)].sort_values("delta", ascending=False)
    seeds = c.class_errors[c.class_errors["class"].isin(keep)]
    with _style(), mpl.rc_context(RC):
        fig, ax = _figure(max(3.0, min(9.0, 1.4 + 0.32 * len(per))))
        ys = np.arange(len(per))
        colours = [WRONG if d > 0 else RIGHT for d in per["delta"]]
        ax.barh(ys, per["delta"], color=colours, alpha=0.75,
                label="mean over seeds (red: the arm errs more)")
        pos = dict(zip(per["class"], ys, strict=True))
        ax.plot(seeds["delta"], seeds["class"].map(pos), "o", color="black", ms=4,
                label="one seed")
        ax.axvline(0, color="0.3", lw=1)
        ax.set_yticks(ys, per["class"])
        ax.set_ylim(len(per) - 0.5, -0.5)
        ax.set(xlabel=f"per-class top-1 error, {c.arm} − {c.reference} (percentage points)",
               ylabel="true class",
               title=f"Which classes {c.arm} gets wrong more (or less) often than "
                     f"{c.reference}")
        ax.legend(loc="best")
        return fig


def gallery(c: Comparison, columns: int = 6) -> Figure:
    """Held-out images the two arms label differently: the true class, then each arm's
    prediction and its probability (green: right, red: wrong)."""
    import matplotlib as mpl

    items = c.gallery
    rows = max(1, -(-len(items) // columns))
    with mpl.rc_context({**RC, "font.size": 8}):
        fig = _canvas(WIDTH, 0.5 + 1.9 * rows)
        fig.get_layout_engine().set(h_pad=0.02, hspace=0.0)
        axes = fig.subplots(rows, columns, squeeze=False).ravel()
        for ax in axes:
            ax.set_axis_off()
        for ax, d in zip(axes, items, strict=False):
            ax.imshow(d.image, interpolation="nearest")
            ax.set_title(f"#{d.index} true: {d.label}", fontsize=8, pad=2)
            for line, (who, (label, p)) in enumerate(((_short(c.reference), d.reference),
                                                       (_short(c.arm), d.arm))):
                ax.text(0.5, -0.04 - 0.12 * line, f"{who}: {label} {100 * p:.0f}%",
                        transform=ax.transAxes, ha="center", va="top", fontsize=8,
                        color=RIGHT if label == d.label else WRONG)
        if not items:
            axes[0].text(0, 0.5, f"The two arms label the first {c.pool_size} held-out images "
                                 "alike: nothing to show.", transform=axes[0].transAxes)
        fig.suptitle(f"Held-out images on which {c.reference} and {c.arm} disagree (seed "
                     f"{c.gallery_seed}; {len(items)} shown, of the first {c.pool_size})")
        return fig


def _short(label: str) -> str:
    """``activation=relu`` -> ``relu``: the values alone, to fit under a thumbnail."""
    return ",".join(part.split("=", 1)[-1] for part in label.split(","))


def overfitting(history: pd.DataFrame, used: pd.DataFrame, *, axis: str,
                arms: list[str]) -> Figure:
    """Training and validation error against epoch, one panel per arm of ``axis`` (same
    y axis): the gap between the lines is the over-fitting Sections 4.1 and 4.2 describe.
    Lines: mean over seeds; bands: lowest to highest seed."""
    import matplotlib as mpl
    from matplotlib.ticker import MaxNLocator

    df = history.merge(used[["run_id", "seed", f"axis.{axis}"]], on="run_id")
    df = df.assign(error=df["value"] * PCT)
    with _style(), mpl.rc_context(RC):
        fig = _canvas(WIDTH, 3.8)
        axes = fig.subplots(1, len(arms), sharey=True, squeeze=False)[0]
        for ax, arm in zip(axes, arms, strict=True):
            mine = df[df[f"axis.{axis}"] == arm]
            lines = {}
            for key, label, colour in (("train_error", "training", "#1f77b4"),
                                       ("val_error", "validation", "#ff7f0e")):
                s = mine[mine["key"] == key].groupby("epoch")["error"].agg(["mean", "min", "max"])
                ax.plot(s.index, s["mean"], "o-", ms=3, color=colour, label=f"{label} error")
                ax.fill_between(s.index, s["min"], s["max"], color=colour, alpha=0.15)
                lines[key] = s["mean"]
            both = pd.concat(lines, axis=1).dropna()
            if not both.empty:
                ax.fill_between(both.index, both["train_error"], both["val_error"],
                                color="0.5", alpha=0.12, label="gap")
                gap = both["val_error"].iloc[-1] - both["train_error"].iloc[-1]
                ax.set_title(f"{axis}={arm}: final gap {gap:.1f} pp")
            else:
                ax.set_title(f"{axis}={arm}: no per-epoch metrics")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
        axes[0].set_ylabel("top-1 error (%)")
        axes[0].legend(loc="best")
        fig.suptitle("Training against validation error per arm (mean over seeds; band: "
                     "lowest to highest seed)")
        return fig
