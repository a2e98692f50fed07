"""Execute an ablation's cells: skip finished ones, resume interrupted ones, log to MLflow.

One cell = one call of ``train_run`` inside one MLflow child run. Cells run one after
another in this process, or ``jobs`` at a time in worker processes; each worker writes
its own run (SQLite waits on its lock; MLflow sets a 20 s busy timeout).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from alexnet import tracking
from alexnet.ablation import Ablation, Cell
from alexnet.errors import AblateError
from alexnet.instrument import StepProfiler, system_metrics
from alexnet.results import EpochMetrics, RunResult

Action = Literal["skip", "resume", "new", "running"]
State = Literal["finished", "failed", "diverged", "running", "skipped", "interrupted"]


@dataclass
class Planned:
    cell: Cell
    action: Action
    run_id: str | None = None  # the run to resume, or the FINISHED run that is skipped


@dataclass
class Outcome:
    cell: Cell
    state: State
    run_id: str | None
    reason: str | None = None
    final: dict[str, float] | None = None


# --- what to do with each cell ----------------------------------------------------------


def checkpoint_path(uri: str, cell: Cell) -> Path:
    return tracking.checkpoint_dir(uri) / f"{cell.key}.pt"


def cell_state(runs: list[Any], now_ms: int) -> tuple[str, Any]:
    """A cell's state in the store from its runs: finished, running, failed, interrupted, new."""
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if finished:
        return "finished", finished[0]
    live = [r for r in runs if r.info.status == "RUNNING" and not tracking.is_stale(r, now_ms)]
    if live:
        return "running", live[0]
    stopped = [r for r in runs if r.info.status in ("RUNNING", "KILLED")]
    if stopped:
        return "interrupted", max(stopped, key=lambda r: r.info.start_time)
    if runs:
        return "failed", runs[0]
    return "new", None


def plan(c: Any, uri: str, experiment_id: str | None, cells: list[Cell], *, force: bool
         ) -> list[Planned]:
    """Skip FINISHED cells, resume interrupted ones from their checkpoint, rerun the rest."""
    now = int(time.time() * 1000)
    out = []
    for cell in cells:
        runs = tracking.runs_for_key(c, experiment_id, cell.key) if experiment_id else []
        state, run = cell_state(runs, now)
        if force:
            out.append(Planned(cell, "new"))
        elif state == "finished":
            out.append(Planned(cell, "skip", run.info.run_id))
        elif state == "running":
            out.append(Planned(cell, "running", run.info.run_id))
        elif state == "interrupted" and checkpoint_path(uri, cell).exists():
            out.append(Planned(cell, "resume", run.info.run_id))
        else:
            out.append(Planned(cell, "new", run.info.run_id if state == "interrupted" else None))
    return out


# --- one cell ----------------------------------------------------------------------------

_DATA_MEMO: dict[tuple[str, str], Any] = {}


def open_data_once(cell: Cell) -> Any:
    """Cells of a grid usually share their data: decode and move it to the device once."""
    from alexnet.data import open_data
    from alexnet.train import resolve_device

    device = resolve_device(cell.config.runtime.device)
    memo_key = (cell.config.data.model_dump_json(), str(device))
    if memo_key not in _DATA_MEMO:
        _DATA_MEMO.clear()  # keep one dataset in memory at a time
        _DATA_MEMO[memo_key] = open_data(cell.config.data, device)
    return _DATA_MEMO[memo_key]


Event = tuple[str, str, Any]  # (kind, cell key, payload)


def execute_cell(uri: str, experiment_id: str, parent_run_id: str | None, planned: Planned,
                 emit: Callable[[Event], None] | None = None, *, profile: bool = False
                 ) -> Outcome:
    """Train one cell inside its MLflow run. Failures become FAILED runs, never raise
    (except Ctrl-C, which marks the run KILLED and propagates). With ``profile``, a
    torch.profiler trace of a few steps is saved as the run's artifact profile/trace.json."""
    from alexnet.train import train_run

    cell = planned.cell
    c = tracking.client(uri)
    if planned.action == "new" and planned.run_id:  # an interrupted run with no checkpoint
        tracking.fail_cell_run(c, planned.run_id, "interrupted before its first checkpoint; "
                               "rerun as a new run", status="KILLED")
    resume_id = planned.run_id if planned.action == "resume" else None
    ckpt = checkpoint_path(uri, cell)
    if planned.action == "new":
        ckpt.unlink(missing_ok=True)
    run_id = tracking.start_cell_run(c, experiment_id, cell, parent_run_id=parent_run_id,
                                     resume_run_id=resume_id)

    def on_epoch(m: EpochMetrics) -> None:
        tracking.log_epoch(c, run_id, m)
        if emit:
            emit(("epoch", cell.key, m.as_dict()))

    def on_step(step: int, steps: int) -> None:
        if emit and (step % 10 == 0 or step == steps):
            emit(("step", cell.key, (step, steps)))

    try:
        data = open_data_once(cell)
        tracking.set_tags(c, run_id, {"dataset_fingerprint": data.fingerprint})
        if emit:
            emit(("start", cell.key, cell.config.train.epochs))
        with contextlib.ExitStack() as stack:
            stack.enter_context(system_metrics(run_id, uri, resume=resume_id is not None))
            step_hook = on_step
            if profile:
                folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                profiler = stack.enter_context(StepProfiler(folder))
                step_hook = profiler.chain(on_step)
                stack.callback(_log_trace, c, run_id, profiler)
            result = train_run(cell.config, checkpoint_path=ckpt, on_epoch=on_epoch,
                               on_step=step_hook, data=data)
    except KeyboardInterrupt:
        tracking.fail_cell_run(c, run_id, "interrupted (Ctrl-C); resumes on the next run",
                               status="KILLED")
        raise
    except AblateError as err:
        tracking.fail_cell_run(c, run_id, str(err))
        return Outcome(cell, "failed", run_id, str(err))
    except Exception as err:  # a bug or an out-of-memory: this cell fails, the grid goes on
        reason = f"{type(err).__name__}: {err}"
        tracking.fail_cell_run(c, run_id, reason)
        _log_text(c, run_id, traceback.format_exc(), "traceback.txt")
        return Outcome(cell, "failed", run_id, reason)
    _log_artifacts(c, run_id, cell, result, ckpt)
    tracking.end_cell_run(c, run_id, result)
    ckpt.unlink(missing_ok=True)
    state: State = "finished" if result.status == "finished" else "diverged"
    return Outcome(cell, state, run_id, result.reason, result.final)


def _log_trace(c: Any, run_id: str, profiler: StepProfiler) -> None:
    if profiler.trace.exists():
        c.log_artifact(run_id, str(profiler.trace), artifact_path="profile")


def _log_text(c: Any, run_id: str, text: str, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(text)
        c.log_artifact(run_id, str(path))


def _log_artifacts(c: Any, run_id: str, cell: Cell, result: RunResult, ckpt: Path) -> None:
    """The resolved config, the learning curves and the final checkpoint."""
    _log_text(c, run_id, yaml.safe_dump(cell.config.model_dump(mode="json"), sort_keys=False),
              "config.yaml")
    if result.history:
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / "learning_curves.png"
            plot_learning_curves(result, cell, png)
            c.log_artifact(run_id, str(png))
    if ckpt.exists():
        c.log_artifact(run_id, str(ckpt), artifact_path="checkpoint")


def plot_learning_curves(result: RunResult, cell: Cell, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h.epoch for h in result.history]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(epochs, [100 * h.train_error for h in result.history], label="training error")
    ax.plot(epochs, [100 * h.val_error for h in result.history], label="validation error")
    ax.axhline(100 * cell.config.train.target_train_error, ls="--", c="grey", lw=1,
               label=f"{100 * cell.config.train.target_train_error:.0f}% target")
    ax.set(xlabel="epoch", ylabel="top-1 error (%)", title=f"{cell.arm_label}, seed {cell.seed}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- worker processes --------------------------------------------------------------------

_EVENTS: Any = None
_PROFILE = False


def _init_worker(threads: int | None, events: Any, profile: bool) -> None:
    global _EVENTS, _PROFILE
    _EVENTS, _PROFILE = events, profile
    if threads:
        import torch

        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def _worker(uri: str, experiment_id: str, parent_run_id: str | None, planned: Planned
            ) -> Outcome:
    return execute_cell(uri, experiment_id, parent_run_id, planned, emit=_EVENTS.put,
                        profile=_PROFILE)


def threads_per_job(jobs: int, device: str) -> int | None:
    """On CPU the cores are split between the jobs; a GPU's jobs need few host threads."""
    if device.startswith("cuda"):
        return 2
    return max(1, (os.cpu_count() or 1) // jobs)


# --- the grid ----------------------------------------------------------------------------


@dataclass
class GridResult:
    outcomes: list[Outcome]
    parent_run_ids: list[str]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.state in ("failed", "diverged")]


class Progress:
    """What the runner tells whoever shows progress; the CLI implements it with rich."""

    def grid_started(self, name: str, total: int, skipped: int) -> None: ...
    def cell_event(self, cell: Cell, kind: str, payload: Any) -> None: ...
    def cell_done(self, outcome: Outcome) -> None: ...


def run_ablation(ablation: Ablation, cells: list[Cell], uri: str, *, jobs: int = 1,
                 force: bool = False, progress: Progress | None = None,
                 extra_parent_tags: dict[str, str] | None = None, profile: bool = False
                 ) -> GridResult:
    """Run every cell of ``ablation`` (or of each member of a composite) into the store."""
    progress = progress or Progress()
    c = tracking.client(uri)
    by_ablation: dict[str, list[Cell]] = {}
    for cell in cells:
        by_ablation.setdefault(cell.ablation, []).append(cell)
    outcomes: list[Outcome] = []
    parents: list[str] = []
    for name, group in by_ablation.items():
        member = next(m for m in ablation.members() if m.name == name)
        exp_id = tracking.get_experiment_id(c, uri, name)
        planned = plan(c, uri, exp_id, group, force=force)
        todo = [p for p in planned if p.action in ("new", "resume")]
        for p in planned:
            if p.action == "skip":
                outcomes.append(Outcome(p.cell, "skipped", p.run_id))
            elif p.action == "running":
                outcomes.append(Outcome(p.cell, "running", p.run_id,
                                        "running in another process"))
        progress.grid_started(name, len(todo), len(planned) - len(todo))
        if not todo:
            continue
        parent = c.create_run(exp_id, tags={
            "ablate.kind": "grid", "ablation": name, "claims": ",".join(member.claims),
            "git_commit": tracking.git_commit() or "", "mlflow.runName": f"{name} grid",
            **(extra_parent_tags or {})})
        parent_id = parent.info.run_id
        parents.append(parent_id)
        tracking.log_params(c, parent_id, {"cells": len(planned), "jobs": jobs,
                                           "seeds": sorted({p.cell.seed for p in planned})})
        try:
            if jobs <= 1:
                done = _run_here(uri, exp_id, parent_id, todo, progress, profile)
            else:
                done = _run_pool(uri, exp_id, parent_id, todo, jobs, progress, profile)
        except KeyboardInterrupt:
            c.set_terminated(parent_id, status="KILLED")
            raise
        outcomes.extend(done)
        bad = any(o.state in ("failed", "diverged") for o in done)
        c.set_terminated(parent_id, status="FAILED" if bad else "FINISHED")
    return GridResult(outcomes, parents)


def _run_here(uri: str, exp_id: str, parent_id: str, todo: list[Planned],
              progress: Progress, profile: bool) -> list[Outcome]:
    by_key = {p.cell.key: p.cell for p in todo}
    out = []
    for p in todo:
        outcome = execute_cell(uri, exp_id, parent_id, p,
                               emit=lambda e: progress.cell_event(by_key[e[1]], e[0], e[2]),
                               profile=profile)
        progress.cell_done(outcome)
        out.append(outcome)
    return out


def _run_pool(uri: str, exp_id: str, parent_id: str, todo: list[Planned], jobs: int,
              progress: Progress, profile: bool) -> list[Outcome]:
    ctx = mp.get_context("spawn")  # fork after torch and MLflow have threads is unsafe
    manager = ctx.Manager()
    events = manager.Queue()
    by_key = {p.cell.key: p.cell for p in todo}
    threads = threads_per_job(jobs, todo[0].cell.config.runtime.device)
    out = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(threads, events, profile)) as pool:
        pending = {pool.submit(_worker, uri, exp_id, parent_id, p): p for p in todo}
        while pending:
            finished, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(events, by_key, progress)
            for fut in finished:
                p = pending.pop(fut)
                try:
                    outcome = fut.result()
                except Exception as err:  # the worker process itself died
                    outcome = Outcome(p.cell, "failed", None, f"worker died: {err}")
                progress.cell_done(outcome)
                out.append(outcome)
    _drain(events, by_key, progress)
    manager.shutdown()
    return out


def _drain(events: Any, by_key: dict[str, Cell], progress: Progress) -> None:
    while True:
        try:
            kind, key, payload = events.get_nowait()
        except (queue.Empty, EOFError, OSError):
            return
        progress.cell_event(by_key[key], kind, payload)
