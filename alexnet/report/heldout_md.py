"""The report's "models at work" section: each ablated arm against its reference on the
held-out images (``heldout``), and the train-against-validation curves of the over-fitting
claims, with their figures (``model_figures``)."""

from __future__ import annotations

import pandas as pd

from alexnet.report.heldout import SPLITS, Comparison
from alexnet.report.markdown import image, signed, table

TOP_CLASSES = 10  # rows of the per-class table


def class_table(c: Comparison) -> pd.DataFrame:
    """The classes whose error moved most, largest |delta| first (mean over seeds)."""
    per = c.per_class()
    per = per.reindex(per["delta"].abs().sort_values(ascending=False).index).head(TOP_CLASSES)
    return pd.DataFrame({
        "class": per["class"],
        f"{c.reference} error (%)": per["reference"].map(lambda v: f"{v:.1f}"),
        f"{c.arm} error (%)": per["arm"].map(lambda v: f"{v:.1f}"),
        "delta (pp)": per["delta"].map(signed)})


def comparison_lines(c: Comparison, figures: dict[str, str]) -> list[str]:
    seeds = ", ".join(map(str, c.seeds))
    split = SPLITS.get(c.split, c.split)
    more = f" (the {TOP_CLASSES} of {len(c.classes)} classes that moved most)" \
        if len(c.classes) > TOP_CLASSES else ""
    out = [f"### {c.arm} against {c.reference}", "",
           f"On the {c.images:,} held-out {split} images, over seed(s) {seeds}: "
           f"{c.error('arm'):.1f}% error for {c.arm} against {c.error('reference'):.1f}% for "
           f"{c.reference} (the reference); the two label {100 * c.disagree:.1f}% of the "
           f"images differently. Per class, error of each arm and {c.arm} − {c.reference}, "
           f"mean over seeds{more}:", "", table(class_table(c)), ""]
    for path, alt in figures.items():
        out += [image(path, alt), ""]
    return out


def section(comparisons: list[tuple[Comparison, dict[str, str]]], notes: list[str],
            overfitting: dict[str, str]) -> list[str]:
    """The whole section; empty when there is nothing to show."""
    if not comparisons and not notes and not overfitting:
        return []
    out = ["## The models at work", "",
           "Each cell's final model was run once more on the held-out split when it finished "
           "(the test split where there is one): these are its predictions, logged in MLflow "
           "with the run (`heldout/predictions.npz`). Confusion rows are % of each true "
           "class, summed over the seeds both arms finished; the gallery shows held-out "
           "images the two arms label differently, among the first few hundred.", ""]
    for c, figs in comparisons:
        out += comparison_lines(c, figs)
    out += [f"- {n}" for n in notes]
    if notes:
        out += [""]
    if overfitting:
        out += ["### Training against validation error", "",
                "The paper calls the network without this regularization \"substantially "
                "overfitting\": here are both arms' training and validation error per epoch, "
                "side by side; the grey band between the lines is the gap.", ""]
        for path, alt in overfitting.items():
            out += [image(path, alt), ""]
    return out
