"""The paper summary: reports/paper.md, one row per claim across experiments."""

from __future__ import annotations

import math

import pandas as pd

from alexnet.report.claims_md import (
    claim_notes,
    claim_sentence,
    delta_table,
    split_sentence,
)
from alexnet.report.compare import ClaimResult
from alexnet.report.grids import Selection
from alexnet.report.markdown import (
    AGREES,
    NONE,
    PAPER_SCALE,
    compute_time,
    dataset_text,
    display_uri,
    image,
    left_out,
    model_text,
    other_runs,
    table,
    values,
)


def paper_report(*, uri: str, results: list[ClaimResult], experiments: pd.DataFrame,
                 selections: dict[str, Selection], problems: pd.DataFrame, notes: list[str],
                 figure: str) -> str:
    out = ["# The paper's claims, measured", "",
           "Every ablation in the store that tests a claim of Krizhevsky et al. (2012), one "
           "row per claim. Per-arm numbers and curves: `ablate report <ablation>`.", ""]
    out += [f"- {claim_sentence(r)}" for r in results] + [""]
    out += [f"> **Scale.** {PAPER_SCALE} The scale of each ablation is in the table below.",
            ""]
    out += ["## Error deltas against the paper", "",
            "Measured = arm − baseline, paired by seed (n = paired seeds, or single models for "
            "an ensemble), with a 95% t-interval (the speed claim: the ratio of epochs, "
            "baseline ÷ arm). Each ablation contributes one grid, at one scale: the one named "
            "with --grid, else its most recent complete one. " + " ".join(
                filter(None, [AGREES, split_sentence(results)])), "",
            delta_table(results, with_ablation=True), "", *claim_notes(results), "",
            image(figure, "measured against the paper's deltas"), ""]
    out += ["## Ablations in the store", "", f"Tracking URI: `{display_uri(uri)}`.", "",
            table(experiments), ""]
    for exp, sel in selections.items():
        out += other_runs(exp, sel.others, heading=f"### `{exp}`:")
    out += left_out(problems, notes, "##", with_experiment=True)
    return "\n".join(out)


def store_rows(selections: dict[str, Selection], claims: dict[str, list[str]]
               ) -> pd.DataFrame:
    """The paper report's list of ablations: the grid each uses, its scale, with what."""
    rows = []
    for exp, sel in selections.items():
        cells, used = sel.cells, sel.used
        shown = used if not used.empty else cells
        seconds = pd.to_numeric(cells["train_seconds"], errors="coerce").sum() \
            if "train_seconds" in cells else math.nan
        counts = cells["status"].value_counts()
        rows.append({
            "ablation": f"`{exp}`",
            "claims": ", ".join(claims.get(exp, [])) or NONE,
            "grid": f"`{sel.grid.key}`" + ("" if sel.grid.complete else " (incomplete)"),
            "tuned": "yes" if sel.grid.tuned else "no",
            "dataset": dataset_text(shown),
            "model": model_text(shown),
            "epochs": ", ".join(values(shown, "params.train.epochs")) or NONE,
            "seeds": ", ".join(str(s) for s in sorted(set(shown["seed"].dropna()))) or NONE,
            "cell runs": ", ".join(f"{n} {s.lower()}" for s, n in counts.items()),
            "other grids": len(sel.others),
            "device": ", ".join(values(cells, "device")) or NONE,
            "compute": compute_time(seconds),
            "git commit": ", ".join(f"`{c[:12]}`" for c in values(cells, "git_commit"))
            or NONE,
        })
    return pd.DataFrame(rows)
