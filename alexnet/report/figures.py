"""The report's figures: seaborn on matplotlib's Agg canvas, PNG at GitHub's page width.

Figures are built as ``matplotlib.figure.Figure`` objects on an explicit Agg canvas rather
than through pyplot: no global backend switch for whoever imported us, and no figure
registry to leak into (each figure is closed by dropping it; ``save`` also clears it).
Every drawing function returns its Figure, so that what it drew can be checked.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from alexnet.report.compare import ClaimResult
from alexnet.report.stats import PCT, SPLIT_NAMES, errors, split_of

if TYPE_CHECKING:
    from matplotlib.figure import Figure

WIDTH, HEIGHT, DPI = 8.0, 4.5, 110  # ~880 px wide: GitHub's content column, no rescaling
RC = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "xtick.labelsize": 10,
      "ytick.labelsize": 10, "legend.fontsize": 10, "legend.title_fontsize": 10}
PAPER_COLOUR, REPRO_COLOUR, MEASURED_COLOUR = "#d62728", "#1f77b4", "black"


def _figure(height: float = HEIGHT):  # -> (Figure, Axes)
    fig, axes = _panels(height, [1])
    return fig, axes[0]


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    fig.clear()
    return path


def _style():  # a context manager: theme for our figures only, not the caller's
    import seaborn as sns

    return sns.axes_style("whitegrid")


def learning_curves(history: pd.DataFrame, used: pd.DataFrame, *, key: str,
                    order: list[str], target_pct: float | None = None) -> Figure:
    """Error (%) against epoch per arm: mean over seeds, band from min to max seed.

    Like the paper's Figure 1 for ``key="train_error"``, with its dashed target line.
    """
    import matplotlib as mpl
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    df = history[history["key"] == key].merge(used[["run_id", "arm", "seed"]], on="run_id")
    df = df.assign(error=df["value"] * PCT)
    hue_order = [a for a in order if a in set(df["arm"])]
    what = "training" if key == "train_error" else "validation"
    with _style(), mpl.rc_context(RC):
        fig, ax = _figure()
        if df.empty:  # finished runs that logged no per-epoch metrics
            ax.text(0.5, 0.5, "no per-epoch metrics logged", ha="center", va="center",
                    transform=ax.transAxes)
            return fig
        sns.lineplot(data=df, x="epoch", y="error", hue="arm", hue_order=hue_order,
                     style="arm", style_order=hue_order, markers=True, dashes=False,
                     errorbar=("pi", 100), ax=ax)
        if target_pct is not None:
            ax.axhline(target_pct, ls="--", lw=1.2, color="0.35",
                       label=f"{target_pct:g}% target")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="epoch", ylabel=f"{what} top-1 error (%)",
               title=f"{what.capitalize()} error per arm (line: mean over seeds; "
                     "band: lowest to highest seed)")
        ax.legend(title="arm", loc="best")
        return fig


def seed_points(used: pd.DataFrame, *, order: list[str]) -> Figure:
    """Final top-1 error per arm on the verdicts' split: one dot per seed, mean ± sd below.

    An error lives in [0, 100]%: the sd bar is cut at both ends rather than drawn below
    0% (a spread that large says the seeds disagree, not that an error can be negative).
    """
    import matplotlib as mpl
    import numpy as np
    import seaborn as sns

    split = split_of(used)
    df = used.assign(error=errors(used, split), seed=used["seed"].map(lambda s: f"seed {s}"))
    df = df[df["error"].notna()]
    arms = [a for a in order if a in set(df["arm"])]
    height = max(3.0, min(HEIGHT * 2, 1.6 + 0.6 * len(arms)))
    with _style(), mpl.rc_context(RC):
        fig, ax = _figure(height)
        sns.stripplot(data=df, x="error", y="arm", order=arms, hue="seed", size=8,
                      jitter=0.08, alpha=0.9, ax=ax)
        stats = df.groupby("arm")["error"].agg(["mean", "std"]).reindex(arms)
        sd = stats["std"].fillna(0).to_numpy()
        mean = stats["mean"].to_numpy()
        below, above = np.minimum(sd, mean), np.minimum(sd, PCT - mean)
        ys = [i + 0.3 for i in range(len(arms))]  # under the dots, not on top of them
        ax.errorbar(mean, ys, xerr=[below, above], fmt="D", ms=6, color=MEASURED_COLOUR,
                    capsize=4, lw=1.5, label="mean ± sd (cut at 0% and 100%)")
        ax.set_ylim(len(arms) - 0.5, -0.5)
        ax.set_xlim(left=max(0.0, ax.get_xlim()[0]), right=min(PCT, ax.get_xlim()[1]))
        what = SPLIT_NAMES[split]
        ax.set(xlabel=f"final top-1 {what} error (%)", ylabel="",
               title=f"{what.capitalize()} error per arm, one dot per seed")
        ax.legend(loc="best")
        return fig


def figure1(history: pd.DataFrame, runs: pd.DataFrame, *, axis: str, arm: str,
            baseline: str, target_pct: float) -> Figure:
    """The paper's Figure 1 at this scale: training error against epochs, ``arm`` solid and
    ``baseline`` dashed (ReLU and tanh in Section 3.1), one line per seed, the target as a
    dotted line, and a mark where each seed crosses it (``stats.with_crossings``)."""
    import matplotlib as mpl
    from matplotlib.ticker import MaxNLocator

    curves = history[history["key"] == "train_error"].merge(
        runs[["run_id", "seed", f"axis.{axis}"]], on="run_id")
    colours = {arm: "black", baseline: "#1f77b4"}
    with _style(), mpl.rc_context(RC):
        fig, ax = _figure()
        for name, style in ((arm, "-"), (baseline, "--")):
            mine = curves[curves[f"axis.{axis}"] == name]
            seeds = sorted(mine["seed"].dropna().unique())
            label = f"{axis}={name} ({len(seeds)} seeds)"
            for i, seed in enumerate(seeds):
                line = mine[mine["seed"] == seed].sort_values("epoch")
                ax.plot(line["epoch"], line["value"] * PCT, style, color=colours[name], lw=1.6,
                        marker="o", ms=3, alpha=0.85, label=label if i == 0 else None)
            cross = runs.loc[(runs[f"axis.{axis}"] == name), "crossing_epoch"].dropna() \
                if "crossing_epoch" in runs else pd.Series(dtype=float)
            ax.plot(cross, [target_pct] * len(cross), "|", color=colours[name], ms=14, mew=2)
        ax.axhline(target_pct, ls=":", lw=1.2, color="0.35", label=f"{target_pct:g}% target")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="epochs", ylabel="training error rate (%)",
               title=f"Figure 1 at this scale: {arm} (solid) and {baseline} (dashed); "
                     "| = crossing")
        ax.legend(loc="upper right")
        return fig


def forest(results: list[ClaimResult]) -> Figure:
    """Measured delta with its 95% interval beside the paper's (and Mishkin et al.'s)
    figure, one row per claim. Error deltas (pp) and the speed ratio (×) have different
    units, so they get separate panels; the ratio on a log axis."""
    import matplotlib as mpl
    from matplotlib.lines import Line2D

    groups = [(k, [r for r in results if r.kind == k]) for k in ("delta", "ratio")]
    groups = [(k, rs) for k, rs in groups if rs]
    rows = sum(len(rs) for _, rs in groups)
    height = max(3.0, min(10.0, 1.4 + 0.45 * rows + 0.6 * len(groups)))
    with _style(), mpl.rc_context(RC):
        fig, axes = _panels(height, [len(rs) for _, rs in groups])
        for ax, (kind, rs) in zip(axes, groups, strict=True):
            _forest_panel(ax, kind, rs)
        handles = [Line2D([], [], marker="o", color=MEASURED_COLOUR, ls="-",
                          label="measured, 95% interval")]
        if any(r.paper_value is not None for r in results):
            handles.append(Line2D([], [], marker="D", color=PAPER_COLOUR, ls="none",
                                  label="paper"))
        if any(r.reproduction_value is not None for r in results):
            handles.append(Line2D([], [], marker="^", color=REPRO_COLOUR, ls="none",
                                  label="Mishkin et al. 2016"))
        axes[0].legend(handles=handles, loc="best")
        axes[0].set_title("Measured effect against the paper's, one row per claim")
        return fig


def _panels(height: float, sizes: list[int]):  # -> (Figure, [Axes]), panels stacked
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(sizes), 1, squeeze=False,
                        gridspec_kw={"height_ratios": [s + 1 for s in sizes]})[:, 0]
    return fig, list(axes)


def _forest_panel(ax: object, kind: str, results: list[ClaimResult]) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter

    labels = []
    null = 1.0 if kind == "ratio" else 0.0
    xs: list[float] = [null]
    for y, r in enumerate(results):
        iv = r.interval
        label = r.claim.id
        if iv.n and math.isfinite(iv.estimate):
            lo, hi = (iv.low, iv.high) if iv.has_interval else (iv.estimate, iv.estimate)
            ax.errorbar([iv.estimate], [y], xerr=[[iv.estimate - lo], [hi - iv.estimate]],
                        fmt="o", color=MEASURED_COLOUR, capsize=4, ms=7, zorder=3)
            xs += [lo, hi, iv.estimate]
            label += f"\n{r.verdict}"
        else:
            label += "\nnot measured"
        # Published figures sit just under the measured row, so neither hides the other.
        if r.paper_value is not None:
            ax.plot([r.paper_value], [y + 0.22], "D", color=PAPER_COLOUR, ms=7, zorder=4)
            xs.append(r.paper_value)
        if r.reproduction_value is not None:
            ax.plot([r.reproduction_value], [y + 0.22], "^", color=REPRO_COLOUR, ms=8,
                    zorder=4)
            xs.append(r.reproduction_value)
        labels.append(label)
    ax.axvline(null, color="0.3", lw=1)
    ax.set_yticks(range(len(results)), labels)
    ax.set_ylim(len(results) - 0.5, -0.5)  # first claim on top
    finite = [x for x in xs if math.isfinite(x) and (kind != "ratio" or x > 0)]
    if kind == "ratio":
        ax.set_xscale("log")
        lo, hi = min(finite), max(finite)
        ax.set_xlim(lo / 1.5, hi * 1.5)
        ax.xaxis.set_major_locator(FixedLocator([0.1, 0.2, 0.5, 1, 2, 3, 5, 10, 20, 50, 100]))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel("epochs to the training-error target, baseline ÷ arm (×, log scale)")
    else:
        span = max(1.0, max(abs(x) for x in finite))
        ax.set_xlim(-1.15 * span, 1.15 * span)
        ax.set_xlabel("arm − baseline (percentage points of top-1 error, or of the "
                      "error − training error gap)")
