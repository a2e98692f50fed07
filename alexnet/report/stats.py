"""The report's statistics: pure functions on DataFrames and arrays, no MLflow, no plots.

Input frames have one row per cell run with the columns ``load.normalise`` produces:
``arm``, ``seed``, ``status``, ``tuned``, ``axis.<axis>``, the final metrics as fractions
(``final_val_error``, ``test_error``, ...) and the run's params (``params.optim.lr``, ...).
Everything returned is in percent / percentage points, the report's units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats as sps

CONFIDENCE = 0.95
PCT = 100.0
IN_PROGRESS = ("RUNNING", "SCHEDULED")
DEFAULT_TARGET = 0.25  # Figure 1's line, where a run does not record its own
# The error columns of each split. Validation is carved from the training set and steers
# schedules and sweeps; a held-out test split, when the data has one, is scored once at
# the end and carries the verdicts.
SPLITS = {"test": ("test_error", "test_error_top5"),
          "val": ("final_val_error", "final_val_error_top5")}
SPLIT_NAMES = {"test": "test", "val": "validation", "train": "training"}

# "reproduced" | "contradicted" | "inconclusive" | "inconclusive (why)" | "not measured"
Verdict = str


# --- intervals and verdicts ----------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float  # nan when there is no interval (fewer than two values)
    high: float
    n: int

    @property
    def has_interval(self) -> bool:
        return self.n >= 2 and math.isfinite(self.low) and math.isfinite(self.high)

    @property
    def zero_width(self) -> bool:
        return self.has_interval and self.low == self.high

    def contains(self, value: float) -> bool:
        return self.has_interval and self.low <= value <= self.high


def t_interval(values: np.ndarray | list[float] | pd.Series,
               confidence: float = CONFIDENCE) -> Interval:
    """Mean and Student-t interval of ``values`` (nan ignored); no interval below two.

    Identical values have no spread: the interval is the point itself (scipy would answer
    nan for a zero scale), and the report says why it has no width.
    """
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, 1)
    sem = float(sps.sem(x))
    if sem == 0:
        return Interval(mean, mean, mean, n)
    low, high = sps.t.interval(confidence, n - 1, loc=mean, scale=sem)
    return Interval(mean, float(low), float(high), n)


def ratio_interval(baseline: np.ndarray | list[float], arm: np.ndarray | list[float],
                   confidence: float = CONFIDENCE) -> Interval:
    """Geometric-mean ratio baseline/arm with a t-interval on the per-seed log ratios,
    exponentiated: a ratio lives on a log scale (2× and 0.5× are equally far from 1)."""
    logs = np.log(np.asarray(baseline, dtype=float) / np.asarray(arm, dtype=float))
    iv = t_interval(logs, confidence)
    return Interval(math.exp(iv.estimate) if iv.n else math.nan, math.exp(iv.low),
                    math.exp(iv.high), iv.n)


def verdict(iv: Interval, direction: Literal["lower", "higher"], null: float = 0.0) -> Verdict:
    """Reproduced: the paper's sign and an interval excluding ``null``; contradicted: the
    opposite sign, excluding ``null``; inconclusive otherwise (or with a single seed)."""
    if iv.n == 0:
        return "not measured"
    if iv.n == 1:
        return "inconclusive (one seed)"
    if iv.low > null or iv.high < null:
        return "reproduced" if (iv.low > null) == (direction == "higher") else "contradicted"
    return "inconclusive"


# --- which split ---------------------------------------------------------------------------


def split_of(runs: pd.DataFrame) -> Literal["test", "val"]:
    """"test" when every run has a test error, else "val": a comparison never mixes them."""
    has = "test_error" in runs and len(runs) and bool(runs["test_error"].notna().all())
    return "test" if has else "val"


def errors(runs: pd.DataFrame, split: str, top5: bool = False) -> pd.Series:
    """Final top-1 (or top-5) error of ``split`` in %."""
    return col(runs, SPLITS[split][1 if top5 else 0]) * PCT


# --- epochs to the training-error target ---------------------------------------------------


def with_crossings(used: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """``used`` plus the epoch at which each run's training error first reached its target.

    Training error is logged once per epoch, so the logged ``epochs_to_target`` has a
    resolution of one epoch (and equal counts give zero-width intervals). Here the crossing
    of the target line is interpolated linearly between the last epoch above it and the
    first at or below it. Nothing is measured before epoch 1 (no epoch 0 is assumed): a run
    already at or below the target after its first logged epoch gets that epoch, marked
    ``crossing_first`` — an upper bound, treated as censored like a run that never reached
    the target. Runs without a per-epoch history fall back to the whole-epoch count.

    Adds ``crossing_epoch`` (nan: never reached), ``crossing_first``, ``crossing_interpolated``.
    """
    out = used.copy()
    target = col(out, "params.train.target_train_error").fillna(DEFAULT_TARGET)
    h = history[history["key"] == "train_error"] if not history.empty else history
    h = h.merge(pd.DataFrame({"run_id": out["run_id"], "target": target}), on="run_id") \
        if not h.empty else pd.DataFrame(columns=["run_id", "epoch", "value", "target"])
    h = h.sort_values(["run_id", "epoch"])
    h = h.assign(prev_epoch=h.groupby("run_id")["epoch"].shift(),
                 prev_value=h.groupby("run_id")["value"].shift())
    first = h[h["value"] <= h["target"]].groupby("run_id").head(1).set_index("run_id")
    frac = (first["prev_value"] - first["target"]) / (first["prev_value"] - first["value"])
    at = (first["prev_epoch"] + frac * (first["epoch"] - first["prev_epoch"])).fillna(
        first["epoch"].astype(float))
    logged = out["run_id"].isin(set(h["run_id"]))
    whole = col(out, "epochs_to_target")
    out["crossing_epoch"] = np.where(logged, out["run_id"].map(at).astype(float), whole)
    first_epoch = out["run_id"].map(first["prev_epoch"].isna())
    out["crossing_first"] = np.where(logged, first_epoch.fillna(False).astype(bool),
                                     whole == 1)
    out["crossing_interpolated"] = logged.to_numpy()
    return out


# --- per arm -------------------------------------------------------------------------------


def arm_table(used: pd.DataFrame, cells: pd.DataFrame,
              order: list[str] | None = None) -> pd.DataFrame:
    """One row per arm: mean and sd over seeds (errors in %), seeds, lr / wd, problem runs.

    ``used`` are the finished runs the numbers come from (one grid), ``cells`` all runs
    of that grid, for the counts of failed, interrupted and in-progress ones. The gap is
    the verdicts' split (test where every run has it) minus training error.
    """
    split = split_of(used)
    u = used.assign(
        top1=errors(used, "val"), top5=errors(used, "val", top5=True),
        test1=errors(used, "test"), test5=errors(used, "test", top5=True),
        train=col(used, "final_train_error") * PCT,
        epoch_s=col(used, "mean_epoch_seconds"),
        ett=col(used, "crossing_epoch") if "crossing_epoch" in used
        else col(used, "epochs_to_target"),
        ett_first=used.get("crossing_first", False),
        lr=used.get("params.optim.lr"), weight_decay=used.get("params.optim.weight_decay"))
    u["gap"] = errors(u, split) - u["train"]
    numbers = ["top1", "top5", "test1", "test5", "train", "gap", "epoch_s", "ett"]
    stats = u.groupby("arm").agg(
        seeds=("seed", "size"), seed_list=("seed", lambda s: sorted(int(x) for x in s)),
        ett_reached=("ett", "count"), ett_first=("ett_first", "sum"),
        lr=("lr", _distinct), weight_decay=("weight_decay", _distinct),
        tuned=("tuned", "all"), any_tuned=("tuned", "any"),
        **{f"{n}_mean": (n, "mean") for n in numbers}, **{f"{n}_sd": (n, "std") for n in numbers})
    state = cells.assign(
        failed=cells["status"] == "FAILED",
        diverged=(cells["status"] == "FAILED") & cells["diverged"].astype(bool),
        killed=cells["status"] == "KILLED", running=cells["status"].isin(IN_PROGRESS))
    counts = state.groupby("arm")[["failed", "diverged", "killed", "running"]].sum()
    arms = [a for a in dict.fromkeys([*(order or []), *cells["arm"].dropna()])
            if a in counts.index]
    table = counts.join(stats, how="left").reindex(arms)
    table["seeds"] = table["seeds"].fillna(0).astype(int)
    table["seed_list"] = [v if isinstance(v, list) else [] for v in table["seed_list"]]
    table["tuned"] = table["tuned"].fillna(False).astype(bool) & (table["seeds"] > 0)
    table["partly_tuned"] = table["any_tuned"].fillna(False).astype(bool) & ~table["tuned"]
    for name in ("ett_reached", "ett_first", "failed", "diverged", "killed", "running"):
        table[name] = table[name].fillna(0).astype(int)
    table[["lr", "weight_decay"]] = table[["lr", "weight_decay"]].fillna("")
    table["split"] = split
    return table.drop(columns="any_tuned").rename_axis("arm").reset_index()


def problem_runs(cells: pd.DataFrame) -> pd.DataFrame:
    """Runs not in the averages: failed, diverged, interrupted, still running."""
    bad = cells[cells["status"] != "FINISHED"].copy()
    bad["what"] = np.where(bad["status"].isin(IN_PROGRESS), "in progress",
                           np.where(bad["diverged"].astype(bool), "diverged",
                                    bad["status"].str.lower()))
    # A failure followed by a finished run of the same arm and seed was fixed by a rerun.
    done = cells[cells["status"] == "FINISHED"]
    last_done = done.groupby(["experiment", "arm", "seed"])["start_time"].max()
    bad["rerun_finished"] = [
        (e, a, s) in last_done.index and last_done[(e, a, s)] > t
        for e, a, s, t in zip(bad["experiment"], bad["arm"], bad["seed"], bad["start_time"],
                              strict=True)]
    cols = ["experiment", "arm", "seed", "status", "what", "failure_reason", "run_id",
            "ablate.heartbeat_ms", "rerun_finished"]
    bad = bad.reindex(columns=[*bad.columns.difference(cols), *cols])
    return bad[cols].sort_values(["experiment", "arm", "seed"]).reset_index(drop=True)


def col(df: pd.DataFrame, name: str) -> pd.Series:
    return pd.to_numeric(df[name], errors="coerce") if name in df else pd.Series(
        np.nan, index=df.index, dtype=float)


def _distinct(values: pd.Series) -> str:
    shown = sorted({_short(str(v)) for v in values.dropna()}, key=_as_number)
    return ", ".join(shown)


def _short(text: str) -> str:
    """A tuned 0.006387222264749597 reads as 0.00639: three significant digits."""
    number = _as_number(text)
    return text if math.isinf(number) else f"{number:.3g}"


def _as_number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.inf
