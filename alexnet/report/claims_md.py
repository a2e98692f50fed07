"""The text of the claims: one-line answers, the delta table and its notes.

Shared by the per-ablation document and the paper summary; numbers come from
``compare.ClaimResult`` and are formatted by ``markdown``'s helpers.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from alexnet.report.compare import ClaimResult
from alexnet.report.markdown import (
    NONE,
    REPRO,
    interval_text,
    measured_text,
    paper_text,
    ratio,
    reproduction_text,
    signed,
    table,
)
from alexnet.report.stats import SPLIT_NAMES


def measure_name(r: ClaimResult) -> str:
    c = r.claim
    if r.kind == "ratio":
        return f"epochs to {r.target_pct:g}% train error, {c.baseline} ÷ {c.arm}"
    split = "val" if r.split == "val" else r.split
    if c.metric == "gap":
        return f"{split} − train error gap (pp)"
    return f"top-1 {split} error (pp)"


def verdict_cell(r: ClaimResult) -> str:
    if r.missing:
        return f"not measured: {r.missing}"
    return r.verdict


def agreement_cell(r: ClaimResult) -> str:
    if r.missing or not r.interval.has_interval:
        return NONE
    found = r.agreement()
    return "; ".join(f"{who} ({how})" for who, how in found.items()) if found else "neither"


def claim_sentence(r: ClaimResult) -> str:
    """The one-line answer, e.g. "Claim relu_speed: reproduced at this scale (...)"."""
    c = r.claim
    head = f"**Claim {c.id}** (§{c.section})"
    if r.missing:
        return f"{head}: not measured — {r.missing}."
    iv = r.interval
    over = f"one of the {r.over}, so no interval" if iv.n == 1 else f"{iv.n} {r.over}"
    held = f", other axes at {held_text(r.held)}" if r.held and r.over == "paired seeds" else ""
    where = f" {interval_text(r)}" if iv.has_interval else ""
    if r.kind == "ratio":
        bound = {"lower": "at least ", "upper": "at most "}.get(r.bound or "", "")
        if iv.estimate >= 1:
            speed = f"{bound}{ratio(iv.estimate)}{where} faster"
        else:
            speed = f"{bound}{ratio(iv.estimate)}{where} as fast, i.e. slower,"
        what = (f"{r.arm_text} reached {r.target_pct:g}% training error {speed} than "
                f"{r.baseline_text}, {over}{held}; paper {paper_text(c)}")
    else:
        split = SPLIT_NAMES[r.split]
        name = f"{split} − training error gap" if c.metric == "gap" else f"top-1 {split} error"
        what = (f"{name}, {r.arm_text} − {r.baseline_text}: {signed(iv.estimate)} pp{where}, "
                f"{over}{held}; paper {paper_text(c)}")
        if r.top5 is not None and r.top5.n:
            what += (f"; top-5 {signed(r.top5.estimate)} pp"
                     f"{' ' + interval_text(r.top5) if r.top5.has_interval else ''}, paper "
                     f"{signed(c.paper_delta_top5, 1)} pp")
        if r.reproduction_value is not None:
            what += f"; {REPRO} {signed(r.reproduction_value, 1)} pp"
    return f"{head}: {r.verdict} at this scale ({what}). {agreement_sentence(r)}".rstrip()


def agreement_sentence(r: ClaimResult) -> str:
    """Where the measurement agrees with the paper, with the reproduction, or neither."""
    if not r.interval.has_interval:
        return ""
    c = r.claim
    found = r.agreement()
    parts = []
    if c.paper_delta is None:
        parts.append("The paper states the effect in words only; "
                     + ("the measured direction agrees." if "paper" in found else
                        "this measurement does not confirm its direction."))
    figures = [("paper", f"The paper's {paper_text(c)}", c.paper_delta)]
    if r.reproduction_value is not None:
        figures.append(("Mishkin et al.", f"{REPRO}'s {signed(r.reproduction_value, 1)} pp",
                        r.reproduction_value))
    for who, name, value in figures:
        if value is not None:
            parts.append(_figure_against_interval(r, found.get(who), name, value))
    return " ".join(parts)


def _figure_against_interval(r: ClaimResult, how: str | None, name: str, value: float) -> str:
    """Inside; outside on the same side of no effect; outside with an interval that holds
    no effect (then say which way the estimate points); or on the other side."""
    if how == "size":
        also = ", which also holds no effect" if r.interval.contains(r.null) else ""
        return f"{name} lies inside the interval{also}."
    if how == "direction":
        return (f"{name} lies outside the interval, on the same side of no effect (same "
                "direction, different size).")
    figure_side = np.sign(value - r.null)
    if r.side() == 0:
        same = np.sign(r.interval.estimate - r.null) == figure_side
        return (f"{name} lies outside the interval; the estimate points "
                f"{'the same way' if same else 'the other way'}, but the interval also "
                "holds no effect, so the direction is not settled.")
    return f"{name} disagrees: the interval lies on the other side of no effect."


def held_text(held: dict[str, str]) -> str:
    return ", ".join(f"{a}={r}" for a, r in held.items())


def split_sentence(results: Iterable[ClaimResult]) -> str:
    """Which split the verdicts use, in one sentence."""
    splits = {r.split for r in results if not r.missing and r.kind == "delta"}
    if not splits:
        return ""
    if splits == {"test"}:
        return ("Errors compared: the held-out test split, scored once at the end of each "
                "run (every run in these comparisons has it).")
    if splits == {"val"}:
        return ("Errors compared: the validation split, carved from the training set (not "
                "every run in these comparisons has a held-out test error).")
    return ("Errors compared: the held-out test split where every run of a comparison has "
            "it, else the validation split; each row's \"measured as\" says which.")


def delta_table(results: Iterable[ClaimResult], *, with_ablation: bool = False) -> str:
    rows = []
    for r in results:
        c = r.claim
        row = {"claim": c.id, "paper §": c.section}
        if with_ablation:
            row["ablation"] = f"`{r.experiment}`" if r.experiment else NONE
        held = f" ({held_text(r.held)})" if r.held else ""
        row.update({
            "measured as": measure_name(r),
            "arm vs baseline": f"{c.axis}: {c.arm} vs {c.baseline}{held}",
            "n": len(r.seeds) if not r.missing else 0,
            "paper": paper_text(c),
            REPRO: reproduction_text(r),
            "measured": measured_text(r),
            "95% interval": interval_text(r),
            "verdict": verdict_cell(r),
            "agrees with": agreement_cell(r),
        })
        rows.append(row)
    return table(pd.DataFrame(rows))


def claim_notes(results: Iterable[ClaimResult]) -> list[str]:
    """The paper's words, the reproduction's, and what was left out, per claim."""
    lines = []
    for r in results:
        c = r.claim
        parts = [c.statement, f"paper: {c.paper_text}"]
        if c.reproduction:
            parts.append(f"{REPRO}: {c.reproduction}")
        parts += r.notes
        lines.append(f"- **{c.id}** — " + "; ".join(parts) + ".")
    return lines
