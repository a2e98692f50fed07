"""What the store holds for an ablation, as tables: `ablate show` (per scale, each cell's
state), the summary after `ablate run` (per-arm mean ± sd first), and `ablate clean`.

A *scale* is one grid key (``Cell.grid_key``): every cell of one run of one command line
(quick or real data, its epochs, a tuned grid...). Runs of different scales are never
mixed in one table, as the report never pools them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from statistics import fmean, stdev
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from alexnet import store, tracking, ui
from alexnet.ablation import Ablation, Cell
from alexnet.cli_common import TrackingUri, console, err_console, user_errors
from alexnet.errors import ConfigError
from alexnet.grid import plan
from alexnet.runner import Found, cell_state

STATE_COLORS = {"finished": "green", "reusable": "green", "reused": "green", "skipped": "green",
                "failed": "red", "diverged": "red", "running": "yellow",
                "interrupted": "yellow"}


def _table(title: str | None, *headers: str) -> Table:
    table = Table(*headers, title=title, title_justify="left", box=box.SIMPLE_HEAD,
                  title_style="bold", pad_edge=False)
    return table


def arm_header(ablation: Ablation) -> str:
    return ",".join(ablation.axes) or "arm"


def arm_values(arms: dict[str, str]) -> str:
    return ",".join(arms.values())


def pct(metrics: dict[str, float], key: str) -> str:
    return f"{100 * metrics[key]:.1f}" if key in metrics else ""


# --- show --------------------------------------------------------------------------------


@dataclass
class Row:
    arms: dict[str, str]
    seed: int
    key: str
    state: str
    run: Any | None


def client_if_any(uri: str) -> Any | None:
    """A client on the store, or None when a local store does not exist yet (nothing read
    creates it)."""
    db = store.sqlite_path(uri)
    return None if db is not None and not db.exists() else store.client(uri)


def show_cells(uri: str, cells: list[Cell], title: str | None = None) -> None:
    """The cells given (by the command's flags) and their states: the plan of that grid."""
    c = client_if_any(uri)
    rows = [Row(p.cell.arms, p.cell.seed, p.cell.key, p.state,
                c.get_run(p.run_id) if c is not None and p.run_id else None)
            for p in plan(c, uri, cells)]
    for ablation in dict.fromkeys(cell.ablation for cell in cells):
        mine = [cell for cell in cells if cell.ablation == ablation]
        keys = {cell.key for cell in mine}
        print_rows(title or ui.grid_run_name(mine), ",".join(mine[0].arms),
                   [r for r in rows if r.key in keys])


def show_store(ablation: Ablation, uri: str) -> None:
    """Every scale of each member ablation that has runs in the store, newest first, with
    each cell's state; the default grid's plan when there are none yet."""
    c = client_if_any(uri)
    shown = False
    for member in ablation.members():
        exp = c.get_experiment_by_name(member.name) if c is not None else None
        runs = tracking.cell_runs(c, [exp.experiment_id]) if exp is not None else []
        scales: dict[str, list[Any]] = {}
        for run in sorted(runs, key=lambda r: -r.info.start_time):
            scales.setdefault(run.data.tags.get("ablate.grid_key", ""), []).append(run)
        known = {cells[0].grid_key: cells for quick in (False, True)
                 if (cells := member.cells(quick=quick))}
        names = grid_names(c, exp.experiment_id) if exp is not None else {}
        for grid_key, scale_runs in scales.items():
            if grid_key in known:  # a grid these flags-free definitions give: its full plan
                cells = known[grid_key]
                show_cells(uri, cells, f"{ui.grid_run_name(cells)}  [dim](grid {grid_key})[/]")
            else:
                name = names.get(grid_key, member.name)
                print_rows(f"{name}  [dim](grid {grid_key})[/]", arm_header(member),
                           store_rows(scale_runs))
            shown = True
    if not shown:
        console.print(f"nothing of {ablation.name} in the store yet ({store.redact(uri)}); "
                      f"`ablate run {ablation.name} --quick` runs its quick grid", highlight=False)
        show_cells(uri, ablation.cells())


def grid_names(c: Any, experiment_id: str) -> dict[str, str]:
    """grid key -> the name of its newest grid run (``ui.grid_run_name``)."""
    runs = c.search_runs([experiment_id], "tags.`ablate.kind` = 'grid'", max_results=50000,
                         order_by=["attributes.start_time ASC"])
    return {r.data.tags.get("ablate.grid_key", ""): r.data.tags.get("mlflow.runName", "")
            for r in runs}


def store_rows(runs: list[Any]) -> list[Row]:
    """One row per cell among ``runs`` (of one experiment), in arm and seed order."""
    by_key: dict[str, list[Any]] = {}
    for run in runs:
        by_key.setdefault(run.data.tags.get("cell_key", ""), []).append(run)
    rows = []
    for key, found in by_key.items():
        here = Found(found, [])
        run = here.finished() or here.live() or here.resumable() or found[0]
        arms = {k[len("axis."):]: v for k, v in run.data.tags.items() if k.startswith("axis.")}
        rows.append(Row(arms, int(run.data.tags.get("seed", 0)), key, cell_state(here), run))
    return sorted(rows, key=lambda r: (list(r.arms.values()), r.seed))


def print_rows(title: str, header: str, rows: list[Row]) -> None:
    finals = [r.run.data.metrics if r.run is not None and r.state == "finished" else {}
              for r in rows]
    tested = any("test_error" in m for m in finals)
    table = _table(title, header, "seed", "state", "val err %",
                   *(["test err %"] if tested else []), "key", "run")
    for r, metrics in zip(rows, finals, strict=True):
        table.add_row(arm_values(r.arms), str(r.seed),
                      f"[{STATE_COLORS.get(r.state, 'white')}]{r.state}[/]",
                      pct(metrics, "final_val_error"),
                      *([pct(metrics, "test_error")] if tested else []), r.key,
                      r.run.info.run_id[:8] if r.run is not None else "")
    console.print(table)


# --- run: what it will do, and what it did -------------------------------------------------


def announce(name: str, cells: list[Any], c: Any, jobs: int, *, force: bool, yes: bool,
             limit: int) -> tuple[Any, list[Cell]]:
    """Say how many cells will train and, by earlier runs of the same grid in the store,
    about how long; a grid above ``limit`` cells waits for --yes. Returns the history and
    the cells to train."""
    from alexnet.estimate import History, clock_text, grid_seconds, store_history

    distinct = list({cell.key: cell for cell in cells}.values())
    history = store_history(c, {cell.grid_key for cell in distinct}) if c is not None else \
        History({}, set())
    todo = distinct if force else [cell for cell in distinct if cell.key not in history.finished]
    seconds = grid_seconds(todo, history, jobs)
    finished = len(distinct) - len(todo)
    line = f"{name}: {len(todo)} cell{'s' if len(todo) != 1 else ''} to train"
    if finished:
        line += f", {finished} already finished"
    if todo and seconds is not None:
        line += f"; about {clock_text(seconds)} by earlier runs of this grid"
    console.print(line, highlight=False)
    if len(todo) > limit and not yes:
        err_console.print(f"{len(todo):,} cells is a large grid (more than {limit}); "
                          "check the axes and --seeds, then add --yes to start it",
                          highlight=False)
        raise typer.Exit(1)
    return history, todo


def show_plan(uri: str, cells: list[Any]) -> None:
    c = client_if_any(uri)
    table = _table(None, "ablation", "arm", "seed", "key", "would")
    would = {"finished": "skip (finished)", "reusable": "reuse (finished in another ablation)",
             "running": "skip (running elsewhere)", "interrupted": "resume"}
    seen: set[str] = set()
    for p in plan(c, uri, cells):
        what = would.get(p.state, "run") if p.cell.key not in seen else "reuse (same cell above)"
        seen.add(p.cell.key)
        table.add_row(p.cell.ablation, arm_values(p.cell.arms), str(p.cell.seed), p.cell.key,
                      what)
    console.print(table)


def mean_sd(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    if not values:
        return ""
    mean = f"{scale * fmean(values):.{digits}f}"
    return mean if len(values) < 2 else f"{mean} ± {scale * stdev(values):.{digits}f}"


def print_arm_summary(ablation: Ablation, outcomes: list[Any], c: Any) -> None:
    """Per member ablation and arm: seeds finished, validation and test error, training
    error, epochs and time, as mean ± sd over the seeds."""
    members = {m.name: m for m in ablation.members()}
    for name in dict.fromkeys(o.cell.ablation for o in outcomes):
        mine = [o for o in outcomes if o.cell.ablation == name]
        by_arm: dict[str, list[tuple[Any, dict[str, float]]]] = {}
        for o in mine:
            by_arm.setdefault(arm_values(o.cell.arms), []).append((o, final_metrics(o, c)))
        has_test = any("test_error" in m for rows in by_arm.values() for _, m in rows)
        headers = ["seeds", "val err %", *(["test err %"] if has_test else []),
                   "train err %", "epochs", "time s"]
        table = _table(f"summary: {ui.grid_run_name([o.cell for o in mine])}",
                       arm_header(members[name]), *headers)
        for arm, rows in by_arm.items():
            ok = [m for o, m in rows if o.state in ("finished", "skipped", "reused") and m]

            def column(key: str, scale: float = 100.0, digits: int = 1, ok: list = ok) -> str:
                return mean_sd([m[key] for m in ok if key in m], scale, digits)

            seeds = f"{len(ok)}" if len(ok) == len(rows) else f"[red]{len(ok)}/{len(rows)}[/]"
            table.add_row(arm, seeds, column("final_val_error"),
                          *([column("test_error")] if has_test else []),
                          column("final_train_error"), spread([m.get("epochs_completed")
                                                               for m in ok]),
                          column("train_seconds", 1, 0))
        console.print(table)


def spread(values: list[float | None]) -> str:
    """Whole numbers as ``8``, or ``5–8`` when the seeds differ (an early stop)."""
    whole = sorted({round(v) for v in values if v is not None})
    if not whole:
        return ""
    return str(whole[0]) if len(whole) == 1 else f"{whole[0]}–{whole[-1]}"


def final_metrics(outcome: Any, c: Any) -> dict[str, float]:
    """An outcome's final metrics; a cell skipped as finished before has them in the store."""
    if outcome.final:
        return dict(outcome.final)
    if outcome.run_id and outcome.state == "skipped":
        return dict(c.get_run(outcome.run_id).data.metrics)
    return {}


def print_cell_summary(outcomes: Iterable[Any]) -> None:
    table = _table("cells", "ablation", "arm", "seed", "state", "val err %", "train err %",
                   "epochs", "time s")
    for o in outcomes:
        f = o.final or {}
        table.add_row(o.cell.ablation, arm_values(o.cell.arms), str(o.cell.seed),
                      f"[{STATE_COLORS.get(o.state, 'white')}]{o.state}[/]",
                      pct(f, "final_val_error"), pct(f, "final_train_error"),
                      f"{f['epochs_completed']:.0f}" if "epochs_completed" in f else "",
                      f"{f['train_seconds']:.1f}" if "train_seconds" in f else "")
    console.print(table)


# --- clean -----------------------------------------------------------------------------------


@user_errors
def clean(
    name: Annotated[str, typer.Argument(help="Ablation name or path to a .yaml file.")],
    quick: Annotated[bool, typer.Option("--quick", help="Runs of its --quick grid.")] = False,
    failed: Annotated[bool, typer.Option(
        "--failed", help="Failed, diverged and interrupted runs (an interrupted cell then "
                         "trains from the start).")] = False,
    everything: Annotated[bool, typer.Option("--all", help="Every run of the ablation.")
                          ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete them; without it, only "
                                                          "say what would go.")] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """Delete an ablation's runs from the store: --quick, --failed (or both), or --all.

    Says what it would delete; --yes deletes (MLflow's delete_run). Runs still training stay.
    """
    from alexnet.ablation import load_ablation

    if everything == (quick or failed):
        raise ConfigError("ablate clean: choose what to delete: --quick, --failed (or both), "
                          "or --all")
    uri = store.tracking_uri(tracking_uri)
    store.check_store(uri, create=False)
    ab = load_ablation(name)
    c = store.client(uri, create=False)
    chosen, spared = runs_to_delete(c, ab, quick=quick, failed=failed)
    doomed = [r for runs in chosen.values() for r in runs]
    for member, runs in chosen.items():
        if runs:
            console.print(f"{member}: {describe_runs(runs)}", highlight=False)
    if spared:
        console.print(f"{spared} run{'s' if spared != 1 else ''} still training: kept")
    where = store.redact(uri)
    if not doomed:
        console.print(f"nothing to delete in {where}", highlight=False)
        return
    if not yes:
        err_console.print(f"nothing deleted: add --yes to delete these {len(doomed)} runs from "
                          f"{where}", highlight=False)
        raise typer.Exit(1)
    for r in doomed:
        c.delete_run(r.info.run_id)
    console.print(f"deleted {len(doomed)} runs from {where}; `mlflow gc --backend-store-uri "
                  f"{where}` frees their artifacts' disk space", highlight=False)


def runs_to_delete(c: Any, ablation: Ablation, *, quick: bool, failed: bool
                   ) -> tuple[dict[str, list[Any]], int]:
    """Per member ablation, its runs that ``--quick`` / ``--failed`` select (both: runs that
    are both; neither: every run), never a run that is live; and how many live ones were
    spared."""
    chosen: dict[str, list[Any]] = {}
    spared = 0
    for member in ablation.members():
        exp = c.get_experiment_by_name(member.name)
        if exp is None:
            continue
        runs = c.search_runs([exp.experiment_id], max_results=50000)
        if quick:
            keys = {member.cells(quick=True)[0].grid_key} | {
                r.data.tags.get("ablate.grid_key") for r in runs
                if r.data.tags.get("ablate.kind") == "grid"
                and " · quick" in r.data.tags.get("mlflow.runName", "")}
            runs = [r for r in runs if r.data.tags.get("ablate.grid_key") in keys]
        if failed:
            runs = [r for r in runs if r.info.status in ("FAILED", "KILLED")
                    or (r.info.status == "RUNNING" and tracking.is_stale(r))]
        live = [r for r in runs if r.info.status == "RUNNING" and not tracking.is_stale(r)]
        spared += len(live)
        chosen[member.name] = [r for r in runs if r not in live]
    return chosen, spared


def describe_runs(runs: list[Any]) -> str:
    """``6 cell runs (5 finished, 1 failed), 1 grid run``"""
    kinds: dict[str, dict[str, int]] = {}
    for r in runs:
        status = r.info.status.lower()
        status = {"killed": "interrupted", "running": "interrupted"}.get(status, status)
        by_status = kinds.setdefault(r.data.tags.get("ablate.kind", "other"), {})
        by_status[status] = by_status.get(status, 0) + 1
    parts = []
    for kind, by_status in kinds.items():
        n = sum(by_status.values())
        detail = ", ".join(f"{k} {s}" for s, k in by_status.items())
        parts.append(f"{n} {kind} run{'s' if n != 1 else ''} ({detail})")
    return ", ".join(parts)
