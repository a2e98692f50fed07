"""`ablate report`: an ablation's runs in MLflow → reports/NAME.md with figures in NAME/.

load (MLflow → pandas) → stats (pure) → figures + markdown. Nothing heavy is imported at
module level, so that importing the package costs nothing until a report is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from alexnet.report.load import Runs
    from alexnet.report.stats import ClaimResult

__all__ = ["PAPER", "write_report"]

PAPER = "paper"  # the summary over every ablation in the store, one row per claim


def write_report(name: str, tracking_uri: str | None = None,
                 out_dir: Path = Path("reports")) -> Path:
    """Write ``out_dir/NAME.md`` (figures in ``out_dir/NAME/``) from the runs in MLflow.

    ``name`` is an ablation, whose experiment has the same name, or ``"paper"`` for one
    table over every ablation in the store. Raises StoreError when there are no runs.
    """
    from alexnet import store

    uri = store.tracking_uri(tracking_uri)
    out_dir = Path(out_dir)
    if name == PAPER:
        return _write_paper(uri, out_dir)
    return _write_ablation(name, uri, out_dir)


def _target_pct(df: pd.DataFrame) -> float:
    import pandas as pd

    col = "params.train.target_train_error"
    values = pd.to_numeric(df[col], errors="coerce").dropna() if col in df else []
    return float(values.iloc[0]) * 100 if len(values) else 25.0


def _write_ablation(name: str, uri: str, out_dir: Path) -> Path:
    from alexnet.claims import CLAIMS
    from alexnet.report import figures, load, markdown, stats

    runs = load.load_runs(name, uri)
    cells = runs.cells
    used, notes = stats.pick_runs(cells)
    reference = runs.reference.get(name, {})
    arms = stats.arm_table(used, cells, runs.arm_order.get(name))
    results = [stats.evaluate_claim(CLAIMS[c], used, cells, reference, name)
               for c in runs.claims.get(name, [])]
    target = _target_pct(used if not used.empty else cells)
    order = list(arms["arm"]) if not arms.empty else []

    fig_dir = out_dir / name
    figs: dict[str, str] = {}  # relative path -> alt text, in the order shown
    if not used.empty:
        figures.learning_curves(runs.history, used, fig_dir / "train_error.png",
                                key="train_error", order=order, target_pct=target)
        figs[f"{name}/train_error.png"] = "training error per arm against epoch"
        figures.learning_curves(runs.history, used, fig_dir / "val_error.png",
                                key="val_error", order=order)
        figs[f"{name}/val_error.png"] = "validation error per arm against epoch"
        figures.seed_points(used, fig_dir / "val_error_by_seed.png", order=order)
        figs[f"{name}/val_error_by_seed.png"] = "final validation error per arm and seed"
    if results:
        figures.forest(results, fig_dir / "deltas.png")
        figs[f"{name}/deltas.png"] = "measured against the paper's deltas"

    text = markdown.ablation_report(
        name=name, title=runs.titles.get(name), uri=uri, exp_id=runs.experiments[name],
        cells=cells, used=used, grids=runs.grids, arms=arms,
        problems=stats.problem_runs(cells), results=results, notes=notes, figures=figs,
        reference=reference, target_pct=target)
    return _write(out_dir / f"{name}.md", text)


def _write_paper(uri: str, out_dir: Path) -> Path:
    from alexnet.report import figures, load, markdown, stats

    runs = load.load_store(uri, PAPER)
    used, notes = stats.pick_runs(runs.cells)
    results = paper_results(runs, used)
    figures.forest(results, out_dir / PAPER / "deltas.png")
    text = markdown.paper_report(
        uri=uri, results=results, experiments=markdown.store_rows(runs, used),
        problems=stats.problem_runs(runs.cells), notes=notes,
        figure=f"{PAPER}/deltas.png")
    return _write(out_dir / f"{PAPER}.md", text)


def paper_results(runs: Runs, used: pd.DataFrame) -> list[ClaimResult]:
    """One result per claim of the paper, from the experiment that tests it.

    An experiment tests a claim when its runs are tagged with it (or its ablation file
    lists it); where several do, the shipped ablation for the claim wins, else the one
    with the most finished runs, and the row names the others.
    """
    from alexnet.claims import CLAIMS
    from alexnet.report import stats

    cells = runs.cells
    out = []
    for claim in CLAIMS.values():
        exps = [e for e in runs.experiments if claim.id in runs.claims.get(e, [])]
        if not exps:
            hint = f"; run `ablate run {claim.ablation}`" if claim.ablation else \
                "; no shipped ablation tests it yet"
            out.append(stats.not_measured(claim, f"no ablation in the store tests it{hint}"))
            continue
        exp = claim.ablation if claim.ablation in exps else max(
            exps, key=lambda e: int((used["experiment"] == e).sum()) if not used.empty else 0)
        mine = used[used["experiment"] == exp] if not used.empty else used
        r = stats.evaluate_claim(claim, mine, cells[cells["experiment"] == exp],
                                 runs.reference.get(exp, {}), exp)
        others = [e for e in exps if e != exp]
        if others:
            r.notes.append(f"also tested by {', '.join(others)} (see their reports)")
        out.append(r)
    return out


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    return path
