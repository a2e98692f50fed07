"""Execute cells: ``execute_cell`` is the one way a cell runs in the store, for grids and
sweep trials alike, on whichever executor (executors.py) runs it.

A grid cell is claimed in the store first (tracking.claim_cell), so that any number of
processes or machines sharing a store train it once: a cell FINISHED in this experiment is
skipped, one FINISHED in another experiment (the same resolved config in another ablation)
is reused, an interrupted one resumes from its last epoch, the rest train.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

from alexnet import store, tracking
from alexnet.ablation import Cell
from alexnet.errors import AblateError
from alexnet.instrument import StepProfiler, system_metrics
from alexnet.results import EpochMetrics
from alexnet.runlog import RunLog, cell_label, end_line, epoch_line

State = Literal["finished", "failed", "diverged", "skipped", "reused", "running",
                "interrupted"]
# (kind, cell key, payload): phase {phase, epoch, done, total}, start {epochs, steps},
# step (step, steps), epoch (the epoch's metrics)
Event = tuple[str, str, Any]
Emit = Callable[[Event], None]
RESUME_ARTIFACT = "resume/checkpoint.pt"
WEIGHTS_ARTIFACT = "weights/model.pt"
STEP_EVENT_SECONDS = 0.25  # at most this often a step event: enough for an ETA, few to send


class StopCell(Exception):  # noqa: N818 - a request, not an error
    """Raised by an epoch hook to end a cell early (a pruned trial, a claim taken over):
    its run ends KILLED with the message as the reason, and the exception propagates."""


@dataclass(frozen=True)
class CellTask:
    """Everything a worker needs to run one cell; picklable, for worker processes."""

    cell: Cell
    uri: str
    experiment_id: str
    parent_run_id: str | None
    since_ms: int  # when the command started: a run that failed since is not retried now
    kind: str = "cell"  # "trial": a sweep's, never claimed, reused or resumed
    force: bool = False
    profile: bool = False
    score_test: bool = True  # sweeps never look at the test split
    step_offset: int = 0  # trials of several seeds log one after another on one step axis
    extra_tags: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    cell: Cell
    state: State
    run_id: str | None
    reason: str | None = None
    final: dict[str, float] | None = None


# --- what the store says about a cell -------------------------------------------------------


@dataclass
class Found:
    """A cell's runs in the store, seen from one experiment."""

    here: list[Any]
    elsewhere: list[Any]

    def finished(self, here: bool = True) -> Any | None:
        runs = self.here if here else self.elsewhere
        return next((r for r in runs if r.info.status == "FINISHED"), None)

    def live(self) -> Any | None:
        return next((r for r in self.here + self.elsewhere
                     if r.info.status == "RUNNING" and not tracking.is_stale(r)), None)

    def failed_since(self, since_ms: int) -> Any | None:
        return next((r for r in self.here if r.info.status == "FAILED"
                     and r.info.start_time >= since_ms), None)

    def resumable(self) -> Any | None:
        """The latest run here that stopped before its end: killed, RUNNING with its process
        gone, or failed by an error (not a divergence) that a rerun may not repeat. It is
        reopened, and goes on from its last checkpoint where it has one."""
        stopped = [r for r in self.here if r.info.status == "KILLED"
                   or (r.info.status == "RUNNING" and tracking.is_stale(r))
                   or (r.info.status == "FAILED" and r.data.tags.get("diverged") != "true")]
        return max(stopped, key=lambda r: r.info.start_time, default=None)


def find(c: Any, experiment_id: str, key: str) -> Found:
    runs = tracking.cell_runs(c, tracking.experiment_ids(c), key)
    here = [r for r in runs if r.info.experiment_id == experiment_id]
    return Found(here, [r for r in runs if r.info.experiment_id != experiment_id])


def cell_state(found: Found) -> str:
    """finished | reusable | running | interrupted | failed | new, for plans and `show`."""
    if found.finished():
        return "finished"
    if found.live():
        return "running"
    if found.finished(here=False):
        return "reusable"
    if found.resumable():
        return "interrupted"
    return "failed" if found.here else "new"


# --- one cell ------------------------------------------------------------------------------


def execute_cell(task: CellTask, emit: Emit | None = None,
                 on_epoch: Callable[[EpochMetrics], None] | None = None) -> Outcome:
    """Run ``task``'s cell in the store and say how it ended. Training failures become FAILED
    runs and never raise; Ctrl-C and StopCell end the run KILLED and propagate."""
    c = store.client(task.uri)
    cell = task.cell
    if task.kind != "cell":
        return _train(c, task, None, None, emit, on_epoch)
    found = find(c, task.experiment_id, cell.key)
    if not task.force:
        if done := found.finished():
            return Outcome(cell, "skipped", done.info.run_id)
        if failed := found.failed_since(task.since_ms):
            return Outcome(cell, "failed", failed.info.run_id,
                           failed.data.tags.get("failure_reason", "failed in another process"))
    claim = tracking.claim_cell(c, cell.key)
    if claim is None:
        return Outcome(cell, "running", None, "running in another process")
    found = find(c, task.experiment_id, cell.key)  # again: it may have finished meanwhile
    if not task.force:
        if done := found.finished():
            return Outcome(cell, "skipped", done.info.run_id)
        if original := found.finished(here=False):
            return reuse(c, task, original, claim)
    resume = found.resumable()
    return _train(c, task, claim, resume.info.run_id if resume else None, emit, on_epoch)


def _train(c: Any, task: CellTask, claim: tracking.Claim | None, resume_id: str | None,
           emit: Emit | None, on_epoch: Callable[[EpochMetrics], None] | None) -> Outcome:
    from alexnet.data.progress import reporting_to
    from alexnet.train import train_run

    cell = task.cell
    run_id = tracking.start_cell_run(c, task.experiment_id, cell, kind=task.kind,
                                     parent_run_id=task.parent_run_id, resume_run_id=resume_id,
                                     extra_tags=task.extra_tags)
    if claim is not None:
        tracking.bind_claim(c, claim, run_id)
    checkpoint = resume_checkpoint(c, run_id) if task.kind == "cell" else None
    say = emit or (lambda event: None)
    beat = tracking.Heartbeat(c, run_id, claim)
    label = cell_label(cell.arms, cell.seed)
    runlog = RunLog(c, run_id, local_artifacts(c.get_run(run_id)))

    def phase(name: str, epoch: int = 0, done: int = 0, total: int = 0) -> None:
        say(("phase", cell.key, {"phase": name, "epoch": epoch, "done": done, "total": total}))

    def epoch_done(m: EpochMetrics) -> None:
        tracking.log_epoch(c, run_id, m, step=task.step_offset + m.epoch)
        runlog.write(epoch_line(label, m.as_dict(), cell.config.train.epochs))
        say(("epoch", cell.key, m.as_dict()))
        if on_epoch is not None:
            on_epoch(m)
        if beat.lost:
            raise StopCell("another process took this cell over (this one was silent too "
                           "long); it continues there")

    last_step = [0.0]

    def step_done(step: int, steps: int) -> None:
        now = time.monotonic()
        if step == steps or now - last_step[0] >= STEP_EVENT_SECONDS:
            last_step[0] = now
            say(("step", cell.key, (step, steps)))

    kept: list[Any] = []
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(beat)
            stack.enter_context(reporting_to(lambda what, done, total: phase(
                what, done=done, total=total)))
            phase("opening data")
            data = open_data_once(cell)
            tracking.set_tags(c, run_id, {"dataset_fingerprint": data.fingerprint})
            say(("start", cell.key, {"epochs": cell.config.train.epochs,
                                     "steps": data.steps_per_epoch(cell.config.train.batch_size)}))
            stack.enter_context(system_metrics(run_id, task.uri, resume=resume_id is not None))
            if task.profile:
                folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                profiler = StepProfiler(folder)
                # Logged after the profiler has exited: a run shorter than its schedule
                # writes its trace on exit, with the steps it had.
                stack.callback(_log_trace, c, run_id, profiler)
                step_done = stack.enter_context(profiler).chain(step_done)
            result = train_run(cell.config, checkpoint=checkpoint, data=data,
                               on_epoch=epoch_done, on_step=step_done, on_end=kept.append,
                               score_test=task.score_test, on_phase=phase)
            runlog.write(end_line(label, result.status, result.final, result.reason))
    except StopCell as stop:
        runlog.write(end_line(label, "stopped", None, str(stop)))
        tracking.fail_run(c, run_id, str(stop), status="KILLED")
        raise
    except KeyboardInterrupt:
        runlog.write(end_line(label, "interrupted", None, "the next run of the command resumes"))
        tracking.fail_run(c, run_id, "interrupted; the next run of the same command resumes it",
                          status="KILLED")
        raise
    except AblateError as err:
        runlog.write(end_line(label, "failed", None, str(err)))
        tracking.fail_run(c, run_id, str(err))
        return Outcome(cell, "failed", run_id, str(err))
    except Exception as err:  # a bug or out of memory: this cell fails, the grid goes on
        reason = f"{type(err).__name__}: {err}"
        if checkpoint is not None and checkpoint.exists():
            reason += f" (its last checkpoint, {RESUME_ARTIFACT} in the run's artifacts, is kept: "\
                      "a rerun resumes from it)"
        runlog.write(end_line(label, "failed", None, reason))
        tracking.fail_run(c, run_id, reason)
        with tracking.artifact_dir(c, run_id) as folder:
            (folder / "traceback.txt").write_text(traceback.format_exc())
        return Outcome(cell, "failed", run_id, reason)
    finally:
        runlog.close()
    phase("saving")
    _log_artifacts(c, run_id, cell, kept[0] if kept else None, outputs=task.kind == "cell")
    tracking.end_cell_run(c, run_id, result)
    if checkpoint is not None:  # finished, or diverged: nothing left to resume
        checkpoint.remove()
    state: State = "finished" if result.status == "finished" else "diverged"
    return Outcome(cell, state, run_id, result.reason, result.final)


def reuse(c: Any, task: CellTask, original: Any, claim: tracking.Claim) -> Outcome:
    """A FINISHED run of the same resolved config in another experiment stands for this cell:
    a run here, tagged with where it comes from, carries its params and metrics (the per-epoch
    ones too, so curves and reports read it like any other), not its artifacts."""
    cell = task.cell
    # The run that trained it, also when ``original`` is itself a reuse (a cell shared by
    # three ablations): only that one has the weights that ensembles load.
    source = original.data.tags.get("ablate.reused_from") or original.info.run_id
    source_experiment = original.data.tags.get("ablate.reused_from_experiment") or \
        original.info.experiment_id
    run = c.create_run(task.experiment_id, start_time=original.info.start_time)
    run_id = run.info.run_id
    tracking.bind_claim(c, claim, run_id)
    tracking.log_params(c, run_id, cell.config.flat())
    parent = {"mlflow.parentRunId": task.parent_run_id} if task.parent_run_id else {}
    keep = ("dataset_fingerprint", "device", "diverged", "git_commit")
    tracking.set_tags(c, run_id, {
        **tracking.cell_tags(cell), **parent, **{k: original.data.tags.get(k) for k in keep},
        "ablate.reused_from": source, "ablate.reused_from_experiment": source_experiment})
    from mlflow.entities import Metric

    history = [Metric(m.key, m.value, m.timestamp, m.step)
               for name in tracking.EPOCH_METRICS
               for m in c.get_metric_history(original.info.run_id, name)]
    c.log_batch(run_id, metrics=history)
    tracking.log_metrics(c, run_id, {k: v for k, v in original.data.metrics.items()
                                     if k not in tracking.EPOCH_METRICS})
    c.set_terminated(run_id, status="FINISHED", end_time=original.info.end_time)
    return Outcome(cell, "reused", run_id, None, dict(original.data.metrics))


# --- checkpoints and artifacts -------------------------------------------------------------


def local_artifacts(run: Any) -> Path | None:
    """The run's artifact folder when it is on this machine's disk, else None."""
    parsed = urlparse(run.info.artifact_uri)
    return Path(unquote(parsed.path)) if parsed.scheme == "file" else None


def resume_checkpoint(c: Any, run_id: str) -> Any:
    """The checkpoint a cell resumes from: an artifact of its own run, so that a cell
    interrupted on one machine resumes on another. In a local store it is written in place;
    elsewhere it goes through the artifact store every epoch."""
    from alexnet.train import Checkpoint

    folder = local_artifacts(c.get_run(run_id))
    if folder is not None:
        return Checkpoint(folder / RESUME_ARTIFACT)
    return ArtifactCheckpoint(c, run_id)


class ArtifactCheckpoint:
    """A checkpoint kept in a remote artifact store (a tracking server's, an object store)."""

    def __init__(self, c: Any, run_id: str) -> None:
        from alexnet.train import Checkpoint

        self.c, self.run_id = c, run_id
        self._dir = tempfile.TemporaryDirectory(prefix="ablate-resume-")
        self.local = Checkpoint(Path(self._dir.name) / Path(RESUME_ARTIFACT).name)

    def load(self, key: str) -> dict[str, Any] | None:
        with contextlib.suppress(Exception):  # absent: a new run
            self.c.download_artifacts(self.run_id, RESUME_ARTIFACT, self._dir.name)
            Path(self._dir.name, RESUME_ARTIFACT).replace(self.local.path)
        return self.local.load(key)

    def exists(self) -> bool:
        return self.local.exists()

    def save(self, state: dict[str, Any]) -> None:
        self.local.save(state)
        self.c.log_artifact(self.run_id, str(self.local.path), Path(RESUME_ARTIFACT).parent.name)

    def remove(self) -> None:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        # The client's tracking URI, not MLflow's global one: a tracking server's artifacts
        # (mlflow-artifacts:/...) are reached through it. A checkpoint left behind is only
        # disk space: it never fails a finished cell.
        with contextlib.suppress(Exception):
            repo = get_artifact_repository(self.c.get_run(self.run_id).info.artifact_uri,
                                           tracking_uri=self.c.tracking_uri)
            repo.delete_artifacts(Path(RESUME_ARTIFACT).parent.name)
        self._dir.cleanup()


def _log_trace(c: Any, run_id: str, profiler: StepProfiler) -> None:
    if profiler.trace.exists():
        c.log_artifact(run_id, str(profiler.trace), artifact_path="profile")


def _log_artifacts(c: Any, run_id: str, cell: Cell, model: Any, outputs: bool = False
                   ) -> None:
    """The resolved config and the final weights (a state dict: loading it runs no code);
    with ``outputs`` (grid cells, not sweep trials), what serving and the report need too:
    held-out predictions and the MLflow model (alexnet.serving.record). No learning-curve
    image: MLflow's chart view draws the per-epoch metrics, and the report each arm's."""
    import torch
    import yaml

    with tracking.artifact_dir(c, run_id) as folder:
        (folder / "config.yaml").write_text(
            yaml.safe_dump(cell.config.model_dump(mode="json"), sort_keys=False))
        if model is not None:
            (folder / "weights").mkdir()
            torch.save(model.state_dict(), folder / WEIGHTS_ARTIFACT)
            if outputs:
                from alexnet.serving.record import log_cell_outputs

                log_cell_outputs(c, run_id, cell, model, open_data_once(cell), folder,
                                 folder / WEIGHTS_ARTIFACT)


# --- data, opened once per process -----------------------------------------------------------

_DATA: dict[str, Any] = {}


def data_identity(cell: Cell) -> str:
    """What decides a Data object: the whole data section and the device it lives on."""
    from alexnet.train import resolve_device

    return f"{cell.config.data.model_dump_json()}@{resolve_device(cell.config.runtime.device)}"


def open_data_once(cell: Cell) -> Any:
    """The cells of a grid and the trials of a sweep usually share their data: decode it and
    move it to the device once per process (one dataset in memory at a time)."""
    from alexnet.data import open_data
    from alexnet.train import resolve_device

    ident = data_identity(cell)
    if ident not in _DATA:
        _DATA.clear()
        _DATA[ident] = open_data(cell.config.data, resolve_device(cell.config.runtime.device))
    return _DATA[ident]


def preflight_data(cells: list[Cell]) -> None:
    """Open every distinct dataset before anything is logged, so that bad data (and a batch
    larger than the training split) is bad input, exit 2, and the decoded cache is ready for
    every worker."""
    for cell in cells:
        open_data_once(cell).check_batch_size(cell.config.train.batch_size)
