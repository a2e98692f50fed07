"""Optuna sweeps: the learning rate and weight decay of every arm, tuned separately.

Section 3.1 (Figure 1): the paper chose the learning rate of the ReLU net and of the tanh
net separately, each as good as it could be. Comparing arms at one shared learning rate
measures that learning rate as much as the design choice, so ``ablate sweep`` gives each
arm an Optuna study of its own and ``ablate run --tuned`` trains every cell of the arm at
its study's best values (``apply_tuned``).

The decisions, in one place:

* One study per arm, named ``<ablation>/<arm>/<key[:10]>``; the key is that of the arm's
  resolved config at seed 0 before tuning, so whatever changes the experiment (--quick,
  --set, --epochs) gives another study, and whatever does not (--device, paths) the same.
  ``apply_tuned`` computes the name the same way, which is how --tuned finds the sweep.
* The search space: ``lr`` log-uniform (default 1e-4 to 1e-1); weight decay is a
  categorical ``wd_zero`` (True = no weight decay, as relu_vs_tanh's "no regularization"
  wants) and, when False, ``weight_decay`` log-uniform (default 1e-6 to 1e-2): a log scale
  cannot reach zero, so zero is a choice of its own. ``--wd-range off`` searches the
  learning rate alone and keeps the config's weight decay: relu_vs_tanh's claim (Section
  3.1, Figure 1) is about nets trained with no regularization at all.
* The objective: the **last** epoch's validation top-1 error, the number the grid reports
  as ``final_val_error``; the best epoch's would select on the validation set twice. A run
  that diverges scores 1.0 (worse than chance), so the sampler learns to avoid it rather
  than ignoring it as it would a failed trial. With several ``seeds`` the mean is taken.
* Every trial is one call of ``train.train_run``, the function the grid uses; validation
  error is reported every epoch (step = epoch) and the pruner may stop the trial there.
* ``trials=N`` means N more finished-or-pruned trials per arm across all workers. A trial
  is admitted under a file lock only while finished + pruned + running trials are fewer
  than the study's target (the user attribute ``sweep.target``), so workers on one machine
  stop at exactly the target; on several machines sharing an RDB the lock is per machine
  and a trial or two over is possible. A process that starts while another works on the
  study (its ``sweep.heartbeat`` is fresh and the target not reached) joins that target
  instead of adding N more; so two ``ablate sweep`` started together do N between them.
* Storage: a journal file beside the MLflow store (``mlruns/optuna.journal``), safe for
  several processes on one machine; ``--storage`` takes an RDB URL (``sqlite:///...``,
  ``postgresql://...``) for several machines, or another journal file path.
* MLflow: one sweep run per arm (tag ablate.kind=sweep, found or created under a file lock
  so concurrent processes share it) holding the best values as tags, and one child run
  per trial (ablate.kind=trial; never cell_key, so a grid never mistakes a trial for a
  cell) with the full config as params, per-epoch metrics, and tags study, trial_number,
  state (running, complete, pruned, fail). Pruned trials end KILLED, with what they logged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import multiprocessing as mp
import os
import re
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from pydantic import ValidationError

from alexnet import tracking
from alexnet.ablation import Cell
from alexnet.config import RunConfig, describe_validation_error, quick_overrides, unflatten
from alexnet.errors import AblateError, ConfigError, StoreError
from alexnet.results import EpochMetrics, RunResult

LR_RANGE = (1e-4, 1e-1)
WD_RANGE = (1e-6, 1e-2)
DIVERGED_ERROR = 1.0  # the objective of a run whose loss became NaN/inf
JOURNAL_NAME = "optuna.journal"
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
HEARTBEAT_SECONDS = 15.0  # how often a working process says so in the study
STALE_SECONDS = 120.0  # a study or trial heartbeat older than this: nobody is working on it
MAX_CONSECUTIVE_FAILURES = 3  # a trial that raises is a bug, not a bad learning rate
STORAGE_CONNECT_TIMEOUT = 5  # seconds, for a network database

Echo = Callable[[str], None]


def _echo(line: str) -> None:
    print(line, flush=True)


# --- the search space ------------------------------------------------------------------


def check_range(option: str, low: float, high: float) -> tuple[float, float]:
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0:
        raise ConfigError(f"{option} {low:g},{high:g}: a log-uniform range needs 0 < LOW < HIGH")
    if low >= high:
        raise ConfigError(f"{option} {low:g},{high:g}: LOW must be below HIGH")
    return (float(low), float(high))


def parse_range(text: str, option: str, *, may_be_off: bool = False
                ) -> tuple[float, float] | None:
    """``"1e-4,1e-1"`` → (1e-4, 0.1), checked: 0 < LOW < HIGH; ``"off"`` → None where
    ``may_be_off`` (not searched)."""
    if may_be_off and text.strip().lower() == "off":
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        off = " (or off)" if may_be_off else ""
        raise ConfigError(f"{option} {text!r}: expected LOW,HIGH{off}, e.g. {option} 1e-4,1e-1"
                          ) from None
    return check_range(option, low, high)


@dataclass(frozen=True)
class SearchSpace:
    lr: tuple[float, float] = LR_RANGE
    weight_decay: tuple[float, float] | None = WD_RANGE  # None: the config's, not searched

    def __post_init__(self) -> None:
        check_range("--lr-range", *self.lr)
        if self.weight_decay is not None:
            check_range("--wd-range", *self.weight_decay)

    def describe_wd(self) -> str:
        wd = self.weight_decay
        return "off (the config's)" if wd is None else f"0 or {wd[0]:g},{wd[1]:g}"

    def suggest(self, trial: optuna.Trial) -> dict[str, float]:
        """lr, and weight_decay unless it is not searched."""
        lr = trial.suggest_float("lr", *self.lr, log=True)
        if self.weight_decay is None:
            return {"lr": lr}
        if trial.suggest_categorical("wd_zero", [False, True]):
            return {"lr": lr, "weight_decay": 0.0}
        return {"lr": lr, "weight_decay": trial.suggest_float("weight_decay", *self.weight_decay,
                                                              log=True)}


def hparams_of(trial: optuna.trial.FrozenTrial) -> dict[str, float]:
    """The lr and weight decay a trial trained with."""
    params = trial.params
    if "effective_weight_decay" in trial.user_attrs:
        wd = float(trial.user_attrs["effective_weight_decay"])
    else:
        wd = 0.0 if params.get("wd_zero") else float(params["weight_decay"])
    return {"lr": float(params["lr"]), "weight_decay": wd}


def with_values(cfg: RunConfig, values: dict[str, Any], where: str) -> RunConfig:
    """``cfg`` with dotted ``values`` replaced, validated again like any built config."""
    try:
        return RunConfig.model_validate(unflatten({**cfg.flat(), **values}))
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, where)) from None


def make_sampler(name: str) -> optuna.samplers.BaseSampler:
    if name == "random":
        return optuna.samplers.RandomSampler()
    # Five random trials before TPE models anything (its default of ten is most of a small
    # sweep); constant_liar (on by default) keeps parallel workers off the same point.
    return optuna.samplers.TPESampler(n_startup_trials=5)


def make_pruner(spec: str | optuna.pruners.BasePruner) -> optuna.pruners.BasePruner:
    if not isinstance(spec, str):
        return spec
    if spec == "median":
        # Never on the first epoch, which says little about where a run ends up.
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    if spec == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


def check_choice(option: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{option} {value!r}: choose one of {', '.join(allowed)}")
    return value


# --- arms and their studies ------------------------------------------------------------


def study_name(cell: Cell) -> str:
    """``<ablation>/<arm>/<key[:10]>``: the key of the arm's config at seed 0, untuned."""
    base = cell.config.model_copy(update={"seed": 0})
    return f"{cell.ablation}/{cell.arm_label}/{base.key()[:10]}"


def select_arms(cells: list[Cell], wanted: list[str] | None) -> list[Cell]:
    """One cell per arm (the first seed's); ``wanted`` names arms as ``activation=tanh``
    or just ``tanh`` (every arm combination holding it)."""
    arms: dict[tuple[str, str], Cell] = {}
    for cell in cells:
        arms.setdefault((cell.ablation, cell.arm_label), cell)
    if not wanted:
        return list(arms.values())
    chosen: dict[tuple[str, str], Cell] = {}
    for w in wanted:
        hits = {k: c for k, c in arms.items()
                if w in (c.arm_label, f"{c.ablation}/{c.arm_label}") or w in c.arms.values()}
        if not hits:
            labels = list(dict.fromkeys(c.arm_label for c in arms.values()))
            values = list(dict.fromkeys(v for c in arms.values() for v in c.arms.values()))
            raise ConfigError(f"--arm {w!r}: no such arm in {cells[0].ablation if cells else '?'}"
                              f"; allowed: {', '.join(labels)} (or just {', '.join(values)})")
        chosen.update(hits)
    return [c for k, c in arms.items() if k in chosen]


# --- storage ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Store:
    """Where the studies live: a journal file (``spec`` a path) or an RDB (``spec`` a URL)."""

    spec: str
    lock_dir: Path  # our file locks (admission, table creation) live here
    default: bool = False  # the journal beside the MLflow store: its folder may be created

    @property
    def is_journal(self) -> bool:
        return "://" not in self.spec

    @property
    def sqlite_path(self) -> Path | None:
        if self.spec.startswith("sqlite:///"):
            return Path(self.spec[len("sqlite:///"):])
        return None

    def describe(self) -> str:
        """The spec with any password masked: it goes to the console and to MLflow tags."""
        return re.sub(r"(://[^/:@]*:)[^/]*@", r"\1***@", self.spec)

    def lock(self, name: str, timeout: float = 600) -> Any:
        from filelock import FileLock

        self.lock_dir.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha1(name.encode()).hexdigest()[:12]
        return FileLock(str(self.lock_dir / f".ablate-sweep-{digest}.lock"), timeout=timeout)

    def open(self, *, create: bool = True) -> optuna.storages.BaseStorage | None:
        """The Optuna storage; None when it does not exist and ``create`` is False. An
        unreachable storage is a StoreError of one line, tested here, up front."""
        if self.is_journal:
            return self._open_journal(create)
        return self._open_rdb(create)

    def _open_journal(self, create: bool) -> Any:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(self.spec)
        if not path.exists():
            if not create:
                return None
            if not path.parent.is_dir():
                if not self.default:
                    raise StoreError(f"--storage {self.spec}: folder {path.parent} does not "
                                     "exist; create it or pass another --storage")
                path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as err:
            raise StoreError(f"--storage {self.spec}: {err.strerror or err}") from None

    def _open_rdb(self, create: bool) -> Any:
        url = self.spec
        db = self.sqlite_path
        if url.startswith("sqlite:") and db is None:
            raise StoreError(f"--storage {url}: give a file, e.g. sqlite:///mlruns/optuna.db; "
                             "an in-memory database is not shared between processes")
        if db is not None:
            if not db.exists() and not create:
                return None
            if not db.parent.is_dir():
                raise StoreError(f"--storage {url}: folder {db.parent} does not exist; create "
                                 "it or pass another --storage")
            # Several processes write one file: wait for SQLite's lock instead of failing.
            kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}
        else:
            kwargs = {"connect_args": {"connect_timeout": STORAGE_CONNECT_TIMEOUT},
                      "pool_pre_ping": True}
        try:
            if db is None:  # a network database: reachable? (before any lock file is made)
                import sqlalchemy

                engine = sqlalchemy.create_engine(url, **kwargs)
                with engine.connect():
                    pass
                engine.dispose()
            with self.lock("rdb-tables:" + url):  # two processes creating the tables at once
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except ImportError as err:
            module = err.name or str(err)
            package = _DRIVER_PACKAGES.get(module.split(".")[0], module)
            raise StoreError(f"--storage {self.describe()}: its database driver ({module}) is "
                             f"not installed; pip install {package}, or pass another --storage"
                             ) from None
        except Exception as err:  # sqlalchemy's OperationalError, ArgumentError, ...
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise StoreError(f"--storage {self.describe()} cannot be reached: {reason[:300]}"
                             ) from None


_DRIVER_PACKAGES = {"psycopg": "psycopg psycopg-binary", "psycopg2": "psycopg2-binary",
                    "MySQLdb": "mysqlclient", "pymysql": "pymysql"}


def resolve_store(storage: str | None, uri: str) -> Store:
    """``--storage`` as given, else ``optuna.journal`` beside a local MLflow store (or in
    ./mlruns when the tracking URI is a server)."""
    local = tracking.local_store_dir(uri)
    fallback = local or Path.cwd() / tracking.DEFAULT_STORE
    if not storage:
        return Store(str((fallback / JOURNAL_NAME).resolve()), fallback.resolve(), default=True)
    if "://" not in storage:
        path = Path(storage).expanduser().resolve()
        return Store(str(path), path.parent)
    db = Store(storage, fallback).sqlite_path
    return Store(storage, db.resolve().parent if db is not None and db.parent.is_dir()
                 else fallback.resolve())


def open_study(name: str, storage: Any, *, sampler: str = "tpe",
               pruner: str | optuna.pruners.BasePruner = "median") -> optuna.Study:
    return optuna.create_study(study_name=name, storage=storage, direction="minimize",
                               sampler=make_sampler(sampler), pruner=make_pruner(pruner),
                               load_if_exists=True)


def _quiet_optuna() -> None:
    import warnings

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial instead
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


# --- what a study holds -----------------------------------------------------------------


@dataclass(frozen=True)
class Best:
    lr: float
    weight_decay: float
    val_error: float
    trial: int
    run_id: str | None = None


def best_of(study: optuna.Study) -> Best | None:
    """The complete trial with the lowest error; diverged trials never count as best."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and t.value < DIVERGED_ERROR and not t.user_attrs.get(
                "diverged")]
    if not done:
        return None
    t = min(done, key=lambda t: (t.value, t.number))
    hp = hparams_of(t)
    return Best(hp["lr"], hp["weight_decay"], float(t.value), t.number,
                t.user_attrs.get("mlflow_run_id"))


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


def summarize(study: optuna.Study) -> StudySummary:
    trials = study.get_trials(deepcopy=False)

    def count(state: TrialState) -> int:
        return sum(t.state == state for t in trials)

    ablation, _, rest = study.study_name.partition("/")
    arm = rest.rpartition("/")[0] or rest
    return StudySummary(study.study_name, ablation, arm, count(TrialState.COMPLETE),
                        count(TrialState.PRUNED), count(TrialState.FAIL),
                        count(TrialState.RUNNING), study.user_attrs.get("sweep.target"),
                        best_of(study))


def claim_target(study: optuna.Study, trials: int, started: float,
                 now: float | None = None) -> int:
    """The total of finished-or-pruned trials this process works towards; the caller holds
    the study's lock. A sweep that was in progress when this process ``started`` is joined:
    its target is not reached and someone works on it (fresh heartbeat), or it was reached
    after we started. Otherwise the target is what is finished now plus ``trials``."""
    now = time.time() if now is None else now
    attrs = study.user_attrs
    finished = study.get_trials(deepcopy=False, states=FINISHED)
    done = len(finished)
    target = attrs.get("sweep.target")
    if isinstance(target, int):
        alive = now - float(attrs.get("sweep.heartbeat") or 0) < STALE_SECONDS
        if done < target and alive:
            return target
        last = max((t.datetime_complete.timestamp() for t in finished
                    if t.datetime_complete is not None), default=0.0)
        if done >= target and last > started:  # started together, and the other was quicker
            return target
    study.set_user_attr("sweep.target", done + trials)
    study.set_user_attr("sweep.heartbeat", now)
    return done + trials


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


def fail_stale_trials(study: optuna.Study, c: Any | None = None) -> list[int]:
    """RUNNING trials whose process is gone (this host) or silent (another host) become
    FAIL, and their MLflow runs KILLED, so they stop counting towards the target."""
    now = time.time()
    host = socket.gethostname()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = t.user_attrs
        if attrs.get("ablate.host") == host:
            stale = not _pid_alive(attrs.get("ablate.pid"))
        else:
            start = t.datetime_start.timestamp() if t.datetime_start else now
            stale = now - float(attrs.get("ablate.heartbeat") or start) > STALE_SECONDS
        if not stale:
            continue
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
            study.tell(t.number, state=TrialState.FAIL)
            failed.append(t.number)
        run_id = attrs.get("mlflow_run_id")
        if c is not None and run_id:
            with contextlib.suppress(Exception):
                tracking.set_tags(c, run_id, {"state": "fail", "failure_reason":
                                              "its process ended without finishing the trial"})
                c.set_terminated(run_id, status="KILLED")
    return failed


def record_best(study: optuna.Study, c: Any | None, parent_run_id: str | None) -> Best | None:
    """Keep the best values where --tuned, the dashboard and MLflow's UI find them."""
    best = best_of(study)
    if best is None:
        return None
    values = {"best_lr": best.lr, "best_weight_decay": best.weight_decay,
              "best_val_error": best.val_error, "best_trial": best.trial}
    for key, value in values.items():
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)
    if c is not None and parent_run_id:
        tracking.set_tags(c, parent_run_id, {**values, "best_run_id": best.run_id})
    return best


# --- MLflow: one sweep run per arm, one child run per trial -----------------------------


def _arm_tags(cell: Cell) -> dict[str, Any]:
    tags = {"ablation": cell.ablation, "arm": cell.arm_label,
            "claims": tracking.join_claims(cell.claims), "git_commit": tracking.git_commit()}
    tags.update({f"axis.{axis}": arm for axis, arm in cell.arms.items()})
    return tags


def _runs_lock(lock_dir: Path) -> Any:
    from filelock import FileLock

    lock_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(str(lock_dir / ".ablate-sweep-runs.lock"), timeout=600)


def sweep_parent_run(c: Any, uri: str, experiment_id: str, cell: Cell, study: str,
                     store: Store, lock_dir: Path, extra_tags: dict[str, Any]) -> str:
    """Find or create the arm's sweep run; under a file lock, so that two processes
    sweeping the same study at once share one."""
    with _runs_lock(lock_dir):
        found = c.search_runs([experiment_id], max_results=1,
                              filter_string=f"tags.`ablate.kind` = 'sweep' and "
                                            f"tags.study = '{study}'")
        if found:
            run_id = found[0].info.run_id
            c.update_run(run_id, status="RUNNING")
        else:
            run = c.create_run(experiment_id, tags={"ablate.kind": "sweep", "study": study,
                                                    "mlflow.runName": f"{cell.arm_label} sweep"})
            run_id = run.info.run_id
            tracking.log_params(c, run_id, cell.config.flat())
    tracking.set_tags(c, run_id, {**_arm_tags(cell), "storage": store.describe(),
                                  "config_key": cell.key, **extra_tags})
    return run_id


# --- one worker on one arm ---------------------------------------------------------------


@dataclass(frozen=True)
class ArmJob:
    """What a worker needs for one arm; picklable, for spawned processes."""

    cell: Cell  # the arm's untuned config at seed 0: every trial starts from it
    study: str
    target: int
    experiment_id: str
    parent_run_id: str


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
        if self.trials < 1:
            raise ConfigError(f"--trials {self.trials}: give at least 1")
        if self.jobs < 1:
            raise ConfigError(f"--jobs {self.jobs}: give at least 1")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"--timeout {self.timeout:g}: give a positive number of seconds")
        if not self.seeds:
            raise ConfigError("--seeds: give at least one seed")
        check_choice("--sampler", self.sampler, SAMPLERS)
        if isinstance(self.pruner, str):
            check_choice("--pruner", self.pruner, PRUNERS)


class _Heartbeat:
    """Keeps the study's ``sweep.heartbeat`` fresh while this process works on it (a
    process started meanwhile joins this sweep), and the running trial's too."""

    def __init__(self, study: optuna.Study) -> None:
        self.study = study
        self.lock = threading.Lock()
        self.trial: optuna.Trial | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def beat(self) -> None:
        now = time.time()
        with self.lock, contextlib.suppress(Exception):
            self.study.set_user_attr("sweep.heartbeat", now)
            if self.trial is not None:
                self.trial.set_user_attr("ablate.heartbeat", now)

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            self.beat()

    @contextlib.contextmanager
    def watching(self, trial: optuna.Trial) -> Iterator[None]:
        with self.lock:
            self.trial = trial
        try:
            yield
        finally:
            with self.lock:  # no heartbeat may land on a trial once it is told
                self.trial = None


@dataclass
class _TrialEnd:
    state: str  # complete | pruned | fail
    value: float | None = None
    epochs: int = 0
    reason: str | None = None


class ArmWorker:
    """Runs trials of one arm's study until its target is reached (or the deadline)."""

    def __init__(self, job: ArmJob, uri: str, store: Store, storage: Any, opts: SweepOptions,
                 deadline: float | None, echo: Echo) -> None:
        self.job, self.uri, self.store, self.opts = job, uri, store, opts
        self.deadline, self.echo = deadline, echo
        self.study = open_study(job.study, storage, sampler=opts.sampler,
                                pruner=opts.pruner)
        self.c = tracking.client(uri)
        self.lock = store.lock(job.study)

    def run(self) -> bool:
        """False when the arm stopped on repeated failures."""
        from alexnet.runner import open_data_once

        data = open_data_once(self.job.cell)
        failures = 0
        with _Heartbeat(self.study) as heartbeat:
            try:
                while self.deadline is None or time.time() < self.deadline:
                    admitted = self._admit()
                    if admitted is None:
                        return True
                    trial, hp = admitted
                    with heartbeat.watching(trial):
                        end = self._trial(trial, hp, data)
                    failures = failures + 1 if end.state == "fail" else 0
                    if failures >= MAX_CONSECUTIVE_FAILURES:
                        self.echo(f"{self.job.cell.arm_label}: {failures} trials failed in a "
                                  f"row ({end.reason}); stopping this arm")
                        return False
                return True
            finally:
                with self.lock:  # nobody left working: a new sweep starts its own target
                    if not self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                        with contextlib.suppress(Exception):
                            self.study.set_user_attr("sweep.heartbeat", 0)

    def _admit(self) -> tuple[optuna.Trial, dict[str, float]] | None:
        """A new trial while finished + pruned + running < target; atomic on this machine."""
        with self.lock:
            fail_stale_trials(self.study, self.c)
            taken = len(self.study.get_trials(
                deepcopy=False, states=(*FINISHED, TrialState.RUNNING)))
            if taken >= self.job.target:
                return None
            trial = self.study.ask()
            try:
                for key, value in {"ablate.host": socket.gethostname(),
                                   "ablate.pid": os.getpid(),
                                   "ablate.heartbeat": time.time()}.items():
                    trial.set_user_attr(key, value)
                hp = self.opts.space.suggest(trial)  # under the lock: the sampler sees
            except BaseException:  # every running trial (constant liar) before proposing
                with contextlib.suppress(Exception):
                    self.study.tell(trial, state=TrialState.FAIL)
                raise
            return trial, hp

    def _trial(self, trial: optuna.Trial, hp: dict[str, float], data: Any) -> _TrialEnd:
        from alexnet.train import train_run

        job = self.job
        t0 = time.perf_counter()
        run_id: str | None = None
        results: list[RunResult] = []
        epochs_seen, last_error = 0, None

        def on_epoch(m: EpochMetrics, offset: int) -> None:
            nonlocal epochs_seen, last_error
            step = offset + m.epoch  # several seeds: one after another on one step axis
            epochs_seen, last_error = epochs_seen + 1, m.val_error
            tracking.log_epoch(self.c, run_id, dataclasses.replace(m, epoch=step))
            trial.report(m.val_error, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {m.epoch}: validation error "
                                         f"{100 * m.val_error:.1f}%")

        try:
            cfg = with_values(job.cell.config, {f"optim.{k}": v for k, v in hp.items()},
                              where=f"trial {trial.number} of {job.study}")
            hp = {"lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay}
            run_id = self._start_run(trial, cfg)
            trial.set_user_attr("mlflow_run_id", run_id)
            trial.set_user_attr("effective_weight_decay", hp["weight_decay"])
            for i, seed in enumerate(self.opts.seeds):
                run_cfg = cfg if seed == cfg.seed else with_values(cfg, {"seed": seed},
                                                                   where=job.study)
                offset = i * cfg.train.epochs
                result = train_run(run_cfg, data=data,
                                   on_epoch=lambda m, o=offset: on_epoch(m, o))
                results.append(result)
                if result.status != "finished":
                    break
        except optuna.TrialPruned as pruned:
            self.study.tell(trial, state=TrialState.PRUNED)
            self._close_run(run_id, "pruned", "KILLED", {"pruned_reason": str(pruned)})
            end = _TrialEnd("pruned", last_error, epochs_seen)
            self._say(trial, hp, end, t0)
            return end
        except KeyboardInterrupt:
            self._fail(trial, run_id, "interrupted (Ctrl-C)", "KILLED")
            raise
        except Exception as err:  # a bug or out of memory: this trial fails, the sweep goes on
            reason = f"{type(err).__name__}: {err}"
            if run_id is not None:
                with contextlib.suppress(Exception):
                    _log_traceback(self.c, run_id)
            self._fail(trial, run_id, reason, "FAILED")
            end = _TrialEnd("fail", None, epochs_seen, reason)
            self._say(trial, hp, end, t0)
            return end
        value = objective(results)
        diverged = any(r.status != "finished" for r in results)
        if diverged:
            trial.set_user_attr("diverged", True)
        self.study.tell(trial, value)
        assert run_id is not None
        self._end_run(run_id, results, value, diverged)
        with self.lock:
            record_best(self.study, self.c, job.parent_run_id)
        end = _TrialEnd("complete", value, epochs_seen,
                        next((r.reason for r in results if r.reason), None))
        self._say(trial, hp, end, t0)
        return end

    def _fail(self, trial: optuna.Trial, run_id: str | None, reason: str, status: str) -> None:
        with contextlib.suppress(Exception):
            self.study.tell(trial, state=TrialState.FAIL)
        with contextlib.suppress(Exception):
            self._close_run(run_id, "fail", status, {"failure_reason": reason[:5000]})

    def _close_run(self, run_id: str | None, state: str, status: str,
                   tags: dict[str, Any]) -> None:
        if run_id is not None:
            tracking.set_tags(self.c, run_id, {"state": state, **tags})
            self.c.set_terminated(run_id, status=status)

    def _start_run(self, trial: optuna.Trial, cfg: RunConfig) -> str:
        job, c = self.job, self.c
        run = c.create_run(job.experiment_id, tags={"mlflow.parentRunId": job.parent_run_id})
        run_id = run.info.run_id
        tracking.log_params(c, run_id, {**cfg.flat(),
                                        **{f"trial.{k}": v for k, v in trial.params.items()}})
        tracking.set_tags(c, run_id, {
            **_arm_tags(job.cell), "ablate.kind": "trial", "study": job.study,
            "trial_number": trial.number, "state": "running", "config_key": cfg.key(),
            "seeds": ",".join(map(str, self.opts.seeds)), "storage": self.store.describe(),
            "mlflow.runName": f"{job.cell.arm_label} trial {trial.number}",
            **tracking.owner_tags()})
        return run_id

    def _end_run(self, run_id: str, results: list[RunResult], value: float,
                 diverged: bool) -> None:
        c = self.c
        finals = [r.final for r in results]
        keys = set.intersection(*(set(f) for f in finals)) if finals else set()
        merged = {k: sum(f[k] for f in finals) / len(finals) for k in keys}
        tracking.log_metrics(c, run_id, {**merged, "objective": value})
        tags: dict[str, Any] = {"state": "complete", "diverged": str(diverged).lower(),
                                "device": results[0].device if results else None}
        if diverged:
            tags["failure_reason"] = next(r.reason for r in results if r.status != "finished")
        tracking.set_tags(c, run_id, tags)
        c.set_terminated(run_id, status="FAILED" if diverged else "FINISHED")

    def _say(self, trial: optuna.Trial, hp: dict[str, float], end: _TrialEnd,
             t0: float) -> None:
        value = f"val err {100 * end.value:5.1f}%" if end.value is not None else "val err    - "
        self.echo(f"{self.job.cell.ablation} {self.job.cell.arm_label}  trial {trial.number:>3}  "
                  f"{end.state:<8} {value}  lr {hp['lr']:.2e}  wd {hp['weight_decay']:.1e}  "
                  f"{end.epochs} ep  {time.perf_counter() - t0:.1f}s"
                  + (f"  ({end.reason})" if end.reason and end.state != "pruned" else ""))


def _log_traceback(c: Any, run_id: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "traceback.txt"
        path.write_text(traceback.format_exc())
        c.log_artifact(run_id, str(path))


def objective(results: list[RunResult]) -> float:
    """The last epoch's validation top-1 error, averaged over seeds; a run that diverged
    (or ended before its first epoch) scores DIVERGED_ERROR."""
    values = []
    for r in results:
        if r.status != "finished" or not r.history:
            return DIVERGED_ERROR
        values.append(r.history[-1].val_error)
    return sum(values) / len(values) if values else DIVERGED_ERROR


def work(jobs: list[ArmJob], uri: str, store: Store, opts: SweepOptions,
         deadline: float | None, echo: Echo = _echo) -> bool:
    """Run every arm's trials in this process, arm after arm. False if an arm failed."""
    _quiet_optuna()
    storage = store.open(create=True)
    ok = True
    for job in jobs:
        ok = ArmWorker(job, uri, store, storage, opts, deadline, echo).run() and ok
    return ok


def _worker_main(jobs: list[ArmJob], uri: str, store: Store, opts: SweepOptions,
                 deadline: float | None, threads: int | None) -> None:
    """A spawned worker: its share of the CPU cores, then ``work``; the exit code says."""
    if threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    try:
        ok = work(jobs, uri, store, opts, deadline)
    except KeyboardInterrupt:
        sys.exit(130)
    except AblateError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    sys.exit(0 if ok else 1)


# --- the sweep ---------------------------------------------------------------------------


@dataclass
class SweepResult:
    summaries: list[StudySummary]
    failed_arms: list[str]


def preflight_data(cells: list[Cell], jobs: int) -> None:
    """Open each distinct dataset before anything is logged: bad data is bad input."""
    from alexnet.runner import open_data_once

    for cell in {c.config.data.model_dump_json(): c for c in cells}.values():
        if jobs == 1:
            open_data_once(cell)  # kept in memory for this process's trials
        else:
            import torch

            from alexnet.data import open_data

            open_data(cell.config.data, torch.device("cpu"))  # fills the on-disk cache


def run_sweep(arms: list[Cell], uri: str, store: Store, opts: SweepOptions, *,
              echo: Echo = _echo, extra_tags: dict[str, Any] | None = None,
              started: float | None = None) -> SweepResult:
    """Tune every arm in ``arms`` (one untuned seed-0 cell per arm), ``opts.jobs`` worker
    processes at a time, into ``store`` and the MLflow store at ``uri``. ``started``: when
    the command began (default now), to tell a sweep started together with ours."""
    started = time.time() if started is None else started
    _quiet_optuna()
    storage = store.open(create=True)  # unreachable → StoreError before anything runs
    preflight_data(arms, opts.jobs)
    lock_dir = tracking.local_store_dir(uri) or store.lock_dir
    c = tracking.client(uri)  # creates a new store under its own lock
    space = opts.space
    tags = {"sampler": opts.sampler,
            "pruner": opts.pruner if isinstance(opts.pruner, str) else type(opts.pruner).__name__,
            "lr_range": f"{space.lr[0]:g},{space.lr[1]:g}",
            "wd_range": space.describe_wd(),
            "seeds": ",".join(map(str, opts.seeds)), **(extra_tags or {})}
    opened = {study_name(cell): open_study(study_name(cell), storage) for cell in arms}
    for name, study in opened.items():  # one objective per study: the mean over these seeds
        swept = study.user_attrs.get("seeds")
        if swept is not None and list(swept) != list(opts.seeds):
            raise ConfigError(f"study {name} was swept with --seeds "
                              f"{','.join(map(str, swept))}; pass the same seeds, so that its "
                              "trials keep one objective")
    jobs: list[ArmJob] = []
    for cell in arms:
        name = study_name(cell)
        study = opened[name]
        with store.lock(name):
            target = claim_target(study, opts.trials, started)
            for key, value in {"ablation": cell.ablation, "arm": cell.arm_label,
                               "config_key": cell.key, "seeds": list(opts.seeds),
                               "lr_range": list(space.lr),
                               "wd_range": space.describe_wd()}.items():
                if study.user_attrs.get(key) != value:
                    study.set_user_attr(key, value)
        exp_id = tracking.get_experiment_id(c, uri, cell.ablation)
        parent = sweep_parent_run(c, uri, exp_id, cell, name, store, lock_dir, tags)
        jobs.append(ArmJob(cell, name, target, exp_id, parent))
        echo(f"{name}: {target} finished-or-pruned trials wanted "
             f"({len(study.get_trials(deepcopy=False, states=FINISHED))} so far)")
    deadline = time.time() + opts.timeout if opts.timeout else None
    try:
        if opts.jobs == 1:
            workers_ok = work(jobs, uri, store, opts, deadline, echo)
        else:
            workers_ok = _run_processes(jobs, uri, store, opts, deadline)
    except KeyboardInterrupt:
        for job in jobs:  # trials of workers that died mid-way fail; a new sweep starts afresh
            with contextlib.suppress(Exception), store.lock(job.study, timeout=10):
                study = optuna.load_study(study_name=job.study, storage=storage)
                fail_stale_trials(study, c)
                if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                    study.set_user_attr("sweep.heartbeat", 0)
            with contextlib.suppress(Exception):
                c.set_terminated(job.parent_run_id, status="KILLED")
        raise
    summaries, failed = [], []
    for job in jobs:
        study = optuna.load_study(study_name=job.study, storage=storage)
        with store.lock(job.study):
            record_best(study, c, job.parent_run_id)
        s = summarize(study)
        summaries.append(s)
        # Short of the target with nothing left running (trials of another process may
        # still be): this sweep stopped on failures, not on its deadline.
        short = s.complete + s.pruned + s.running < job.target and deadline is None
        if short:
            failed.append(job.cell.arm_label)
        tracking.set_tags(c, job.parent_run_id, {"trials_complete": s.complete,
                                                 "trials_pruned": s.pruned,
                                                 "trials_failed": s.failed})
        c.set_terminated(job.parent_run_id, status="FAILED" if short else "FINISHED")
    if not workers_ok and not failed:
        failed.append("(a worker process)")
    return SweepResult(summaries, failed)


def _run_processes(jobs: list[ArmJob], uri: str, store: Store, opts: SweepOptions,
                   deadline: float | None) -> bool:
    from alexnet.runner import threads_per_job

    ctx = mp.get_context("spawn")  # fork after torch and MLflow have threads is unsafe
    threads = threads_per_job(opts.jobs, jobs[0].cell.config.runtime.device)
    procs = [ctx.Process(target=_worker_main, args=(jobs, uri, store, opts, deadline, threads),
                         name=f"ablate-sweep-{i}") for i in range(opts.jobs)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:  # the workers got the same Ctrl-C; let them mark their trials
        for p in procs:
            p.join(timeout=30)
        raise
    return all(p.exitcode == 0 for p in procs)


# --- reading studies: --show and --tuned --------------------------------------------------


def list_studies(store: Store, ablations: list[str]) -> list[StudySummary]:
    """Every study of these ablations in ``store`` (none if the storage does not exist)."""
    _quiet_optuna()
    storage = store.open(create=False)
    if storage is None:
        return []
    names = sorted(n for n in optuna.get_all_study_names(storage)
                   if n.partition("/")[0] in ablations)
    return [summarize(optuna.load_study(study_name=n, storage=storage)) for n in names]


def _looks_quick(cfg: RunConfig) -> bool:
    flat = cfg.flat()
    return all(flat.get(k) == v for k, v in quick_overrides().items() if k.startswith("data."))


def _best_from_mlflow(uri: str, ablation: str, study: str) -> Best | None:
    """The best values a sweep run carries as tags: the fallback where the Optuna storage
    is not on this machine but the tracking server is."""
    store = tracking.local_store_dir(uri)
    if store is not None and not (store / tracking.DB_NAME).exists():
        return None
    c = tracking.client(uri)
    exp_id = tracking.get_experiment_id(c, uri, ablation, create=False)
    if exp_id is None:
        return None
    runs = c.search_runs([exp_id], max_results=1, filter_string=(
        f"tags.`ablate.kind` = 'sweep' and tags.study = '{study}'"))
    tags = runs[0].data.tags if runs else {}
    if "best_lr" not in tags:
        return None
    return Best(float(tags["best_lr"]), float(tags["best_weight_decay"]),
                float(tags["best_val_error"]), int(tags["best_trial"]), tags.get("best_run_id"))


def apply_tuned(cells: list[Cell], tracking_uri: str, storage: str | None = None) -> list[Cell]:
    """Each cell at its arm's best lr and weight decay from ``ablate sweep`` (Section 3.1:
    learning rates chosen separately for each net). The config is validated again, so the
    cell key changes with the values; ``tuned`` records them. A ConfigError names the
    study that is missing."""
    _quiet_optuna()
    store = resolve_store(storage, tracking_uri)
    opened = store.open(create=False)
    names = set(optuna.get_all_study_names(opened)) if opened is not None else set()
    found: dict[str, Best | None] = {}
    out = []
    for cell in cells:
        name = study_name(cell)
        if name not in found:
            best = None
            if name in names:
                best = best_of(optuna.load_study(study_name=name, storage=opened))
            found[name] = best or _best_from_mlflow(tracking_uri, cell.ablation, name)
        best = found[name]
        if best is None:
            raise ConfigError(_missing_sweep(cell, name, store, name in names, names))
        tuned = {"lr": best.lr, "weight_decay": best.weight_decay}
        cfg = with_values(cell.config, {"optim.lr": best.lr,
                                        "optim.weight_decay": best.weight_decay},
                          where=f"--tuned {cell.arm_label} (study {name})")
        out.append(dataclasses.replace(cell, config=cfg, tuned=tuned))
    return out


def _missing_sweep(cell: Cell, name: str, store: Store, exists: bool, names: set[str]) -> str:
    command = f"ablate sweep {cell.ablation}{' --quick' if _looks_quick(cell.config) else ''}"
    if exists:
        return (f"the sweep of arm {cell.arm_label} of {cell.ablation} (study {name}) has no "
                f"finished trial that did not diverge; run `{command} --trials 10` to add some")
    prefix = f"{cell.ablation}/{cell.arm_label}/"
    others = sorted(n[len(prefix):] for n in names if n.startswith(prefix))
    hint = (f" (this arm was swept with other options: config {', '.join(others)}; sweep with "
            "the same --quick/--set/--epochs as this run)" if others else "")
    return (f"no sweep for arm {cell.arm_label} of {cell.ablation} (study {name} in "
            f"{store.describe()}); run `{command}` first{hint}")
