"""A claim of the paper against one grid's runs: the paired comparison it asks for.

Three shapes of comparison, one result type:
- two arms of an axis, paired by seed (``arm − baseline`` in pp, or the epochs ratio);
- an arm against the mean of the axis's other arms, per seed (Section 7's depth claim:
  the full net against the nets that each lack one middle conv layer);
- an ensemble against its own members (Section 6, Table 2): averaged softmax outputs of
  an arm's seeds against the single models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from alexnet.claims import Claim
from alexnet.report.stats import (
    CONFIDENCE,
    PCT,
    Interval,
    Verdict,
    col,
    errors,
    ratio_interval,
    split_of,
    t_interval,
    verdict,
)

# Baselines that name no arm but the mean of every other arm of the axis, per seed.
MEAN_OF_THE_OTHER_ARMS = {"shallower"}  # claim `depth`: full vs each net without a layer
PAPER_ENSEMBLE_SIZE = 5  # Table 2: five CNNs averaged


@dataclass
class ClaimResult:
    """One row of the delta table: the comparison a claim asks for."""

    claim: Claim
    experiment: str | None
    kind: Literal["delta", "ratio"]
    interval: Interval  # arm − baseline in pp, or the ratio baseline/arm
    verdict: Verdict
    seeds: list[int] = field(default_factory=list)  # the paired seeds (ensemble: members)
    missing: str | None = None  # why nothing was measured
    notes: list[str] = field(default_factory=list)
    held: dict[str, str] = field(default_factory=dict)  # other axes at their reference arm
    top5: Interval | None = None  # arm − baseline of top-5 error (pp), where the paper has one
    bound: Literal["lower", "upper"] | None = None  # censored runs make the ratio a bound
    target_pct: float = 25.0  # the training-error target, for relu_speed
    split: Literal["test", "val", "train"] = "val"  # the split whose errors are compared
    arm_text: str = ""  # what is compared, e.g. "activation=relu"
    baseline_text: str = ""  # ... against what, e.g. "the mean of depth=no_conv2, ..."
    over: str = "paired seeds"  # what the interval is over

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

    def side(self) -> int:
        """+1 / −1: the interval lies wholly above / below no effect; 0: it holds it."""
        iv = self.interval
        if not iv.has_interval or iv.contains(self.null):
            return 0
        return 1 if iv.low > self.null else -1

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
            elif self.side() == np.sign(value - self.null) != 0:
                out[who] = "direction"
        return out


def not_measured(claim: Claim, why: str, experiment: str | None = None) -> ClaimResult:
    kind: Literal["delta", "ratio"] = "ratio" if claim.metric == "epochs_to_target_ratio" \
        else "delta"
    return ClaimResult(claim, experiment, kind, Interval(math.nan, math.nan, math.nan, 0),
                       "not measured", missing=why, split="train" if kind == "ratio" else "val")


def evaluate_claim(claim: Claim, used: pd.DataFrame, cells: pd.DataFrame,
                   reference: dict[str, str], experiment: str | None = None,
                   confidence: float = CONFIDENCE) -> ClaimResult:
    """Pair arm and baseline runs of ``claim`` by seed and compare them.

    ``used`` are the finished runs of one grid (one per arm and seed), ``cells`` all of
    its runs (to say why an arm is missing). Other axes are held at their ``reference``
    arm. A baseline in MEAN_OF_THE_OTHER_ARMS is, per seed, the mean of every other arm
    of the axis, and a seed counts only where all of them finished.
    """
    column = f"axis.{claim.axis}"
    result = not_measured(claim, "", experiment)
    result.missing = None
    if column not in cells or cells[column].isna().all():
        result.missing = f"no runs vary axis '{claim.axis}'"
        return result
    result.held = {a: r for a, r in reference.items()
                   if a != claim.axis and f"axis.{a}" in cells}
    sel = used
    for axis, arm in result.held.items():
        sel = sel[sel[f"axis.{axis}"] == arm] if f"axis.{axis}" in sel else sel.iloc[:0]
    if column not in sel:
        sel = pd.DataFrame(columns=[column, "seed"])
    pooled = claim.baseline in MEAN_OF_THE_OTHER_ARMS
    base_arms = sorted(set(cells[column].dropna()) - {claim.arm}) if pooled \
        else [claim.baseline]
    result.arm_text = f"{claim.axis}={claim.arm}"
    result.baseline_text = (f"the mean of {', '.join(f'{claim.axis}={b}' for b in base_arms)}"
                            if pooled else f"{claim.axis}={claim.baseline}")
    runs = {name: sel[sel[column] == name].set_index("seed") for name in [claim.arm, *base_arms]}
    absent = [_why_absent(cells, column, name, result.held)
              for name, r in runs.items() if r.empty]
    if absent or not base_arms:
        result.missing = "; ".join(absent) or f"no arm of '{claim.axis}' besides {claim.arm}"
        return result
    seeds = sorted(set.intersection(*(set(r.index) for r in runs.values())))
    for name, r in runs.items():
        alone = sorted(set(r.index) - set(seeds))
        if alone:
            result.notes.append(f"seed(s) {', '.join(map(str, alone))} of {claim.axis}={name} "
                                "not paired (missing in another arm)")
    if not seeds:
        result.missing = "no seed finished in every compared arm"
        return result
    result.seeds = [int(s) for s in seeds]
    paired = {name: r.loc[seeds] for name, r in runs.items()}
    if result.kind == "ratio":
        _ratio(result, paired[claim.arm], paired[claim.baseline], confidence)
    else:
        _delta(result, paired, base_arms, confidence)
    if result.interval.n == 0:
        result.missing = "the paired runs lack the metric"
    return result


def _delta(result: ClaimResult, paired: dict[str, pd.DataFrame], base_arms: list[str],
           confidence: float) -> None:
    """arm − baseline per seed (or − the mean of the baseline arms), on one split."""
    claim = result.claim
    result.split = split_of(pd.concat(paired.values()))
    split = result.split

    def measure(runs: pd.DataFrame, top5: bool = False) -> pd.Series:
        error = errors(runs, split, top5)
        return error - col(runs, "final_train_error") * PCT if claim.metric == "gap" else error

    arm = measure(paired[claim.arm])
    base = pd.concat([measure(paired[b]) for b in base_arms], axis=1).mean(axis=1)
    result.interval = t_interval(arm - base, confidence)
    if claim.paper_delta_top5 is not None:
        top5 = measure(paired[claim.arm], True) - pd.concat(
            [measure(paired[b], True) for b in base_arms], axis=1).mean(axis=1)
        result.top5 = t_interval(top5, confidence)
    result.verdict = verdict(result.interval, claim.direction)
    if len(base_arms) > 1:  # each shallower arm on its own, for the reader
        for b in base_arms:
            iv = t_interval(arm - measure(paired[b]), confidence)
            where = f" [{_pp(iv.low)}, {_pp(iv.high)}]" if iv.has_interval else ""
            result.notes.append(f"{claim.axis}={claim.arm} − {claim.axis}={b}: "
                                f"{_pp(iv.estimate)} pp{where}")
    everything = pd.concat(paired.values())
    if split == "val" and "test_error" in everything and everything["test_error"].notna().any():
        lacking = int(everything["test_error"].isna().sum())
        result.notes.append(f"validation errors compared: {lacking} of {len(everything)} "
                            "runs in this comparison lack a test error")


def _pp(value: float) -> str:
    return f"{value:+.2f}".replace("-", "\u2212")  # a real minus, as the tables print it


def _number(value: object) -> float:
    number = pd.to_numeric(value, errors="coerce")
    return float(number) if number is not None and pd.notna(number) else math.nan


def _why_absent(cells: pd.DataFrame, column: str, arm: str, held: dict[str, str]) -> str:
    """"arm norm=none was never run", or "no finished run of norm=none (2 failed)"."""
    label = f"{column[len('axis.'):]}={arm}"
    mask = cells[column] == arm
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
    """Epochs to the training-error target (``stats.with_crossings``), baseline ÷ arm.

    Censored runs: one that never reached the target would have needed more than the
    epochs it ran; one already below it after its first epoch needed at most that. Per
    pair, arm-first or baseline-never make the ratio a lower bound, arm-never or
    baseline-first an upper bound; a pair that is both carries no information and is
    dropped. A verdict in the bound's favour still holds; one against it is inconclusive.
    """
    claim = result.claim
    result.split = "train"
    target = col(a, "params.train.target_train_error").dropna()
    if not target.empty:
        result.target_pct = float(target.iloc[0]) * PCT
    t = f"{result.target_pct:g}%"
    ea, eb = (col(r, "crossing_epoch") if "crossing_epoch" in r else col(r, "epochs_to_target")
              for r in (a, b))
    fa, fb = ((r["crossing_first"].astype(bool) if "crossing_first" in r
               else col(r, "epochs_to_target") == 1) for r in (a, b))
    arm_never, base_never = ea.isna(), eb.isna()
    lower, upper = fa | base_never, arm_never | fb
    useless = lower & upper
    if useless.any():
        result.notes.append(f"{int(useless.sum())} seed pair(s) where both arms are censored "
                            f"(neither reached {t} training error, or both were below it "
                            "after their first epoch): dropped")
    for name, never, first, n in ((claim.baseline, base_never, fb, len(eb)),
                                  (claim.arm, arm_never, fa, len(ea))):
        if (never & ~useless).any():
            extra = "; its epochs count as at least those it ran" if name == claim.baseline \
                else ""
            result.notes.append(f"{claim.axis}={name} never reached {t} training error in "
                                f"{int((never & ~useless).sum())} of {n} seed(s){extra}")
        if (first & ~useless).any():
            result.notes.append(f"{claim.axis}={name} was at or below {t} after its first "
                                f"epoch in {int((first & ~useless).sum())} of {n} seed(s): "
                                "counted as 1 epoch, an upper bound (nothing is measured "
                                "before epoch 1)")
    keep = ~useless
    num = eb.where(~base_never, col(b, "epochs_completed"))[keep]
    den = ea.where(~arm_never, col(a, "epochs_completed"))[keep]
    low_b, up_b = bool((lower & keep).any()), bool((upper & keep).any())
    result.bound = "lower" if low_b and not up_b else "upper" if up_b and not low_b else None
    result.interval = ratio_interval(num.to_numpy(), den.to_numpy(), confidence)
    interpolated = pd.concat([a, b]).get("crossing_interpolated")
    if interpolated is None or not interpolated.all():
        result.notes.append("epochs counted in whole epochs (no per-epoch training error "
                            "logged): a resolution of one epoch")
    if result.interval.zero_width:
        result.notes.append("every seed gives the same ratio, so the interval has no width; "
                            "it reflects the resolution of the count, not certainty")
    v = verdict(result.interval, claim.direction, null=1.0)
    favours_higher = v == "reproduced" if claim.direction == "higher" else v == "contradicted"
    against_bound = (low_b and not favours_higher) or (up_b and favours_higher)
    if v in ("reproduced", "contradicted") and against_bound:
        # The bound pulls the estimate toward this very verdict, so it cannot stand.
        v = "inconclusive (censored)"
    result.verdict = v


# --- ensembles (Section 6, Table 2) ---------------------------------------------------------


def ensemble_result(claim: Claim, ensemble: pd.Series, cells: pd.DataFrame,
                    experiment: str | None = None, confidence: float = CONFIDENCE
                    ) -> ClaimResult:
    """An ``ablate.kind=ensemble`` run against its members: ensemble − single, per member.

    The single errors are the members' own final errors on the ensemble's split; the
    interval is over the k single models (there is one ensemble), so it says how the
    gain depends on which single model it is compared with, not how it varies between
    ensembles.
    """
    result = not_measured(claim, "", experiment)
    result.missing = None
    label = str(ensemble["arm"])
    result.held = dict(part.split("=", 1) for part in label.split(",") if "=" in part)
    members = [m for m in str(ensemble.get("members") or "").split(",") if m]
    k = len(members)
    result.arm_text = f"the average of {k} seeds' softmax outputs ({label})"
    result.baseline_text = "the single models"
    result.over = "single models"
    split = "test" if ensemble.get("split") == "test" else "val"
    result.split = split
    found = cells.drop_duplicates("run_id").set_index("run_id").reindex(members)
    lost = [m for m, ok in zip(members, found["status"].notna(), strict=True) if not ok]
    if k < 2 or lost:
        result.missing = (f"ensemble run {ensemble['run_id']}: " + (
            f"member run(s) {', '.join(lost)} not in the store" if lost else
            f"{k} member(s); an ensemble needs two or more"))
        return result
    result.seeds = sorted(int(s) for s in found["seed"].dropna())
    top1, top5 = (_number(ensemble.get(k)) for k in ("ensemble_error", "ensemble_error_top5"))
    result.interval = t_interval(top1 * PCT - errors(found, split), confidence)
    if claim.paper_delta_top5 is not None and math.isfinite(top5):
        result.top5 = t_interval(top5 * PCT - errors(found, split, True), confidence)
    if result.interval.n == 0:
        result.missing = f"the members lack a {split} error"
        return result
    result.verdict = verdict(result.interval, claim.direction)
    result.notes.append(f"{k} models averaged"
                        + ("" if k == PAPER_ENSEMBLE_SIZE else
                           f" (the paper averaged {PAPER_ENSEMBLE_SIZE})")
                        + f"; ensemble run `{ensemble['run_id']}`; the interval is over the "
                          "single models, as there is one ensemble")
    return result


def evaluate_ensemble(claim: Claim, ensembles: pd.DataFrame, cells: pd.DataFrame,
                      reference: dict[str, str], experiment: str | None = None) -> ClaimResult:
    """The claim row: the ensemble of the reference arm (every axis at its reference)."""
    if ensembles.empty:
        return not_measured(claim, "no ensemble run in this grid", experiment)
    match = pd.Series(True, index=ensembles.index)
    for axis, arm in reference.items():
        if f"axis.{axis}" in ensembles:
            match &= ensembles[f"axis.{axis}"] == arm
    if not match.any():
        have = ", ".join(ensembles["arm"].astype(str))
        ref = ", ".join(f"{a}={r}" for a, r in reference.items())
        return not_measured(claim, f"no ensemble of the reference arm {ref} (ensembles of: "
                                   f"{have})", experiment)
    return ensemble_result(claim, ensembles[match].iloc[-1], cells, experiment)
