"""The per-ablation document: reports/NAME.md for one grid of one experiment."""

from __future__ import annotations

import math
import shlex
from pathlib import Path

import pandas as pd

from alexnet.report.claims_md import (
    claim_notes,
    claim_sentence,
    delta_table,
    held_text,
    split_sentence,
)
from alexnet.report.compare import ClaimResult
from alexnet.report.grids import Selection
from alexnet.report.markdown import (
    AGREES,
    CROSSING,
    NONE,
    PAPER_SCALE,
    arm_rows,
    compute_time,
    dataset_text,
    display_uri,
    image,
    interval_text,
    left_out,
    mean_sd,
    model_text,
    other_runs,
    scale_text,
    signed,
    table,
    values,
)
from alexnet.report.stats import SPLIT_NAMES, errors


def epochs_text(df: pd.DataFrame, target_pct: float | None = None) -> str:
    text = ", ".join(values(df, "params.train.epochs")) or "?"
    if "True" in values(df, "params.train.stop_at_target"):
        text += f", stopping once training error reaches {target_pct or 25:g}%"
    if "epochs_completed" in df and df["epochs_completed"].notna().any():
        done = df["epochs_completed"].dropna()
        text += f" (completed: {int(done.min())}–{int(done.max())})" if done.min() != done.max() \
            else f" (completed: {int(done.min())})"
    return text


def _seeds(used: pd.DataFrame, cells: pd.DataFrame) -> str:
    """The grid's seeds; "also started" names only seeds of this grid with no finished run."""
    done = sorted({int(s) for s in used["seed"].dropna()}) if not used.empty else []
    others = sorted({int(s) for s in cells["seed"].dropna()} - set(done))
    text = ", ".join(map(str, done)) or NONE
    if others:
        text += f" (also started, none finished: {', '.join(map(str, others))})"
    return text


def rerun_command(name: str, shown: pd.DataFrame, parents: pd.DataFrame) -> str:
    """The command the grid's latest run ran, with machine paths shortened to
    path/to/NAME; the plain ``ablate run NAME`` where the grid did not record one."""
    commands = parents.sort_values("start_time")["command"].dropna() \
        if "command" in parents and not parents.empty else pd.Series(dtype=str)
    if commands.empty:
        quick = " --quick" if "synthetic" in values(shown, "params.data.source") else ""
        return f"ablate run {name}{quick}"
    words = shlex.split(commands.iloc[-1])
    return shlex.join(f"path/to/{Path(w).name}" if Path(w).is_absolute() else w for w in words)


def setup_rows(name: str, title: str | None, uri: str, exp_id: str, sel: Selection,
               target_pct: float) -> pd.DataFrame:
    """The "what was run" table: enough to rerun it, all read from the grid's runs."""
    cells, used, grid = sel.cells, sel.used, sel.grid
    shown = used if not used.empty else cells
    statuses = cells["status"].value_counts()
    counts = ", ".join(f"{n} {s.lower()}" for s, n in statuses.items())
    commits = values(cells, "git_commit")
    seconds = pd.to_numeric(cells.get("train_seconds"), errors="coerce").sum() \
        if "train_seconds" in cells else math.nan
    rerun = f"`{rerun_command(name, shown, grid.parents)}`"
    if commits:
        rerun = f"`git checkout {commits[0].removesuffix('-dirty')}`, then {rerun}"
    how = "named with --grid" if sel.named else (
        "the most recent complete grid" if grid.complete else
        "the most recent grid; none is complete")
    rows = [
        ("ablation", f"`{name}`" + (f" — {title}" if title else "")),
        ("dataset", dataset_text(shown)),
        ("dataset fingerprint", ", ".join(f"`{v}`" for v in values(cells, "dataset_fingerprint"))
         or NONE),
        ("model", model_text(shown)),
        ("epochs", epochs_text(shown, target_pct)),
        ("seeds", _seeds(used, cells)),
        ("tuned", "yes: lr and weight decay chosen per arm by `ablate sweep`" if grid.tuned
         else "no"),
        ("device", ", ".join(values(cells, "device")) or NONE),
        ("total compute time", compute_time(seconds) + " (sum of this grid's training time)"),
        ("MLflow experiment", f"`{name}` (id {exp_id}) at `{display_uri(uri)}`"),
        ("grid", f"key `{grid.key}` ({how}; {grid.done} of {grid.planned} cells finished)"),
        ("grid runs", ", ".join(f"`{r}`" for r in grid.parents["run_id"]) or NONE),
        ("cell runs", f"{len(cells)} ({counts}); run ids below"),
        ("git commit", ", ".join(f"`{c}`" for c in commits) or NONE),
        ("reproduce", f"{rerun}; every resolved config value is a param of each run "
                      "(`ablate ui` to browse)"),
    ]
    return pd.DataFrame(rows, columns=["", "value"])


def run_list(cells: pd.DataFrame, used: pd.DataFrame) -> str:
    """Every cell run of the grid, collapsed: which one each number comes from."""
    ids = set(used["run_id"])
    df = cells.sort_values(["arm", "seed", "start_time"])
    rows = pd.DataFrame({
        "arm": df["arm"], "seed": df["seed"].astype(str), "status": df["status"],
        "tuned": df["tuned"].map({True: "yes", False: ""}),
        "in the tables": df["run_id"].map(lambda r: "yes" if r in ids else ""),
        "run id": df["run_id"].map(lambda r: f"`{r}`")})
    return ("<details><summary>All cell runs of this grid</summary>\n\n" + table(rows)
            + "\n\n</details>")


def ensemble_lines(ensembles: pd.DataFrame, rows: list[ClaimResult],
                   cells: pd.DataFrame) -> list[str]:
    """Section 6, Table 2: each arm's averaged softmax against its single models.

    ``rows`` are ``compare.ensemble_result`` of each row of ``ensembles``, in order.
    """
    if not rows:
        return []
    shown = []
    by_id = cells.drop_duplicates("run_id").set_index("run_id")
    for (_, run), r in zip(ensembles.iterrows(), rows, strict=True):
        members = by_id.reindex([m for m in str(run["members"] or "").split(",") if m])
        single = errors(members, r.split)
        top1 = pd.to_numeric(run.get("ensemble_error"), errors="coerce") * 100
        shown.append({
            "arm": run["arm"],
            "models": len(members),
            "seeds": ", ".join(str(run.get("seeds") or NONE).split(",")),
            "split": SPLIT_NAMES[r.split],
            "single models, top-1 error (%)": mean_sd(single.mean(), single.std()),
            "ensemble, top-1 error (%)": mean_sd(top1, math.nan),
            "ensemble − single, top-1 (pp)": NONE if r.missing else
            f"{signed(r.interval.estimate)} {interval_text(r)}",
            "ensemble − single, top-5 (pp)": f"{signed(r.top5.estimate)} "
                                             f"{interval_text(r.top5)}" if r.top5 else NONE,
            "verdict": r.missing or r.verdict})
    return ["## Ensembles (Section 6, Table 2)", "",
            "The softmax outputs of an arm's seeds averaged on the held-out split, against the "
            "same seeds' single models: ensemble − single per member, with a 95% t-interval "
            "over the single models (there is one ensemble per arm). The paper averaged five "
            "CNNs: −2.6 pp top-1, −1.8 pp top-5.", "", table(pd.DataFrame(shown)), ""]


def ablation_report(*, name: str, title: str | None, uri: str, exp_id: str, sel: Selection,
                    arms: pd.DataFrame, problems: pd.DataFrame, results: list[ClaimResult],
                    ensembles: list[ClaimResult], figures: dict[str, str],
                    reference: dict[str, str], target_pct: float,
                    models_at_work: list[str] | None = None) -> str:
    cells, used = sel.cells, sel.used
    out = [f"# Ablation `{name}`" + (f": {title}" if title else ""), ""]
    if results:
        out += [f"- {claim_sentence(r)}" for r in results] + [""]
    else:
        out += ["This ablation tests none of the paper's claims: per-arm results only.", ""]
    scale = scale_text(used if not used.empty else cells, target_pct)
    out += [f"> **Scale.** These runs: {scale}. {PAPER_SCALE}", ""]
    out += ["## What was run", "", table(setup_rows(name, title, uri, exp_id, sel,
                                                     target_pct)), ""]
    out += other_runs(name, sel.others)
    out += ["## Results per arm", "",
            "Mean ± standard deviation over seeds of the final epoch's numbers (one seed: "
            "no standard deviation). Errors in %; gap = the verdicts' split (test where every "
            "run has one, else validation) − training error, in percentage points. Learning "
            "rate and weight decay as each arm's runs used them; \"tuned\" marks values chosen "
            "by `ablate sweep`.", "", table(arm_rows(arms, target_pct)), ""]
    if any(r.kind == "ratio" for r in results):
        out += [CROSSING, ""]
    if len(reference) > 1:
        out += ["Reference arms (claims compare one axis with the others held here): "
                + held_text(reference) + ".", ""]
    out += left_out(problems, sel.notes)
    if results:
        out += ["## Error deltas against the paper", "",
                "Measured = arm − baseline, paired by seed (seeds present in every compared "
                "arm only; n = paired seeds, or single models for an ensemble), with a 95% "
                "t-interval; for the speed claim the ratio of epochs, baseline ÷ arm, with a "
                "t-interval on per-seed log ratios. Verdict: reproduced = the paper's sign "
                "and an interval excluding no effect; contradicted = the opposite sign, "
                "excluding it; inconclusive otherwise. " + " ".join(
                    filter(None, [AGREES, split_sentence(results)])), "",
                delta_table(results), "", *claim_notes(results), ""]
    out += ensemble_lines(sel.ensembles, ensembles, sel.all_cells)
    out += models_at_work or []  # report.models_at_work: held-out predictions, over-fitting
    out += ["## Figures", ""]
    for path, alt in figures.items():
        out += [image(path, alt), ""]
    out += ["## Runs", "", run_list(cells, used), ""]
    return "\n".join(out)
