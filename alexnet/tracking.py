"""MLflow: where the store is, and how a cell's run is found, opened, logged and closed.

MLflow is the system of record: the report reads everything it shows from here.
Schema of a cell's run (the report and the sweep rely on these names):
  tags     ablate.kind=cell|grid|sweep|trial, ablation, arm ("activation=tanh"), axis.<axis>,
           seed, cell_key, claims, git_commit, dataset_fingerprint, device, tuned,
           failure_reason (FAILED runs), diverged
  params   every resolved config value under its dotted key
  metrics  per epoch (step = epoch): train_loss, train_error, val_loss, val_error,
           val_error_top5, lr, images_per_second, epoch_seconds; at the end: final_*,
           best_val_error, epochs_to_target, train_seconds, epochs_completed
"""

from __future__ import annotations

import os
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from alexnet.errors import StoreError

DEFAULT_STORE = "mlruns"
DB_NAME = "mlflow.db"

EPOCH_METRICS = ("train_loss", "train_error", "val_loss", "val_error", "val_error_top5", "lr",
                 "images_per_second", "epoch_seconds")


def tracking_uri(uri: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db (SQLite)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(Path.cwd() / DEFAULT_STORE / DB_NAME).resolve()}"


def local_store_dir(uri: str) -> Path | None:
    """The folder holding a SQLite store (artifacts and checkpoints live beside it)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent
    return None


def artifact_root(uri: str, experiment: str) -> str | None:
    """Artifacts beside a local SQLite database, so the store is one folder; a server
    decides for itself (None)."""
    store = local_store_dir(uri)
    return (store / "artifacts" / experiment).resolve().as_uri() if store else None


def checkpoint_dir(uri: str) -> Path:
    """Per-epoch resume checkpoints: inside a local store, else in the user's cache."""
    store = local_store_dir(uri)
    if store is not None:
        return store / "checkpoints"
    cache_root = os.environ.get("ALEXNET_CACHE") or Path.home() / ".cache" / "alexnet-ablate"
    return Path(cache_root) / "checkpoints"


def check_store(uri: str, *, create: bool = True) -> None:
    """Fail fast, with one line, when the store cannot be reached. Touches nothing."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
                if resp.status >= 400:
                    raise StoreError(f"tracking URI {uri} answered HTTP {resp.status}")
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise StoreError(f"tracking URI {uri} cannot be reached ({reason}); start the server "
                             "or pass another --tracking-uri") from None
        return
    store = local_store_dir(uri)
    if store is not None:
        default = store.resolve() == (Path.cwd() / DEFAULT_STORE).resolve()
        if not store.is_dir() and not (create and default):
            raise StoreError(f"tracking URI {uri}: folder {store} does not exist; create it or "
                             "pass another --tracking-uri")
        return
    if parsed.scheme in ("", "file"):
        raise StoreError(f"tracking URI {uri}: use a database URI such as sqlite:///path/mlflow.db "
                         "or an http(s):// tracking server")


def client(uri: str) -> Any:
    """An MlflowClient on ``uri``, creating a local default store's folder if needed."""
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    store = local_store_dir(uri)
    if store is None:
        return MlflowClient(tracking_uri=uri)
    store.mkdir(parents=True, exist_ok=True)
    # Two processes creating a new SQLite store at once make MLflow fail ("duplicate
    # column name"): the first creates the tables under the lock, the rest wait for it.
    with FileLock(str(store / ".create.lock"), timeout=600):
        c = MlflowClient(tracking_uri=uri)
        c.search_experiments(max_results=1)  # creates and migrates the tables
    return c


def get_experiment_id(c: Any, uri: str, name: str, *, create: bool = True) -> str | None:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if not create:
        return None
    from mlflow.exceptions import MlflowException

    try:
        return c.create_experiment(name, artifact_location=artifact_root(uri, name))
    except MlflowException:  # another process created it first
        return c.get_experiment_by_name(name).experiment_id


def runs_for_key(c: Any, experiment_id: str, cell_key: str) -> list[Any]:
    return c.search_runs([experiment_id], filter_string=f"tags.cell_key = '{cell_key}'",
                         max_results=1000)


def cell_runs(c: Any, experiment_id: str) -> list[Any]:
    return c.search_runs([experiment_id], filter_string="tags.`ablate.kind` = 'cell'",
                         max_results=50000)


# --- run ownership: a RUNNING run whose process is gone is stale --------------------------

STALE_AFTER_SECONDS = 30 * 60  # another host's run with no heartbeat for this long


def owner_tags() -> dict[str, str]:
    return {"ablate.host": socket.gethostname(), "ablate.pid": str(os.getpid())}


def is_stale(run: Any, now_ms: int) -> bool:
    """A RUNNING run is stale when its process is gone (same host) or silent (elsewhere)."""
    if run.info.status != "RUNNING":
        return False
    tags = run.data.tags
    if tags.get("ablate.host") == socket.gethostname():
        try:
            os.kill(int(tags.get("ablate.pid", "0")), 0)
        except (ProcessLookupError, ValueError):
            return True
        except PermissionError:
            return False
        return False
    heartbeat = tags.get("ablate.heartbeat_ms")
    last = int(heartbeat) if heartbeat else run.info.start_time
    return now_ms - last > STALE_AFTER_SECONDS * 1000


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

    items = [Param(k, "None" if v is None else str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        c.log_batch(run_id, params=items[i:i + 100])


def log_metrics(c: Any, run_id: str, values: dict[str, float], step: int | None = None) -> None:
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
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


# --- a cell's run ------------------------------------------------------------------------


def cell_tags(cell: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The tags that make a cell's run findable: by ablation, arm, axis, seed and key."""
    tags = {"ablate.kind": "cell", "ablation": cell.ablation, "arm": cell.arm_label,
            "seed": cell.seed, "cell_key": cell.key, "ablate.grid_key": cell.grid_key,
            "claims": join_claims(cell.claims),
            "git_commit": git_commit(), "tuned": "true" if cell.tuned else "false",
            "mlflow.runName": f"{cell.arm_label} seed={cell.seed}"}
    tags.update({f"axis.{axis}": arm for axis, arm in cell.arms.items()})
    tags.update(extra or {})
    return tags


def start_cell_run(c: Any, experiment_id: str, cell: Any, *, parent_run_id: str | None,
                   resume_run_id: str | None = None, extra_tags: dict[str, Any] | None = None
                   ) -> str:
    """Open a RUNNING run for ``cell`` (or reopen ``resume_run_id``) with its params and tags."""
    import time

    if resume_run_id is None:
        tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
        run = c.create_run(experiment_id, tags=tags)
        run_id = run.info.run_id
        log_params(c, run_id, cell.config.flat())
    else:
        run_id = resume_run_id
        c.update_run(run_id, status="RUNNING")
    set_tags(c, run_id, {**cell_tags(cell, extra_tags), **owner_tags(),
                         "ablate.heartbeat_ms": int(time.time() * 1000)})
    return run_id


def log_epoch(c: Any, run_id: str, metrics: Any) -> None:
    """Per-epoch metrics at step = epoch, and a heartbeat so others see the run is alive."""
    import time

    values = metrics.as_dict()
    log_metrics(c, run_id, {k: values[k] for k in EPOCH_METRICS}, step=metrics.epoch)
    set_tags(c, run_id, {"ablate.heartbeat_ms": int(time.time() * 1000)})


def end_cell_run(c: Any, run_id: str, result: Any) -> None:
    """FINISHED with the final metrics, or FAILED with the reason as a tag."""
    log_metrics(c, run_id, result.final)
    tags: dict[str, Any] = {"device": result.device,
                            "diverged": "true" if result.status == "diverged" else "false"}
    if result.status != "finished":
        tags["failure_reason"] = result.reason
    set_tags(c, run_id, tags)
    c.set_terminated(run_id, status="FINISHED" if result.status == "finished" else "FAILED")


def fail_cell_run(c: Any, run_id: str, reason: str, status: str = "FAILED") -> None:
    set_tags(c, run_id, {"failure_reason": reason[:5000]})
    c.set_terminated(run_id, status=status)
