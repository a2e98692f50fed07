"""A grid: every cell of an ablation (or of each member of a composite such as ``paper``) run
into the store through an executor, one MLflow experiment per ablation, one grid run per
experiment holding the cells' runs.

Cells with the same resolved config in several ablations (the base configuration is in
most of them) are trained once: the first occurrence trains, the others reuse its run
(``runner.reuse``) once it has finished.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alexnet import store, tracking
from alexnet.ablation import Ablation, Cell
from alexnet.executors import Executor, InProcess
from alexnet.runner import CellTask, Outcome, cell_state, execute_cell, find


@dataclass
class GridResult:
    outcomes: list[Outcome]
    parent_run_ids: list[str]
    listed: int  # cells the ablations list, shared ones counted in each
    distinct: int  # different resolved configs among them

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.state in ("failed", "diverged")]


class Progress:
    """What the grid tells whoever shows progress; the CLI implements it with rich."""

    def grid_started(self, name: str, total: int, skipped: int) -> None: ...
    def cell_event(self, cell: Cell, kind: str, payload: Any) -> None: ...
    def cell_done(self, outcome: Outcome) -> None: ...


@dataclass
class Planned:
    cell: Cell
    state: str  # finished | reusable | running | interrupted | failed | new (runner.cell_state)
    run_id: str | None = None


def plan(c: Any, uri: str, cells: list[Cell], *, create: bool = False) -> list[Planned]:
    """Each cell's state in the store, read only (``ablate show``, ``--dry-run``)."""
    out = []
    for cell in cells:
        exp_id = tracking.get_experiment_id(c, uri, cell.ablation, create=create) if c else None
        if exp_id is None:
            out.append(Planned(cell, "new"))
            continue
        found = find(c, exp_id, cell.key)
        run = found.finished() or found.live() or found.resumable() or \
            (found.here[0] if found.here else None)
        out.append(Planned(cell, cell_state(found), run.info.run_id if run else None))
    return out


def run_ablation(ablation: Ablation, cells: list[Cell], uri: str, *,
                 executor: Executor | None = None, force: bool = False,
                 progress: Progress | None = None, profile: bool = False,
                 experiment_tags: Callable[[Ablation], dict[str, str]] | None = None,
                 parent_tags: dict[str, str] | None = None) -> GridResult:
    """Run ``cells`` (of ``ablation`` or its members) into the store at ``uri``."""
    progress = progress or Progress()
    executor = executor or InProcess()
    c = store.client(uri)
    since = tracking.now_ms()
    members = {m.name: m for m in ablation.members()}
    exp_ids = {}
    for name in dict.fromkeys(cell.ablation for cell in cells):
        tags = experiment_tags(members[name]) if experiment_tags else None
        exp_ids[name] = tracking.get_experiment_id(c, uri, name, tags=tags)
        tracking.close_stale_runs(c, exp_ids[name])
    first: dict[str, Cell] = {}
    later: list[Cell] = []
    for cell in cells:
        (later.append(cell) if cell.key in first else first.setdefault(cell.key, cell))
    planned = plan(c, uri, list(first.values()))
    todo = [p.cell for p in planned if force or p.state != "finished"]
    outcomes = [Outcome(p.cell, "skipped", p.run_id) for p in planned
                if not (force or p.state != "finished")]
    progress.grid_started(ablation.name, len(todo) + len(later), len(outcomes))
    parents: dict[str, str] = {}
    beats = contextlib.ExitStack()
    for name in dict.fromkeys(cell.ablation for cell in [*todo, *later]):
        mine = [cell for cell in cells if cell.ablation == name]
        parents[name] = _start_grid_run(c, exp_ids[name], members[name], mine,
                                        parent_tags or {})
        beats.enter_context(tracking.Heartbeat(c, parents[name]))
    by_key = {cell.key: cell for cell in cells}
    done: list[Outcome] = []

    def on_event(event: tuple[str, str, Any]) -> None:
        kind, key, payload = event
        progress.cell_event(by_key[key], kind, payload)

    def on_done(task: CellTask, result: Outcome | BaseException) -> None:
        if isinstance(result, BaseException):
            result = Outcome(task.cell, "failed", None, f"{type(result).__name__}: {result}")
        progress.cell_done(result)
        done.append(result)

    def task(cell: Cell) -> CellTask:
        return CellTask(cell, uri, exp_ids[cell.ablation], parents.get(cell.ablation), since,
                        force=force, profile=profile)

    try:
        with beats:
            executor.run(execute_cell, [task(cell) for cell in todo], on_event=on_event,
                         on_done=on_done)
            # Another ablation's copy of a cell: reuses the run trained above.
            InProcess().run(execute_cell, [task(cell) for cell in later], on_event=on_event,
                            on_done=on_done)
    except KeyboardInterrupt:
        for run_id in parents.values():
            tracking.fail_run(c, run_id, "interrupted; rerun the same command to resume",
                              status="KILLED")
        raise
    outcomes += done
    for name, run_id in parents.items():
        bad = any(o.state in ("failed", "diverged") for o in done if o.cell.ablation == name)
        c.set_terminated(run_id, status="FAILED" if bad else "FINISHED")
    return GridResult(outcomes, list(parents.values()), len(cells), len(first))


def _start_grid_run(c: Any, experiment_id: str, ablation: Ablation, cells: list[Cell],
                    extra: dict[str, str]) -> str:
    run = c.create_run(experiment_id)
    tracking.set_tags(c, run.info.run_id, {
        "ablate.kind": "grid", "ablation": ablation.name, "claims": ",".join(ablation.claims),
        "ablate.grid_key": cells[0].grid_key, "git_commit": tracking.git_commit() or "",
        "mlflow.runName": f"{ablation.name} grid", **tracking.owner_tags(), **extra})
    tracking.log_params(c, run.info.run_id, {
        "cells": len(cells), "seeds": sorted({cell.seed for cell in cells})})
    return run.info.run_id
