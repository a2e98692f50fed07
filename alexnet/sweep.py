"""Optuna sweeps: the learning rate and weight decay of every arm, tuned separately.

Section 3.1: the paper chose the learning rates of the ReLU and the tanh net separately; at
one shared rate a comparison measures that rate as much as the design choice. So each arm
gets a study, ``<ablation>/<arm>/<key[:10]>`` (the key of its untuned config at seed 0), and
``ablate run --tuned`` trains each arm at its best trial (tuned.py). The objective is the
last epoch's validation top-1 error (the best epoch's would select on validation twice),
the mean over the trial's seeds, 1.0 for a run that diverged; each seed is one
``execute_cell`` whose epochs feed the pruner. ``--trials N`` adds N finished-or-pruned
trials per arm across all workers and machines: the storage numbers trials atomically, and
one numbered past the target is never run (it ends FAIL as ``surplus``). The storage's
heartbeats fail and retry a trial whose process died (store.open_storage).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from alexnet import store, tracking
from alexnet.ablation import Cell
from alexnet.config import with_values
from alexnet.errors import ConfigError
from alexnet.tuned import DIVERGED_ERROR, study_name, summarize

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
COUNTED = (*FINISHED, TrialState.RUNNING, TrialState.WAITING)
FAILURES_IN_A_ROW = 3  # trials that raise are a bug, not a bad learning rate
# TPE after five random trials (its ten are most of a small sweep); constant_liar keeps
# parallel workers off the same point. The median pruner never stops a trial in its first
# two epochs, which say little about where it ends.
SAMPLERS: dict[str, Callable[[], optuna.samplers.BaseSampler]] = {
    "tpe": lambda: optuna.samplers.TPESampler(n_startup_trials=5, constant_liar=True),
    "random": optuna.samplers.RandomSampler,
}
PRUNERS: dict[str, Callable[[], optuna.pruners.BasePruner]] = {
    "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2),
    "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1),
    "none": optuna.pruners.NopPruner,
}


@dataclass(frozen=True)
class SearchSpace:
    lr: tuple[float, float] = (1e-4, 1e-1)  # log-uniform
    # Zero, or log-uniform (a log scale cannot reach zero). None: the config's, unsearched,
    # as relu_vs_tanh wants (no regularization at all).
    weight_decay: tuple[float, float] | None = (1e-6, 1e-2)

    def suggest(self, trial: optuna.Trial) -> dict[str, float]:
        values = {"optim.lr": trial.suggest_float("lr", *self.lr, log=True)}
        if self.weight_decay is not None:
            zero = trial.suggest_categorical("wd_zero", [False, True])
            values["optim.weight_decay"] = 0.0 if zero else trial.suggest_float(
                "weight_decay", *self.weight_decay, log=True)
        return values


@dataclass(frozen=True)
class SweepOptions:
    trials: int = 20
    timeout: float | None = None  # seconds; no new trial starts after it
    jobs: int = 1  # workers per arm
    sampler: str = "tpe"
    pruner: str | optuna.pruners.BasePruner = "median"  # a name, or a pruner (tests)
    space: SearchSpace = SearchSpace()
    seeds: tuple[int, ...] = (0,)  # each trial trains these; the objective is their mean


def target_for(study: optuna.Study, trials: int, started: float) -> int:
    """The finished-or-pruned total this sweep works towards: that of a sweep in progress
    (live trials, target not reached) or of one that reached it after we started (started
    together, the other was quicker); otherwise ``trials`` more. Trials of dead processes
    are failed first, and queued again with their parameters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)  # a no-op without heartbeats
    now = study.get_trials(deepcopy=False)
    done = [t for t in now if t.state in FINISHED]
    target = study.user_attrs.get("sweep.target")
    if isinstance(target, int):
        last = max((t.datetime_complete.timestamp() for t in done), default=0.0)
        busy = any(t.state == TrialState.RUNNING for t in now)
        if (len(done) < target and busy) or (len(done) >= target and last > started):
            return target
    study.set_user_attr("sweep.target", len(done) + trials)
    return len(done) + trials


# --- workers and trials ------------------------------------------------------------------


class TrialFailed(Exception):
    """A trial's training raised (a bug, out of memory): the trial FAILs, the sweep goes on."""


@dataclass(frozen=True)
class ArmJob:
    """One worker's share of one arm's study (picklable)."""

    cell: Cell  # the arm's untuned config at seed 0: every trial starts from it
    study: str
    storage: str
    target: int
    uri: str
    experiment_id: str
    parent_run_id: str
    opts: SweepOptions
    deadline: float | None
    since_ms: int
    tags: dict[str, Any] = field(default_factory=dict)


def run_arm(job: ArmJob, emit: Callable[[Any], None]) -> None:
    """Trials of ``job``'s study until its target is reached, or the deadline."""
    pruner = job.opts.pruner
    study = optuna.load_study(study_name=job.study, storage=store.open_storage(job.storage),
                              sampler=SAMPLERS[job.opts.sampler](),
                              pruner=PRUNERS[pruner]() if isinstance(pruner, str) else pruner)
    timeout = None if job.deadline is None else job.deadline - time.time()
    failed: list[bool] = []

    def stop_on_failures(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        failed.append(trial.state == TrialState.FAIL and not trial.user_attrs.get("surplus"))
        if failed[-FAILURES_IN_A_ROW:] == [True] * FAILURES_IN_A_ROW:
            study.stop()

    if timeout is None or timeout > 0:
        study.optimize(lambda trial: objective(job, trial, emit), timeout=timeout,
                       catch=(TrialFailed,), callbacks=[
                           optuna.study.MaxTrialsCallback(job.target, states=COUNTED),
                           stop_on_failures, say])


def say(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
    """One line per trial, from whichever worker ran it."""
    if t.user_attrs.get("surplus"):
        return
    state = "diverged" if t.user_attrs.get("diverged") else t.state.name.lower()
    error = f"{100 * t.value:5.1f}%" if t.value is not None else "    -"
    hp = "  ".join(f"{k} {v:.2e}" for k, v in t.params.items() if k != "wd_zero")
    why = f"  ({t.user_attrs['reason']})" if "reason" in t.user_attrs else ""
    print(f"{study.study_name}  trial {t.number:>3}  {state:<8} val err {error}  {hp}  "
          f"{t.duration.total_seconds() if t.duration else 0:.1f}s{why}", flush=True)


def objective(job: ArmJob, trial: optuna.Trial, emit: Callable[[Any], None]) -> float:
    from alexnet.runner import CellTask, StopCell, execute_cell

    earlier = trial.study.get_trials(deepcopy=False, states=COUNTED)
    if sum(t.number < trial.number for t in earlier) >= job.target:
        trial.set_user_attr("surplus", True)  # another worker asked at the same instant
        trial.study.stop()
        raise TrialFailed("the target was reached by trials numbered before this one")
    cfg = with_values(job.cell.config, job.opts.space.suggest(trial),
                      where=f"trial {trial.number} of {job.study}")
    trial.set_user_attr("weight_decay", cfg.optim.weight_decay)  # searched or the config's
    errors = []
    for i, seed in enumerate(job.opts.seeds):
        offset = i * cfg.train.epochs  # several seeds: one after another on one step axis

        def prune(m: Any, offset: int = offset) -> None:
            trial.report(m.val_error, offset + m.epoch)
            if trial.should_prune():
                raise StopCell(f"pruned at epoch {m.epoch}: validation error "
                               f"{100 * m.val_error:.1f}%")

        cell = dataclasses.replace(job.cell, config=with_values(cfg, {"seed": seed}, job.study))
        task = CellTask(cell, job.uri, job.experiment_id, job.parent_run_id, job.since_ms,
                        kind="trial", score_test=False, step_offset=offset, extra_tags={
                            **job.tags, "study": job.study, "trial_number": trial.number,
                            "mlflow.runName": f"{cell.arm_label} trial {trial.number}"})
        try:
            outcome = execute_cell(task, emit, on_epoch=prune)
        except StopCell as stop:
            trial.set_user_attr("reason", str(stop))
            raise optuna.TrialPruned(str(stop)) from None
        if outcome.state == "failed":
            trial.set_user_attr("reason", str(outcome.reason)[:300])
            raise TrialFailed(outcome.reason)
        if outcome.state == "diverged":
            trial.set_user_attr("diverged", True)
            return DIVERGED_ERROR
        errors.append(outcome.final["final_val_error"])
    return sum(errors) / len(errors)


# --- the sweep, what it found, and its use ---------------------------------------------------


def run_sweep(arms: list[Cell], uri: str, spec: str, opts: SweepOptions, executor: Any, *,
              started: float, tags: dict[str, Any], on_event: Callable[[Any], None]
              ) -> tuple[list[Any], list[str]]:
    """Tune every arm (one untuned seed-0 cell each) into the studies at ``spec`` and the
    MLflow store at ``uri``, ``opts.jobs`` workers per arm. Returns the studies' summaries
    and the arms that stopped short of their target."""
    from alexnet.runner import preflight_data

    storage = store.open_storage(spec)  # unreachable: a StoreError before anything runs
    preflight_data(arms)
    c = store.client(uri)
    since, jobs = tracking.now_ms(), []
    deadline = time.time() + opts.timeout if opts.timeout else None
    for cell in arms:
        name = study_name(cell)
        study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True)
        if study.user_attrs.setdefault("seeds", list(opts.seeds)) != list(opts.seeds):
            raise ConfigError(f"study {name} was swept with --seeds "
                              f"{','.join(map(str, study.user_attrs['seeds']))}; pass the same "
                              "seeds, so that its trials keep one objective")
        study.set_user_attr("seeds", list(opts.seeds))
        exp_id = tracking.get_experiment_id(c, uri, cell.ablation)
        tracking.close_stale_runs(c, exp_id, kinds=("sweep", "trial"))
        parent = tracking.once(c, f"sweep.{cell.key}", lambda cell=cell, exp_id=exp_id,
                               name=name: _sweep_run(c, exp_id, cell, name))
        c.update_run(parent, status="RUNNING")
        tracking.set_tags(c, parent, {**tags, "storage": store.redact(spec)})
        jobs += [ArmJob(cell, name, spec, target_for(study, opts.trials, started), uri, exp_id,
                        parent, opts, deadline, since)] * opts.jobs
    try:
        executor.run(run_arm, jobs, on_event=on_event, on_done=lambda job, result: None)
    except KeyboardInterrupt:
        for job in jobs:
            tracking.fail_run(c, job.parent_run_id, "interrupted", status="KILLED")
        raise
    summaries, short = [], []
    for job in {j.study: j for j in jobs}.values():
        s = summarize(optuna.load_study(study_name=job.study, storage=storage))
        summaries.append(s)
        stopped = s.complete + s.pruned < job.target and deadline is None and not s.running
        short += [s.arm] if stopped else []
        c.set_terminated(job.parent_run_id, status="FAILED" if stopped else "FINISHED")
    return summaries, short


def _sweep_run(c: Any, experiment_id: str, cell: Cell, study: str) -> str:
    run = c.create_run(experiment_id, tags={
        "ablate.kind": "sweep", "study": study, "mlflow.runName": f"{cell.arm_label} sweep",
        "ablation": cell.ablation, "arm": cell.arm_label, "config_key": cell.key,
        **{f"axis.{a}": v for a, v in cell.arms.items()}})
    tracking.log_params(c, run.info.run_id, cell.config.flat())
    return run.info.run_id
