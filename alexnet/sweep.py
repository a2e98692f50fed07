"""Optuna sweeps: the learning rate and weight decay of every arm, tuned separately.

Section 3.1 (Figure 1): the paper chose the learning rate of the ReLU net and of the tanh
net separately. Comparing arms at one shared learning rate measures that learning rate as
much as the design choice, so ``ablate sweep`` gives each arm a study of its own and
``ablate run --tuned`` trains each arm at its study's best values (``apply_tuned``).

- One study per arm, ``<ablation>/<arm>/<key[:10]>``: the key of the arm's resolved config
  at seed 0 before tuning, so whatever changes the experiment (--quick, --set, --epochs)
  makes another study, and ``apply_tuned`` finds it the same way.
- The space: ``lr`` log-uniform; weight decay zero (``wd_zero``) or log-uniform, since a log
  scale cannot reach zero; ``--wd-range off`` keeps the config's (relu_vs_tanh trains with
  no regularization at all).
- The objective: the last epoch's validation top-1 error (the number a grid reports; the
  best epoch's would select on validation twice), averaged over the trial's seeds; a run
  that diverges scores 1.0, worse than chance. Each seed is one ``execute_cell`` (a trial
  run nested under the arm's sweep run) whose epochs feed the pruner.
- Totals: ``--trials N`` adds N finished-or-pruned trials per arm, whatever the number of
  workers and machines. Trial numbers are handed out atomically by the storage, so a trial
  whose number comes after the target (counting the study's trials that finished, run or
  wait) is not run: it ends FAIL, marked ``surplus``, which happens only when two workers
  ask at the same instant. A process started while the study has live trials joins its
  target instead of adding N more.
- Storage: Optuna's RDB storage, by default SQLite beside the MLflow store
  (``mlruns/optuna.db``), with heartbeats: a trial whose process died is failed and retried
  (``RetryHeartbeatStaleTrialCallback``). ``--storage`` takes any RDB URL (PostgreSQL for
  several machines) or a journal file (no heartbeats: a crashed trial stays RUNNING).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState
from pydantic import ValidationError

from alexnet import store, tracking
from alexnet.ablation import Cell
from alexnet.config import RunConfig, describe_validation_error, unflatten
from alexnet.errors import ConfigError

LR_RANGE = (1e-4, 1e-1)
WD_RANGE = (1e-6, 1e-2)
DIVERGED_ERROR = 1.0
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
COUNTED = (*FINISHED, TrialState.RUNNING, TrialState.WAITING)
FAILURES_IN_A_ROW = 3  # trials that raise are a bug, not a bad learning rate


# --- the search space ------------------------------------------------------------------


def parse_range(text: str, option: str, *, may_be_off: bool = False
                ) -> tuple[float, float] | None:
    """``"1e-4,1e-1"`` → (1e-4, 0.1), checked 0 < LOW < HIGH; ``"off"`` → None."""
    if may_be_off and text.strip().lower() == "off":
        return None
    try:
        low, high = (float(p) for p in text.split(","))
    except ValueError:
        off = " (or off)" if may_be_off else ""
        raise ConfigError(f"{option} {text!r}: expected LOW,HIGH{off}, e.g. {option} 1e-4,1e-1"
                          ) from None
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0:
        raise ConfigError(f"{option} {low:g},{high:g}: a log-uniform range needs 0 < LOW < HIGH")
    if low >= high:
        raise ConfigError(f"{option} {low:g},{high:g}: LOW must be below HIGH")
    return low, high


@dataclass(frozen=True)
class SearchSpace:
    lr: tuple[float, float] = LR_RANGE
    weight_decay: tuple[float, float] | None = WD_RANGE  # None: the config's, not searched

    def suggest(self, trial: optuna.Trial) -> dict[str, float]:
        values = {"optim.lr": trial.suggest_float("lr", *self.lr, log=True)}
        if self.weight_decay is not None:
            zero = trial.suggest_categorical("wd_zero", [False, True])
            values["optim.weight_decay"] = 0.0 if zero else trial.suggest_float(
                "weight_decay", *self.weight_decay, log=True)
        return values

    def describe_wd(self) -> str:
        wd = self.weight_decay
        return "off (the config's)" if wd is None else f"0 or {wd[0]:g},{wd[1]:g}"


def with_values(cfg: RunConfig, values: dict[str, Any], where: str) -> RunConfig:
    """``cfg`` with dotted ``values`` replaced, validated again like any built config."""
    try:
        return RunConfig.model_validate(unflatten({**cfg.flat(), **values}))
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, where)) from None


def check_choice(option: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{option} {value!r}: choose one of {', '.join(allowed)}")
    return value


def make_sampler(name: str) -> optuna.samplers.BaseSampler:
    if name == "random":
        return optuna.samplers.RandomSampler()
    # Five random trials before TPE models anything (its default of ten is most of a small
    # sweep); constant_liar keeps parallel workers off the same point.
    return optuna.samplers.TPESampler(n_startup_trials=5, constant_liar=True)


def make_pruner(spec: str | optuna.pruners.BasePruner) -> optuna.pruners.BasePruner:
    if not isinstance(spec, str):
        return spec
    if spec == "median":  # never on the first epochs, which say little about the end
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    if spec == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


# --- arms, studies, storage -------------------------------------------------------------


def study_name(cell: Cell) -> str:
    """``<ablation>/<arm>/<key[:10]>``: the key of the arm's config at seed 0, untuned."""
    key = cell.config.model_copy(update={"seed": 0}).key()
    return f"{cell.ablation}/{cell.arm_label}/{key[:10]}"


def select_arms(cells: list[Cell], wanted: list[str] | None) -> list[Cell]:
    """One cell per arm (the first seed's); ``wanted`` names arms as ``activation=tanh``
    or just ``tanh`` (every arm combination holding it)."""
    arms: dict[tuple[str, str], Cell] = {}
    for cell in cells:
        arms.setdefault((cell.ablation, cell.arm_label), cell)
    chosen = set(arms) if not wanted else set()
    for w in wanted or []:
        hits = {k for k, c in arms.items()
                if w in (c.arm_label, f"{c.ablation}/{c.arm_label}", *c.arms.values())}
        if not hits:
            labels = list(dict.fromkeys(c.arm_label for c in arms.values()))
            values = list(dict.fromkeys(v for c in arms.values() for v in c.arms.values()))
            raise ConfigError(f"--arm {w!r}: no such arm in {cells[0].ablation if cells else '?'}"
                              f"; allowed: {', '.join(labels)} (or just {', '.join(values)})")
        chosen |= hits
    return [c for k, c in arms.items() if k in chosen]


def target_for(study: optuna.Study, trials: int, started: float) -> int:
    """The total of finished-or-pruned trials this sweep works towards. A sweep in progress
    (live trials, target not reached) is joined, as is one that reached its target after we
    started (started together, the other was quicker); otherwise ``trials`` more. Trials of
    dead processes are failed first, and queued again (their retries count towards it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)  # a no-op without heartbeats
    trials_now = study.get_trials(deepcopy=False)
    done = [t for t in trials_now if t.state in FINISHED]
    busy = any(t.state == TrialState.RUNNING for t in trials_now)  # live: stale ones failed
    target = study.user_attrs.get("sweep.target")
    if isinstance(target, int):
        last = max((t.datetime_complete.timestamp() for t in done if t.datetime_complete),
                   default=0.0)
        if (len(done) < target and busy) or (len(done) >= target and last > started):
            return target
    study.set_user_attr("sweep.target", len(done) + trials)
    return len(done) + trials


# --- running trials ------------------------------------------------------------------------


class TrialFailed(Exception):
    """A trial's training raised (a bug, out of memory): the trial FAILs, the sweep goes on."""


@dataclass(frozen=True)
class SweepOptions:
    trials: int = 20
    timeout: float | None = None  # seconds; no new trial starts after it
    jobs: int = 1
    sampler: str = "tpe"
    pruner: str | Any = "median"  # a name, or an optuna pruner (tests)
    space: SearchSpace = SearchSpace()
    seeds: tuple[int, ...] = (0,)  # each trial trains these; the objective is their mean

    def __post_init__(self) -> None:
        for option, value in (("--trials", self.trials), ("--jobs", self.jobs)):
            if value < 1:
                raise ConfigError(f"{option} {value}: give at least 1")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"--timeout {self.timeout:g}: give a positive number of seconds")
        check_choice("--sampler", self.sampler, SAMPLERS)
        if isinstance(self.pruner, str):
            check_choice("--pruner", self.pruner, PRUNERS)


@dataclass(frozen=True)
class ArmJob:
    """One arm's share of a sweep, for a worker (picklable)."""

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
    """A worker: trials of ``job``'s study until the target is reached (or the deadline)."""
    storage = store.open_storage(job.storage)
    study = optuna.load_study(study_name=job.study, storage=storage,
                              sampler=make_sampler(job.opts.sampler),
                              pruner=make_pruner(job.opts.pruner))
    timeout = None if job.deadline is None else job.deadline - time.time()
    if timeout is not None and timeout <= 0:
        return
    failures: list[bool] = []

    def stop_on_failures(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if not trial.user_attrs.get("surplus"):
            failures.append(trial.state == TrialState.FAIL)
        if failures[-FAILURES_IN_A_ROW:] == [True] * FAILURES_IN_A_ROW:
            study.stop()

    study.optimize(lambda trial: objective(job, trial, emit), timeout=timeout,
                   catch=(TrialFailed,), callbacks=[
                       optuna.study.MaxTrialsCallback(job.target, states=COUNTED),
                       stop_on_failures, say])


def say(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
    """One line per trial, from whichever worker ran it."""
    if t.user_attrs.get("surplus"):
        return
    state = "diverged" if t.user_attrs.get("diverged") else t.state.name.lower()
    error = f"val err {100 * t.value:5.1f}%" if t.value is not None else "val err     -"
    hp = "  ".join(f"{k} {v:.2e}" for k, v in t.params.items() if k != "wd_zero")
    why = f"  ({t.user_attrs['reason']})" if "reason" in t.user_attrs else ""
    seconds = t.duration.total_seconds() if t.duration else 0.0
    print(f"{study.study_name}  trial {t.number:>3}  {state:<8} {error}  {hp}  "
          f"{seconds:.1f}s{why}", flush=True)


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
    epochs, errors = cfg.train.epochs, []
    for i, seed in enumerate(job.opts.seeds):
        cell = dataclasses.replace(job.cell, config=with_values(cfg, {"seed": seed}, job.study))

        def prune(m: Any, offset: int = i * epochs) -> None:
            trial.report(m.val_error, offset + m.epoch)
            if trial.should_prune():
                raise StopCell(f"pruned at epoch {m.epoch}: validation error "
                               f"{100 * m.val_error:.1f}%")

        task = CellTask(cell, job.uri, job.experiment_id, job.parent_run_id, job.since_ms,
                        kind="trial", score_test=False, step_offset=i * epochs, extra_tags={
                            **job.tags, "study": job.study, "trial_number": trial.number,
                            "mlflow.runName": f"{cell.arm_label} trial {trial.number}"})
        try:
            outcome = execute_cell(task, emit, on_epoch=prune)
        except StopCell as stop:
            trial.set_user_attr("reason", str(stop))
            raise optuna.TrialPruned(str(stop)) from None
        trial.set_user_attr("mlflow_run_id", outcome.run_id)
        if outcome.state == "failed":
            trial.set_user_attr("reason", str(outcome.reason)[:300])
            raise TrialFailed(outcome.reason)
        if outcome.state == "diverged":
            trial.set_user_attr("diverged", True)
            return DIVERGED_ERROR
        errors.append(outcome.final["final_val_error"])
    return sum(errors) / len(errors)


# --- what a study holds ----------------------------------------------------------------------


@dataclass(frozen=True)
class Best:
    lr: float
    weight_decay: float
    val_error: float
    trial: int


@dataclass(frozen=True)
class StudySummary:
    study: str
    ablation: str
    arm: str
    complete: int
    pruned: int
    failed: int
    running: int
    target: int | None
    best: Best | None


def best_of(study: optuna.Study) -> Best | None:
    """Optuna's best trial, unless it diverged (as every trial then did)."""
    try:
        t = study.best_trial
    except ValueError:  # no complete trial
        return None
    if t.value >= DIVERGED_ERROR:
        return None
    return Best(t.params["lr"], t.user_attrs["weight_decay"], t.value, t.number)


def summarize(study: optuna.Study) -> StudySummary:
    states = [t.state for t in study.get_trials(deepcopy=False)]
    ablation, _, rest = study.study_name.partition("/")
    return StudySummary(study.study_name, ablation, rest.rpartition("/")[0] or rest,
                        states.count(TrialState.COMPLETE), states.count(TrialState.PRUNED),
                        states.count(TrialState.FAIL), states.count(TrialState.RUNNING),
                        study.user_attrs.get("sweep.target"), best_of(study))


def list_studies(spec: str, ablations: list[str]) -> list[StudySummary]:
    """Every study of these ablations in the storage (none if it does not exist)."""
    storage = store.open_storage(spec, create=False)
    if storage is None:
        return []
    names = sorted(n for n in optuna.get_all_study_names(storage)
                   if n.partition("/")[0] in ablations)
    return [summarize(optuna.load_study(study_name=n, storage=storage)) for n in names]


# --- the sweep, and its use --------------------------------------------------------------------


@dataclass
class SweepResult:
    summaries: list[StudySummary]
    short: list[str]  # arms that stopped short of their target


def run_sweep(arms: list[Cell], uri: str, spec: str, opts: SweepOptions, executor: Any, *,
              started: float, tags: dict[str, Any], on_event: Callable[[Any], None]
              ) -> SweepResult:
    """Tune every arm in ``arms`` (one untuned seed-0 cell per arm) into the studies at
    ``spec`` and the MLflow store at ``uri``, ``opts.jobs`` workers per arm."""
    from alexnet.runner import preflight_data

    storage = store.open_storage(spec)  # unreachable → StoreError before anything runs
    preflight_data(arms)
    c = store.client(uri)
    since = tracking.now_ms()
    deadline = time.time() + opts.timeout if opts.timeout else None
    jobs = []
    for cell in arms:
        name = study_name(cell)
        study = optuna.create_study(study_name=name, storage=storage, direction="minimize",
                                    load_if_exists=True)
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
        tracking.set_tags(c, parent, {**tags, "storage": store.redact(spec),
                                      "lr_range": f"{opts.space.lr[0]:g},{opts.space.lr[1]:g}",
                                      "wd_range": opts.space.describe_wd()})
        target = target_for(study, opts.trials, started)
        jobs += [ArmJob(cell, name, spec, target, uri, exp_id, parent, opts, deadline, since)
                 ] * opts.jobs
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
        if stopped:
            short.append(s.arm)
        c.set_terminated(job.parent_run_id, status="FAILED" if stopped else "FINISHED")
    return SweepResult(summaries, short)


def _sweep_run(c: Any, experiment_id: str, cell: Cell, study: str) -> str:
    run = c.create_run(experiment_id, tags={
        "ablate.kind": "sweep", "study": study, "mlflow.runName": f"{cell.arm_label} sweep",
        "ablation": cell.ablation, "arm": cell.arm_label, "config_key": cell.key,
        **{f"axis.{a}": v for a, v in cell.arms.items()}})
    tracking.log_params(c, run.info.run_id, cell.config.flat())
    return run.info.run_id


def apply_tuned(cells: list[Cell], spec: str) -> list[Cell]:
    """Each cell at its arm's best lr and weight decay (Section 3.1: learning rates chosen
    separately for each net); the key changes with them, and ``tuned`` records them."""
    storage = store.open_storage(spec, create=False)
    names = set(optuna.get_all_study_names(storage)) if storage is not None else set()
    out = []
    for cell in cells:
        name = study_name(cell)
        best = best_of(optuna.load_study(study_name=name, storage=storage)) \
            if name in names else None
        if best is None:
            raise ConfigError(_missing_sweep(cell, name, spec, name in names, names))
        cfg = with_values(cell.config, {"optim.lr": best.lr,
                                        "optim.weight_decay": best.weight_decay},
                          where=f"--tuned {cell.arm_label} (study {name})")
        out.append(dataclasses.replace(cell, config=cfg, tuned={
            "lr": best.lr, "weight_decay": best.weight_decay}))
    return out


def _missing_sweep(cell: Cell, name: str, spec: str, exists: bool, names: set[str]) -> str:
    quick = cell.config.data.source == "synthetic"
    command = f"ablate sweep {cell.ablation}{' --quick' if quick else ''}"
    if exists:
        return (f"the sweep of arm {cell.arm_label} of {cell.ablation} (study {name}) has no "
                f"finished trial that did not diverge; run `{command} --trials 10` to add some")
    prefix = f"{cell.ablation}/{cell.arm_label}/"
    others = sorted(n[len(prefix):] for n in names if n.startswith(prefix))
    hint = (f" (this arm was swept with other options: config {', '.join(others)}; sweep with "
            "the same --quick/--set/--epochs as this run)" if others else "")
    return (f"no sweep for arm {cell.arm_label} of {cell.ablation} (study {name} in "
            f"{store.redact(spec)}); run `{command}` first{hint}")
