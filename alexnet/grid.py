"""A grid: every cell of an ablation (or of each member of a composite such as ``paper``) run
into the store through an executor, one MLflow experiment per ablation, one grid run per
experiment holding the cells' runs.

Cells with the same resolved config in several ablations (the base configuration is in
most of them) are trained once: the first occurrence trains, the others reuse its run
(``runner.reuse``) once it has finished.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from alexnet import store, tracking, ui
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

    def cells_queued(self, cells: list[Cell]) -> None: ...  # those to run, before the start
    def grid_started(self, name: str, total: int, skipped: int) -> None: ...
    def cell_event(self, cell: Cell, kind: str, payload: Any) -> None: ...
    def cell_done(self, outcome: Outcome) -> None: ...
    def grid_phase(self, text: str) -> None: ...  # what the grid does after its cells


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
                 parent_tags: dict[str, str] | None = None) -> GridResult:
    """Run ``cells`` (of ``ablation`` or its members) into the store at ``uri``; then, for
    every arm with two seeds or more, score the average of its seeds' models (Section 6)."""
    progress = progress or Progress()
    executor = executor or InProcess()
    c = store.client(uri)
    since = tracking.now_ms()
    members = {m.name: m for m in ablation.members()}
    exp_ids = {}
    for name in dict.fromkeys(cell.ablation for cell in cells):
        mine = [cell for cell in cells if cell.ablation == name]
        exp_ids[name] = tracking.get_experiment_id(c, uri, name)
        # The description, and a view of this grid's cells grouped by arm (MLflow's UI).
        tracking.set_experiment_tags(c, exp_ids[name], {**ui.experiment_tags(members[name]),
                                                         **ui.grid_view_tags(mine)})
        tracking.close_stale_runs(c, exp_ids[name])
    first: dict[str, Cell] = {}
    later: list[Cell] = []
    for cell in cells:
        (later.append(cell) if cell.key in first else first.setdefault(cell.key, cell))
    planned = plan(c, uri, list(first.values()))
    todo = [p.cell for p in planned if force or p.state != "finished"]
    outcomes = [Outcome(p.cell, "skipped", p.run_id) for p in planned
                if not (force or p.state != "finished")]
    progress.cells_queued([*todo, *later])
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
    progress.grid_phase("ensembles")
    for name, exp_id in exp_ids.items():
        log_ensembles(c, exp_id, parents.get(name), [cell for cell in cells
                                                     if cell.ablation == name])
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
        "mlflow.runName": ui.grid_run_name(cells), **tracking.owner_tags(), **extra})
    tracking.log_params(c, run.info.run_id, {
        "cells": len(cells), "seeds": sorted({cell.seed for cell in cells})})
    return run.info.run_id


# --- Section 6: several nets averaged --------------------------------------------------------


def log_ensembles(c: Any, experiment_id: str, parent_run_id: str | None,
                  cells: list[Cell]) -> None:
    """For every arm with two or more finished seeds, the softmax outputs of the seeds'
    final models averaged on the held-out split (the test split, else validation), logged as
    an ``ablate.kind=ensemble`` run: no extra training (Section 6, Table 2: five CNNs)."""
    by_arm: dict[str, list[tuple[Cell, Any]]] = {}
    for cell in cells:
        run = find(c, experiment_id, cell.key).finished()
        if run is not None:
            by_arm.setdefault(cell.arm_label, []).append((cell, run))
    for members in by_arm.values():
        if len(members) < 2:
            continue
        ids = ",".join(sorted(run.info.run_id for _, run in members))
        if c.search_runs([experiment_id], max_results=1, filter_string=(
                f"tags.`ablate.kind` = 'ensemble' and tags.members = '{ids}'")):
            continue  # these very members were averaged before
        _log_ensemble(c, experiment_id, parent_run_id, members, ids)


def _log_ensemble(c: Any, experiment_id: str, parent_run_id: str | None,
                  members: list[tuple[Cell, Any]], ids: str) -> None:
    import tempfile

    import torch

    from alexnet.ensemble import evaluate_ensemble
    from alexnet.models import build_model_from_config
    from alexnet.runner import WEIGHTS_ARTIFACT, open_data_once
    from alexnet.train import autocast_for, resolve_device, use_channels_last

    cell = members[0][0]
    data = open_data_once(cell)
    device = resolve_device(cell.config.runtime.device)
    # The precision and layout the members were evaluated in, so that each member scores
    # here what its run logged.
    channels_last = use_channels_last(device, cell.config)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    models = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (member, run) in enumerate(members):
            path = c.download_artifacts(_trained(c, run), WEIGHTS_ARTIFACT, f"{tmp}/{i}")
            model = build_model_from_config(member.config.model, data.num_classes)
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            models.append(model.to(device, memory_format=layout))
    split = "test" if data.test_size else "val"
    size = cell.config.train.eval_batch_size
    batches = data.test_batches(size) if split == "test" else data.eval_batches(size)
    result = evaluate_ensemble(models, batches, device, channels_last=channels_last,
                               autocast=lambda: autocast_for(device, cell.config))
    run = c.create_run(experiment_id, tags={
        "ablate.kind": "ensemble", "ablation": cell.ablation, "arm": cell.arm_label,
        "ablate.grid_key": cell.grid_key, "members": ids, "split": split,
        "seeds": ",".join(str(m.seed) for m, _ in members),
        "mlflow.runName": f"{cell.arm_label} ensemble of {len(members)}",
        **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}),
        **{f"axis.{a}": v for a, v in cell.arms.items()}})
    tracking.log_metrics(c, run.info.run_id, {
        "ensemble_error": result.ensemble.error, "ensemble_error_top5":
        result.ensemble.error_top5, "single_error_mean": result.single.error})
    c.set_terminated(run.info.run_id)


def _trained(c: Any, run: Any) -> str:
    """The id of the run that trained ``run``'s cell. A reused run names it; stores written
    before reuse looked through copies may name another copy, so the links are followed."""
    for _ in range(100):  # a cycle cannot be written, but a store is data
        link = run.data.tags.get("ablate.reused_from")
        if not link:
            return run.info.run_id
        run = c.get_run(link)
    raise RuntimeError(f"run {run.info.run_id}: its reused_from links do not end")
