"""`ablate report`: an ablation's runs in MLflow → reports/NAME.md with figures in NAME/.

load (MLflow → pandas) → grids (which runs may be pooled) → stats and compare (pure) →
figures + markdown. Nothing heavy is imported at module level, so that importing the
package costs nothing until a report is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from alexnet.report.compare import ClaimResult
    from alexnet.report.grids import Selection
    from alexnet.report.load import Runs

__all__ = ["PAPER", "write_report"]

PAPER = "paper"  # the summary over every ablation in the store, one row per claim


def write_report(name: str, tracking_uri: str | None = None,
                 out_dir: Path = Path("reports"), grids: Sequence[str] = ()) -> Path:
    """Write ``out_dir/NAME.md`` (figures in ``out_dir/NAME/``) from the runs in MLflow.

    ``name`` is an ablation, whose experiment has the same name, or ``"paper"`` for one
    table over every ablation in the store. Each experiment contributes one grid: the one
    a run id in ``grids`` names (a grid run, ``ablate.kind=grid``), else its most recent
    complete grid, else its most recent one. Raises StoreError when there are no runs or
    a named grid run is not one of them.
    """
    from alexnet import store

    uri = store.tracking_uri(tracking_uri)
    out_dir = Path(out_dir)
    if name == PAPER:
        return _write_paper(uri, out_dir, grids)
    return _write_ablation(name, uri, out_dir, grids)


def select_all(runs: Runs, grids: Sequence[str] = ()) -> dict[str, Selection]:
    """One grid per experiment of ``runs`` (see write_report)."""
    from alexnet.errors import StoreError
    from alexnet.report.grids import named_experiment, select

    named: dict[str, str] = {}
    for run_id in grids:
        exp = named_experiment(runs.grids, run_id)
        if exp not in runs.experiments:
            raise StoreError(f"--grid {run_id} is a grid run of {exp}, not of "
                             f"{', '.join(runs.experiments)}; report {exp} to use it")
        named[exp] = run_id
    return {exp: select(exp, runs.cells, runs.grids, runs.ensembles, named.get(exp))
            for exp in runs.experiments if (runs.cells["experiment"] == exp).any()}


def _target_pct(df: pd.DataFrame) -> float:
    import pandas as pd

    col = "params.train.target_train_error"
    values = pd.to_numeric(df[col], errors="coerce").dropna() if col in df else []
    return float(values.iloc[0]) * 100 if len(values) else 25.0


def claim_results(runs: Runs, exp: str, sel: Selection, claim_ids: Sequence[str]
                  ) -> list[ClaimResult]:
    """Every claim ``exp`` tests, on its chosen grid; the ensemble claim too where the grid
    has ensemble runs."""
    extra = ["ensemble"] if not sel.ensembles.empty else []
    return [claim_result(runs, exp, sel, c) for c in dict.fromkeys([*claim_ids, *extra])]


def claim_result(runs: Runs, exp: str, sel: Selection, claim_id: str) -> ClaimResult:
    from alexnet.claims import CLAIMS
    from alexnet.report import compare

    claim, reference = CLAIMS[claim_id], runs.reference.get(exp, {})
    if claim.axis == "ensemble":  # no axis of its own: the grid's ensemble runs
        return compare.evaluate_ensemble(claim, sel.ensembles, sel.all_cells, reference, exp)
    return compare.evaluate_claim(claim, sel.used, sel.cells, reference, exp)


def _write_ablation(name: str, uri: str, out_dir: Path, grids: Sequence[str]) -> Path:
    from alexnet.claims import CLAIMS
    from alexnet.report import ablation_md, compare, figures, load, stats

    runs = load.load_runs(name, uri)
    sel = select_all(runs, grids)[name]
    history = load.metric_histories(uri, sel.used["run_id"], load.HISTORY_KEYS)
    sel.used = stats.with_crossings(sel.used, history)
    used = sel.used
    reference = runs.reference.get(name, {})
    arms = stats.arm_table(used, sel.cells, runs.arm_order.get(name))
    results = claim_results(runs, name, sel, runs.claims.get(name, []))
    ensembles = [compare.ensemble_result(CLAIMS["ensemble"], row, sel.all_cells, name)
                 for _, row in sel.ensembles.iterrows()]
    target = _target_pct(used if not used.empty else sel.cells)
    order = list(arms["arm"]) if not arms.empty else []

    fig_dir = out_dir / name
    figs: dict[str, str] = {}  # relative path -> alt text, in the order shown
    speed = [r for r in results if r.kind == "ratio" and not r.missing]
    if speed:
        r = speed[0]
        c = r.claim
        figures.save(figures.figure1(history, _compared(used, r), axis=c.axis, arm=c.arm,
                                     baseline=c.baseline, target_pct=r.target_pct),
                     fig_dir / "figure1.png")
        figs[f"{name}/figure1.png"] = (f"training error against epochs, {c.arm} solid and "
                                       f"{c.baseline} dashed, as in the paper's Figure 1")
    if not used.empty:
        if not speed:
            figures.save(figures.learning_curves(history, used, key="train_error", order=order,
                                                 target_pct=target),
                         fig_dir / "train_error.png")
            figs[f"{name}/train_error.png"] = "training error per arm against epoch"
        figures.save(figures.learning_curves(history, used, key="val_error", order=order),
                     fig_dir / "val_error.png")
        figs[f"{name}/val_error.png"] = "validation error per arm against epoch"
        figures.save(figures.seed_points(used, order=order), fig_dir / "error_by_seed.png")
        figs[f"{name}/error_by_seed.png"] = "final error per arm and seed"
    if results:
        figures.save(figures.forest(results), fig_dir / "deltas.png")
        figs[f"{name}/deltas.png"] = "measured against the paper's deltas"

    at_work = models_at_work(uri, name, out_dir, used, reference, order, results, history)
    text = ablation_md.ablation_report(
        name=name, title=runs.titles.get(name), uri=uri, exp_id=runs.experiments[name],
        sel=sel, arms=arms, problems=stats.problem_runs(sel.cells), results=results,
        ensembles=ensembles, figures=figs, reference=reference, target_pct=target,
        models_at_work=at_work)
    return _write(out_dir / f"{name}.md", text)


def models_at_work(uri: str, name: str, out_dir: Path, used: pd.DataFrame,
                   reference: dict[str, str], order: list[str], results: list[ClaimResult],
                   history: pd.DataFrame) -> list[str]:
    """The "models at work" section and its figures: each ablated arm against its reference
    on the held-out images (from the runs' logged predictions), and, for the over-fitting
    claims (Sections 4.1, 4.2), both arms' training and validation curves side by side."""
    from alexnet.report import figures, heldout, heldout_md, model_figures

    if used.empty:
        return []
    found, notes = heldout.comparisons(used, reference, heldout.load(uri, used), order)
    shown = []
    for c in found:
        stem = f"{name}/{c.arm}_vs_{c.reference}".replace("=", "-").replace(",", "_")
        figs = {f"{stem}_confusion.png": (model_figures.confusion_pair, "confusion matrices of "
                                          f"{c.reference} and {c.arm} on the held-out split"),
                f"{stem}_class_delta.png": (model_figures.class_delta, "per-class error of "
                                            f"{c.arm} minus {c.reference}"),
                f"{stem}_disagreements.png": (model_figures.gallery, "held-out images on "
                                              f"which {c.reference} and {c.arm} disagree")}
        for path, (draw, _) in figs.items():
            figures.save(draw(c), out_dir / path)
        shown.append((c, {path: alt for path, (_, alt) in figs.items()}))
    curves = {}
    for r in results:
        if r.claim.metric == "gap" and f"axis.{r.claim.axis}" in used:
            path = f"{name}/{r.claim.axis}_train_vs_val.png"
            figures.save(model_figures.overfitting(history, used, axis=r.claim.axis,
                                                   arms=[r.claim.arm, r.claim.baseline]),
                         out_dir / path)
            curves[path] = (f"training and validation error of {r.claim.axis}={r.claim.arm} "
                            f"and {r.claim.axis}={r.claim.baseline}, side by side")
    return heldout_md.section(shown, notes, curves)


def _compared(used: pd.DataFrame, r: ClaimResult) -> pd.DataFrame:
    """The runs a result compares: its seeds, other axes at their reference arm."""
    mask = used["seed"].isin(r.seeds)
    for axis, arm in r.held.items():
        mask &= used[f"axis.{axis}"] == arm
    return used[mask]


def _write_paper(uri: str, out_dir: Path, grids: Sequence[str]) -> Path:
    import pandas as pd

    from alexnet.report import figures, load, paper_md, stats

    runs = load.load_store(uri, PAPER)
    selections = select_all(runs, grids)
    # Only the speed claim needs per-epoch curves (for its interpolated crossings).
    speed = [e for e, s in selections.items() if "relu_speed" in runs.claims.get(e, [])]
    ids = pd.concat([selections[e].used["run_id"] for e in speed]) if speed else []
    history = load.metric_histories(uri, ids, ("train_error",))
    for sel in selections.values():
        sel.used = stats.with_crossings(sel.used, history)
    results = paper_results(runs, selections)
    figures.save(figures.forest(results), out_dir / PAPER / "deltas.png")
    problems = pd.concat([stats.problem_runs(s.cells) for s in selections.values()])
    notes = [f"{e}: {n}" for e, s in selections.items() for n in s.notes]
    text = paper_md.paper_report(
        uri=uri, results=results, experiments=paper_md.store_rows(selections, runs.claims),
        selections=selections, problems=problems, notes=notes, figure=f"{PAPER}/deltas.png")
    return _write(out_dir / f"{PAPER}.md", text)


def paper_results(runs: Runs, selections: dict[str, Selection]) -> list[ClaimResult]:
    """One result per claim of the paper, from the experiment that tests it.

    An experiment tests a claim when its runs are tagged with it (or its ablation file
    lists it), or, for the ensemble claim, when its grid has ensemble runs; where several
    do, the shipped ablation for the claim wins, else the one with the most finished runs
    in its grid, and the row names the others.
    """
    from alexnet.claims import CLAIMS
    from alexnet.report import compare

    out = []
    for claim in CLAIMS.values():
        exps = [e for e, s in selections.items() if claim.id in runs.claims.get(e, [])
                or (claim.axis == "ensemble" and not s.ensembles.empty)]
        if not exps:
            hint = f"; run `ablate run {claim.ablation}`" if claim.ablation else \
                "; no shipped ablation tests it yet"
            out.append(compare.not_measured(claim, f"no ablation in the store tests it{hint}"))
            continue
        exp = claim.ablation if claim.ablation in exps else max(
            exps, key=lambda e: len(selections[e].used))
        r = claim_result(runs, exp, selections[exp], claim.id)
        others = [e for e in exps if e != exp]
        if others:
            r.notes.append(f"also tested by {', '.join(others)} (see their reports)")
        out.append(r)
    return out


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    return path
