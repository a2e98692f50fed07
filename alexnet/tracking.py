"""MLflow runs: how a run is found, claimed, opened, kept alive and closed.

MLflow is the system of record: the report reads everything it shows from here.
Schema of the runs (the report and the sweep rely on these names):
  tags     ablate.kind=cell|grid|sweep|trial|ensemble, ablation, arm ("activation=tanh"),
           axis.<axis>, seed, cell_key (cells; trials carry config_key), ablate.grid_key,
           claims, git_commit, dataset_fingerprint, device, tuned, failure_reason,
           diverged, ablate.reused_from (a finished run of the same cell, reused),
           ablate.host / ablate.pid / ablate.heartbeat_ms (who runs it, and that it lives)
  params   every resolved config value under its dotted key
  metrics  per epoch (step = epoch): train_loss, train_error, val_loss, val_error,
           val_error_top5, lr, images_per_second, epoch_seconds; at the end: final_*,
           best_val_error, epochs_to_target, train_seconds, epochs_completed, test_*

One staleness rule for every run and claim (``is_stale``): the process that owns it is gone
(same host: its pid is dead) or silent (another host: no heartbeat for STALE_SECONDS).
Optuna's trial heartbeats use the same two numbers.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from alexnet.store import HEARTBEAT_SECONDS, STALE_SECONDS, artifact_root

EPOCH_METRICS = ("train_loss", "train_error", "val_loss", "val_error", "val_error_top5", "lr",
                 "images_per_second", "epoch_seconds")
CLAIMS_EXPERIMENT = "ablate-claims"


def now_ms() -> int:
    return int(time.time() * 1000)


# --- experiments and lookups ------------------------------------------------------------


def get_experiment_id(c: Any, uri: str, name: str, *, create: bool = True,
                      tags: dict[str, str] | None = None) -> str | None:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if not create:
        return None
    from mlflow.exceptions import MlflowException

    try:
        return c.create_experiment(name, artifact_location=artifact_root(uri, name),
                                   tags=tags)
    except MlflowException:  # another process created it first
        return c.get_experiment_by_name(name).experiment_id


def set_experiment_tags(c: Any, exp_id: str, tags: dict[str, str]) -> None:
    """Set ``tags`` on an experiment that other processes may be tagging at the same moment.

    MLflow's SQL store sets a tag with a read, then an insert or update: two processes
    inserting the same new key collide on its unique key (seen with two shells starting one
    grid on PostgreSQL). The loser tries again, when the row exists and it is an update."""
    from mlflow.exceptions import MlflowException

    current = c.get_experiment(exp_id).tags
    for key, value in tags.items():
        if current.get(key) == value:
            continue
        for attempt in range(3):
            try:
                c.set_experiment_tag(exp_id, key, value)
                break
            except MlflowException:
                if attempt == 2:
                    raise
                time.sleep(0.1 * (attempt + 1))


def experiment_ids(c: Any) -> list[str]:
    return [e.experiment_id for e in c.search_experiments(max_results=50000)]


def cell_runs(c: Any, experiment_ids: list[str], cell_key: str | None = None) -> list[Any]:
    """Cell runs (never trials or grids), of one cell when ``cell_key`` is given."""
    query = "tags.`ablate.kind` = 'cell'"
    if cell_key is not None:
        query += f" and tags.cell_key = '{cell_key}'"
    return c.search_runs(experiment_ids, filter_string=query, max_results=50000)


# --- who owns a run, and whether it still lives --------------------------------------------


def owner_tags() -> dict[str, str]:
    return {"ablate.host": socket.gethostname(), "ablate.pid": str(os.getpid()),
            "ablate.heartbeat_ms": str(now_ms())}


def process_gone(host: str, pid: str, last_sign_ms: int, now: int | None = None) -> bool:
    """The one staleness rule: a process of this host is gone when its pid is dead; one of
    another host when it has given no sign of life for STALE_SECONDS."""
    if host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
        except (ProcessLookupError, ValueError):
            return True
        except PermissionError:
            return False
        return False
    return (now or now_ms()) - last_sign_ms > STALE_SECONDS * 1000


def is_stale(run: Any, now: int | None = None) -> bool:
    """A RUNNING run whose process is gone (see ``process_gone``)."""
    if run.info.status != "RUNNING":
        return False
    tags = run.data.tags
    beat = tags.get("ablate.heartbeat_ms")
    last = int(beat) if beat and beat.isdigit() else run.info.start_time
    return process_gone(tags.get("ablate.host", ""), tags.get("ablate.pid", "0"), last, now)


def close_stale_runs(c: Any, experiment_id: str, kinds: Iterable[str] = ("grid", "sweep")
                     ) -> int:
    """Mark RUNNING runs of dead processes KILLED, so that nothing stays RUNNING forever.
    Cell runs are left to their next claimant, which resumes them."""
    closed = 0
    for kind in kinds:
        for run in c.search_runs([experiment_id], filter_string=(
                f"tags.`ablate.kind` = '{kind}' and attributes.status = 'RUNNING'"),
                max_results=10000):
            if is_stale(run):
                fail_run(c, run.info.run_id, "its process ended without closing it", "KILLED")
                closed += 1
    return closed


class Heartbeat:
    """Refreshes a run's ``ablate.heartbeat_ms`` every HEARTBEAT_SECONDS from a thread, and,
    for a claimed cell, notices when another process has taken the claim over (``lost``)."""

    def __init__(self, c: Any, run_id: str, claim: Claim | None = None) -> None:
        self.c, self.run_id, self.claim = c, run_id, claim
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="ablate-heartbeat")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(Exception):  # a missed beat is not worth a crash
                set_tags(self.c, self.run_id, {"ablate.heartbeat_ms": now_ms()})
                if self.claim is not None and not claim_is_current(self.c, self.claim):
                    self.lost = True


# --- claims: which process trains a cell ---------------------------------------------------
# Claims live in the store itself, so that any number of processes or machines sharing it
# agree. MLflow params are immutable: logging a param that exists with another value fails,
# atomically, in every store (SQL primary key, or the tracking server doing the same). A
# claim of cell K is the param ``claim.K.N`` = this process's token on one registry run;
# attempt N+1 takes over a stale attempt N, and only one process can log it.


@dataclass(frozen=True)
class Claim:
    key: str
    attempt: int
    token: str


def _token() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{now_ms()}:{uuid.uuid4().hex[:8]}"


_REGISTRY: dict[str, str] = {}  # tracking URI -> the registry run's id, once looked up


def registry_run_id(c: Any) -> str:
    """The run whose params hold every claim of the store, created once per store.

    The process that creates the claims experiment (an atomic create: names are unique)
    creates the registry run and names it in an experiment tag; others wait for the tag. A
    creator that died in between leaves no tag: the experiment is renamed aside and the
    race run again."""
    from mlflow.exceptions import MlflowException

    uri = c.tracking_uri
    if uri in _REGISTRY:
        return _REGISTRY[uri]
    for _ in range(3):
        exp = c.get_experiment_by_name(CLAIMS_EXPERIMENT)
        if exp is None:
            try:
                exp_id = c.create_experiment(CLAIMS_EXPERIMENT, tags={"mlflow.note.content": (
                    "Bookkeeping of ablate: which process trains which cell, one param per "
                    "claim. Keep it: deleting it lets two processes train the same cell.")})
            except MlflowException:
                continue  # another process created it: read its tag
            run = c.create_run(exp_id, tags={"mlflow.runName": "cell claims",
                                             "ablate.kind": "claims"})
            c.set_terminated(run.info.run_id)  # params can still be logged: it is not deleted
            c.set_experiment_tag(exp_id, "ablate.registry_run", run.info.run_id)
            _REGISTRY[uri] = run.info.run_id
            return run.info.run_id
        for _ in range(100):
            run_id = exp.tags.get("ablate.registry_run")
            if run_id:
                _REGISTRY[uri] = run_id
                return run_id
            time.sleep(0.1)
            exp = c.get_experiment(exp.experiment_id)
        c.rename_experiment(exp.experiment_id, f"{CLAIMS_EXPERIMENT}-abandoned-{exp.experiment_id}")
    raise RuntimeError("could not set up the claims registry of this store")


def _attempts(params: dict[str, str], key: str) -> dict[int, str]:
    prefix = f"claim.{key}."
    return {int(k[len(prefix):]): v for k, v in params.items()
            if k.startswith(prefix) and k[len(prefix):].isdigit()}


def _holder_lives(c: Any, params: dict[str, str], key: str, attempt: int) -> bool:
    token = params[f"claim.{key}.{attempt}"]
    run_id = params.get(f"claim.{key}.{attempt}.run")
    if run_id:
        from mlflow.exceptions import MlflowException

        try:
            run = c.get_run(run_id)
        except MlflowException:
            return False
        return run.info.status == "RUNNING" and not is_stale(run)
    host, pid, since, _ = token.rsplit(":", 3)
    return not process_gone(host, pid, int(since))


def claim_cell(c: Any, key: str) -> Claim | None:
    """Claim cell ``key`` for this process, or None while another live process holds it."""
    from mlflow.exceptions import MlflowException

    registry = registry_run_id(c)
    params = c.get_run(registry).data.params
    attempts = _attempts(params, key)
    last = max(attempts, default=0)
    if last and _holder_lives(c, params, key, last):
        return None
    claim = Claim(key, last + 1, _token())
    try:
        c.log_param(registry, f"claim.{key}.{claim.attempt}", claim.token)
    except MlflowException:
        return None  # another process logged this attempt first
    return claim if claim_is_current(c, claim) else None


def claim_is_current(c: Any, claim: Claim) -> bool:
    params = c.get_run(registry_run_id(c)).data.params
    attempts = _attempts(params, claim.key)
    return attempts.get(claim.attempt) == claim.token and max(attempts) == claim.attempt


def bind_claim(c: Any, claim: Claim, run_id: str) -> None:
    """Name the run that works on the claim, whose heartbeat then says whether it lives."""
    c.log_param(registry_run_id(c), f"claim.{claim.key}.{claim.attempt}.run", run_id)


def once(c: Any, key: str, create: Callable[[], str], wait_seconds: float = 30) -> str:
    """The run id that ``create`` made for ``key``, made by exactly one process of all that
    ask (the first to claim ``key``); the others wait for it."""
    registry = registry_run_id(c)
    name = f"once.{key}"
    claim = claim_cell(c, name)
    if claim is not None and f"{name}.run" not in c.get_run(registry).data.params:
        run_id = create()
        c.log_param(registry, f"{name}.run", run_id)
        return run_id
    deadline = time.time() + wait_seconds
    while time.time() < deadline:
        run_id = c.get_run(registry).data.params.get(f"{name}.run")
        if run_id:
            return run_id
        time.sleep(0.2)
    raise RuntimeError(f"the process creating the run for {key} did not finish")


# --- logging -------------------------------------------------------------------------------


@cache
def git_commit() -> str | None:
    """The commit of the project's source, where it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out + ("-dirty" if dirty else "") if out else None


def log_params(c: Any, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    c.log_batch(run_id, params=[Param(k, "None" if v is None else str(v))
                                for k, v in params.items()])


def log_metrics(c: Any, run_id: str, values: dict[str, float], step: int | None = None) -> None:
    from mlflow.entities import Metric

    ts = now_ms()
    metrics = [Metric(k, float(v), ts, step or 0) for k, v in values.items() if v is not None]
    if metrics:
        c.log_batch(run_id, metrics=metrics)


def set_tags(c: Any, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
    if items:
        c.log_batch(run_id, tags=items)


def join_claims(claims: Iterable[str]) -> str:
    return ",".join(claims)


def cell_tags(cell: Any, kind: str = "cell") -> dict[str, Any]:
    """The tags that make a cell's run findable: by ablation, arm, axis, seed and key."""
    tags = {"ablate.kind": kind, "ablation": cell.ablation, "arm": cell.arm_label,
            "seed": cell.seed, "cell_key" if kind == "cell" else "config_key": cell.key,
            "ablate.grid_key": cell.grid_key, "claims": join_claims(cell.claims),
            "git_commit": git_commit(), "tuned": "true" if cell.tuned else "false",
            "mlflow.runName": f"{cell.arm_label} seed={cell.seed}"}
    tags.update({f"axis.{axis}": arm for axis, arm in cell.arms.items()})
    return tags


def start_cell_run(c: Any, experiment_id: str, cell: Any, *, parent_run_id: str | None,
                   resume_run_id: str | None = None, extra_tags: dict[str, Any] | None = None,
                   kind: str = "cell") -> str:
    """Open a RUNNING run for ``cell`` (or reopen ``resume_run_id``) with its params and tags."""
    if resume_run_id is None:
        run = c.create_run(experiment_id)
        run_id = run.info.run_id
        log_params(c, run_id, cell.config.flat())
    else:
        run_id = resume_run_id
        c.update_run(run_id, status="RUNNING")
    parent = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
    set_tags(c, run_id, {**cell_tags(cell, kind), **parent, **owner_tags(), **(extra_tags or {})})
    return run_id


def log_epoch(c: Any, run_id: str, metrics: Any, step: int | None = None) -> None:
    """Per-epoch metrics at step = epoch (or ``step``), which also say the run is alive."""
    values = metrics.as_dict()
    log_metrics(c, run_id, {k: values[k] for k in EPOCH_METRICS}, step=step or metrics.epoch)


def end_cell_run(c: Any, run_id: str, result: Any) -> None:
    """FINISHED with the final metrics, or FAILED with the reason as a tag."""
    log_metrics(c, run_id, result.final)
    tags: dict[str, Any] = {"device": result.device,
                            "diverged": "true" if result.status == "diverged" else "false"}
    if result.status != "finished":
        tags["failure_reason"] = result.reason
    set_tags(c, run_id, tags)
    c.set_terminated(run_id, status="FINISHED" if result.status == "finished" else "FAILED")


def fail_run(c: Any, run_id: str, reason: str, status: str = "FAILED") -> None:
    set_tags(c, run_id, {"failure_reason": reason[:5000]})
    c.set_terminated(run_id, status=status)


@contextlib.contextmanager
def artifact_dir(c: Any, run_id: str) -> Iterator[Path]:
    """A local folder whose files become the run's artifacts when the block ends."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)
        if any(Path(tmp).iterdir()):
            c.log_artifacts(run_id, tmp)
