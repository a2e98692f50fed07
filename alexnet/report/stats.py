"""The report's statistics: pure functions on DataFrames and arrays, no MLflow, no plots.

Input frames have one row per cell run with the columns ``load.normalise`` produces:
``arm``, ``seed``, ``status``, ``tuned``, ``axis.<axis>``, the final metrics as fractions
(``final_val_error``, ...) and the run's params (``params.optim.lr``, ...). Everything
returned is in percent / percentage points, the report's units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats as sps

from alexnet.claims import Claim

CONFIDENCE = 0.95
PCT = 100.0
IN_PROGRESS = ("RUNNING", "SCHEDULED")
# Params that set the scale of a run (not its design choice): runs of one experiment at
# another scale (a --quick run beside a full one) are not averaged together.
SCALE_PARAMS = ("params.data.source", "params.data.max_train", "params.data.image_size",
                "params.train.epochs")

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

    def contains(self, value: float) -> bool:
        return self.has_interval and self.low <= value <= self.high


def t_interval(values: np.ndarray | list[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and Student-t interval of ``values`` (nan ignored); no interval below two."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, 1)
    half = float(sps.t.ppf((1 + confidence) / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n)


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


# --- which runs count ----------------------------------------------------------------------


def pick_runs(cells: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The finished runs a report averages: one per (experiment, arm, seed).

    A cell may have several finished runs (rerun with --force, tuned after untuned, a
    --quick grid beside a full one). Runs at the scale of the most recent finished run
    are kept; of those a tuned run beats an untuned one, then the latest wins. Returns the
    runs and one note per kind of run left out, so nothing disappears silently.
    """
    done = cells[cells["status"] == "FINISHED"]
    if done.empty:
        return done.copy(), []
    notes: list[str] = []
    kept = []
    for exp, runs in done.groupby("experiment", sort=False):
        runs = runs.sort_values("start_time")
        scale = [p for p in SCALE_PARAMS if p in runs and not _set_by_arm(runs, p)]
        if scale:
            sig = runs[scale].astype(str).agg("|".join, axis=1)
            other = runs[sig != sig.iloc[-1]]
            if len(other):
                latest = runs.iloc[-1]
                what = ", ".join(f"{p[len('params.'):]}={latest[p]}" for p in scale)
                notes.append(f"{exp}: {len(other)} finished run(s) at another scale left out "
                             f"(this report uses {what})")
            runs = runs[sig == sig.iloc[-1]]
        ranked = runs.assign(_t=runs["tuned"].astype(int)).sort_values(["_t", "start_time"])
        best = ranked.drop_duplicates(["arm", "seed"], keep="last").drop(columns="_t")
        superseded = len(runs) - len(best)
        if superseded:
            notes.append(f"{exp}: {superseded} earlier or untuned finished run(s) of a cell "
                         "superseded by a later or tuned run of the same arm and seed")
        kept.append(best)
    return pd.concat(kept).reset_index(drop=True), notes


def _set_by_arm(runs: pd.DataFrame, param: str) -> bool:
    """True when ``param`` is a design choice of the ablation (one value per arm, differing
    between arms), so that it must not count as a difference of scale."""
    per_arm = runs.groupby("arm")[param].nunique(dropna=False)
    return bool((per_arm == 1).all() and runs[param].nunique(dropna=False) > 1)


# --- per arm -------------------------------------------------------------------------------


def arm_table(used: pd.DataFrame, cells: pd.DataFrame,
              order: list[str] | None = None) -> pd.DataFrame:
    """One row per arm: mean and sd over seeds (errors in %), seeds, lr / wd, problem runs.

    ``used`` are the finished runs the numbers come from (``pick_runs``); ``cells`` are
    all runs, for the counts of failed, interrupted and in-progress ones.
    """
    arms = list(dict.fromkeys([*(order or []), *cells["arm"].dropna()]))
    arms = [a for a in arms if a in set(cells["arm"])]
    rows = []
    for arm in arms:
        u = used[used["arm"] == arm]
        everything = cells[cells["arm"] == arm]
        row: dict[str, object] = {"arm": arm, "seeds": len(u),
                                  "seed_list": sorted(int(s) for s in u["seed"].dropna())}
        for name, values in (("top1", _col(u, "final_val_error") * PCT),
                             ("top5", _col(u, "final_val_error_top5") * PCT),
                             ("train", _col(u, "final_train_error") * PCT),
                             ("gap", (_col(u, "final_val_error") - _col(u, "final_train_error"))
                              * PCT),
                             ("epoch_s", _col(u, "mean_epoch_seconds"))):
            row[f"{name}_mean"], row[f"{name}_sd"] = _mean_sd(values)
        ett = _col(u, "epochs_to_target")
        row["ett_mean"], row["ett_sd"] = _mean_sd(ett)
        row["ett_reached"] = int(ett.notna().sum())
        row["lr"] = _distinct(u, "params.optim.lr")
        row["weight_decay"] = _distinct(u, "params.optim.weight_decay")
        row["tuned"] = bool(len(u)) and bool(u["tuned"].all())
        row["partly_tuned"] = bool(u["tuned"].any()) and not row["tuned"]
        row["failed"] = int((everything["status"] == "FAILED").sum())
        row["diverged"] = int(((everything["status"] == "FAILED") & everything["diverged"]).sum())
        row["killed"] = int((everything["status"] == "KILLED").sum())
        row["running"] = int(everything["status"].isin(IN_PROGRESS).sum())
        rows.append(row)
    return pd.DataFrame(rows)


def problem_runs(cells: pd.DataFrame) -> pd.DataFrame:
    """Runs not in the averages: failed, diverged, interrupted, still running."""
    bad = cells[cells["status"] != "FINISHED"].copy()
    bad["what"] = np.where(bad["status"].isin(IN_PROGRESS), "in progress",
                           np.where(bad["diverged"], "diverged",
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


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    return pd.to_numeric(df[name], errors="coerce") if name in df else pd.Series(
        np.nan, index=df.index, dtype=float)


def _mean_sd(values: pd.Series) -> tuple[float, float]:
    v = values.dropna()
    if v.empty:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan


def _distinct(df: pd.DataFrame, col: str) -> str:
    if col not in df or df.empty:
        return ""
    values = sorted({_short(str(v)) for v in df[col].dropna()}, key=_as_number)
    return ", ".join(values)


def _short(text: str) -> str:
    """A tuned 0.006387222264749597 reads as 0.00639: three significant digits."""
    number = _as_number(text)
    return text if math.isinf(number) else f"{number:.3g}"


def _as_number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.inf


# --- claims --------------------------------------------------------------------------------


@dataclass
class ClaimResult:
    """One row of the delta table: the paired comparison a claim asks for."""

    claim: Claim
    experiment: str | None
    kind: Literal["delta", "ratio"]
    interval: Interval  # arm − baseline in pp, or the ratio baseline/arm
    verdict: Verdict
    seeds: list[int] = field(default_factory=list)  # the paired seeds
    missing: str | None = None  # why nothing was measured
    notes: list[str] = field(default_factory=list)
    held: dict[str, str] = field(default_factory=dict)  # other axes at their reference arm
    top5: Interval | None = None  # arm − baseline of top-5 error (pp), where the paper has one
    bound: Literal["lower", "upper"] | None = None  # censored runs make the ratio a bound
    target_pct: float = 25.0  # the training-error target, for relu_speed

    @property
    def null(self) -> float:
        return 1.0 if self.kind == "ratio" else 0.0

    @property
    def paper_value(self) -> float | None:
        return self.claim.paper_delta

    @property
    def reproduction_value(self) -> float | None:
        """Mishkin et al.'s figure where it measures what this row measures (top-1 error
        of the same two arms); their relu and dropout numbers are final accuracies of
        other comparisons, shown as text only."""
        c = self.claim
        return c.reproduction_delta if c.metric == "val_error" else None

    def agreement(self) -> dict[str, str]:
        """Whose published figure this measurement agrees with, and how far.

        "size": the figure lies inside the 95% interval; "direction": it does not, but the
        interval excludes no effect on the figure's side. A claim the paper states only in
        words agrees in direction when the verdict is "reproduced".
        """
        out: dict[str, str] = {}
        if not self.interval.has_interval:
            return out
        figures = {"paper": self.paper_value, "Mishkin et al.": self.reproduction_value}
        for who, value in figures.items():
            if value is None:
                if who == "paper" and self.verdict == "reproduced":
                    out[who] = "direction"
            elif self.interval.contains(value):
                out[who] = "size"
            elif (value - self.null) * (self.interval.low - self.null) > 0 and \
                    (value - self.null) * (self.interval.high - self.null) > 0:
                out[who] = "direction"
        return out


def not_measured(claim: Claim, why: str, experiment: str | None = None) -> ClaimResult:
    kind: Literal["delta", "ratio"] = "ratio" if claim.metric == "epochs_to_target_ratio" \
        else "delta"
    return ClaimResult(claim, experiment, kind, Interval(math.nan, math.nan, math.nan, 0),
                       "not measured", missing=why)


def evaluate_claim(claim: Claim, used: pd.DataFrame, cells: pd.DataFrame,
                   reference: dict[str, str], experiment: str | None = None,
                   confidence: float = CONFIDENCE) -> ClaimResult:
    """Pair arm and baseline runs of ``claim`` by seed and compare them.

    ``used`` are the finished runs of one experiment (``pick_runs``), ``cells`` all of its
    runs (to say why an arm is missing). Other axes are held at their ``reference`` arm.
    """
    col = f"axis.{claim.axis}"
    result = not_measured(claim, "", experiment)
    result.missing = None
    kind = result.kind
    if col not in cells or cells[col].isna().all():
        result.missing = f"no runs vary axis '{claim.axis}'"
        return result
    result.held = {a: r for a, r in reference.items()
                   if a != claim.axis and f"axis.{a}" in cells}
    if col in used:
        mask = used[col].isin([claim.arm, claim.baseline])
        for axis, arm in result.held.items():
            mask &= used[f"axis.{axis}"] == arm if f"axis.{axis}" in used else False
        sel = used[mask]
    else:  # nothing finished yet
        sel = pd.DataFrame(columns=[col, "seed"])
    arm_runs = sel[sel[col] == claim.arm].set_index("seed")
    base_runs = sel[sel[col] == claim.baseline].set_index("seed")
    absent = [_why_absent(cells, col, name, result.held)
              for name, runs in ((claim.arm, arm_runs), (claim.baseline, base_runs))
              if runs.empty]
    if absent:
        result.missing = "; ".join(absent)
        return result
    seeds = sorted(set(arm_runs.index) & set(base_runs.index))
    for name, runs in ((claim.arm, arm_runs), (claim.baseline, base_runs)):
        alone = sorted(set(runs.index) - set(seeds))
        if alone:
            result.notes.append(f"seed(s) {', '.join(map(str, alone))} only in "
                                f"{claim.axis}={name}: not paired")
    if not seeds:
        result.missing = "no seed finished in both arms"
        return result
    a, b = arm_runs.loc[seeds], base_runs.loc[seeds]
    result.seeds = [int(s) for s in seeds]
    if kind == "ratio":
        _ratio(result, a, b, confidence)
    else:
        if claim.metric == "gap":
            diff = ((_col(a, "final_val_error") - _col(a, "final_train_error"))
                    - (_col(b, "final_val_error") - _col(b, "final_train_error"))) * PCT
        else:
            diff = (_col(a, "final_val_error") - _col(b, "final_val_error")) * PCT
        result.interval = t_interval(diff.to_numpy(), confidence)
        if claim.paper_delta_top5 is not None:
            top5 = (_col(a, "final_val_error_top5") - _col(b, "final_val_error_top5")) * PCT
            result.top5 = t_interval(top5.to_numpy(), confidence)
        result.verdict = verdict(result.interval, claim.direction)
    if result.interval.n == 0:
        result.missing = "the paired runs lack the metric"
    return result


def _why_absent(cells: pd.DataFrame, col: str, arm: str, held: dict[str, str]) -> str:
    """"arm norm=none was never run", or "no finished run of norm=none (2 failed)"."""
    label = f"{col[len('axis.'):]}={arm}"
    mask = cells[col] == arm
    for axis, ref in held.items():
        mask &= cells[f"axis.{axis}"] == ref
    where = f" with {', '.join(f'{a}={r}' for a, r in held.items())}" if held else ""
    runs = cells[mask]
    if runs.empty:
        return f"arm {label} missing: never run{where}"
    counts = runs["status"].str.lower().replace({"scheduled": "running"}).value_counts()
    said = ", ".join(f"{n} {s}" for s, n in counts.items())
    return f"arm {label} missing: no finished run{where} ({said})"


def _ratio(result: ClaimResult, a: pd.DataFrame, b: pd.DataFrame, confidence: float) -> None:
    """Epochs to the training-error target, baseline ÷ arm, per seed.

    A run that never reached the target is censored: it would have needed more than the
    epochs it ran. Its pair enters with that bound, which makes the ratio a lower bound
    (baseline never reached) or an upper bound (arm never reached); a pair where neither
    reached carries no information and is dropped. A verdict in the bound's favour still
    holds; one against it is inconclusive.
    """
    claim = result.claim
    target = _col(a, "params.train.target_train_error").dropna()
    if not target.empty:
        result.target_pct = float(target.iloc[0]) * PCT
    ea, eb = _col(a, "epochs_to_target"), _col(b, "epochs_to_target")
    ca, cb = _col(a, "epochs_completed"), _col(b, "epochs_completed")
    arm_never, base_never = ea.isna(), eb.isna()
    both = arm_never & base_never
    if both.any():
        result.notes.append(f"{int(both.sum())} seed pair(s) where neither arm reached "
                            f"{result.target_pct:.0f}% training error: dropped")
    if base_never.any() and not both.all():
        result.notes.append(f"{claim.axis}={claim.baseline} never reached "
                            f"{result.target_pct:.0f}% training error in "
                            f"{int((base_never & ~both).sum())} of {len(eb)} seed(s); "
                            "its epochs count as at least those it ran")
    if arm_never.any() and not both.all():
        result.notes.append(f"{claim.axis}={claim.arm} never reached "
                            f"{result.target_pct:.0f}% training error in "
                            f"{int((arm_never & ~both).sum())} of {len(ea)} seed(s)")
    keep = ~both
    num = eb.where(~base_never, cb)[keep]
    den = ea.where(~arm_never, ca)[keep]
    lower, upper = bool((base_never & keep).any()), bool((arm_never & keep).any())
    result.bound = "lower" if lower and not upper else "upper" if upper and not lower else None
    result.interval = ratio_interval(num.to_numpy(), den.to_numpy(), confidence)
    v = verdict(result.interval, claim.direction, null=1.0)
    favours_higher = v == "reproduced" if claim.direction == "higher" else v == "contradicted"
    against_bound = (lower and not favours_higher) or (upper and favours_higher)
    if v in ("reproduced", "contradicted") and against_bound:
        # The bound pulls the estimate toward this very verdict, so it cannot stand.
        v = "inconclusive (censored)"
    result.verdict = v
