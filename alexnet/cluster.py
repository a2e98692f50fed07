"""Cells on a Ray cluster: the executor behind ``--executor ray``.

Each task (a grid cell, or a sweep worker of one arm) is a Ray task asking for the resources
one cell needs: a fraction of a GPU where several cells fit on one (``--gpus-per-cell``, else
estimated from the model and the batch), CPUs otherwise (``--cpus-per-cell``). Without
``--ray-address`` Ray starts a cluster on this machine, so the same command runs on a laptop
and on a cluster (``--ray-address auto`` or ``ray://HOST:10001``).

What makes a cluster safe is the store, not Ray: a cell is claimed in the MLflow store
(tracking.claim_cell) and checkpointed as an artifact of its own run (runner.
ArtifactCheckpoint), so a task that Ray retries after its node died resumes the cell from its
last epoch, and a second grid started elsewhere trains nothing twice. Ctrl-C cancels the
tasks: each running cell gets KeyboardInterrupt, ends KILLED and resumes on the next run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from alexnet.errors import ConfigError
from alexnet.executors import Emit, OnDone, TaskFn, WorkerDied

INSTALL_HINT = 'pip install "alexnet-ablate[cluster]" (in a checkout: pip install -e ".[cluster]")'
# A task Ray runs again when its worker process or node dies (never when the cell raises: a
# failed cell is a FAILED run, not a reason to train again).
MAX_RETRIES = 3
# Variables the cells' processes need to agree with this one on (how soon a silent cell counts
# as gone; MLflow's quiet switches, ui_server.quiet_mlflow); the rest of each node's
# environment is its own.
FORWARDED_ENV = ("ALEXNET_HEARTBEAT_SECONDS", "MLFLOW_DISABLE_TELEMETRY",
                 "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
# GPU share estimate: cells per GPU = this memory over a cell's estimate, at most MAX_PER_GPU
# (beyond that they queue for the GPU's compute anyway).
ASSUMED_GPU_BYTES = 16 * 2**30  # the smallest GPU commonly trained on; --gpus-per-cell else
PROCESS_BYTES = 2**30  # a CUDA context, the device-resident data, the allocator's slack
MAX_PER_GPU = 8
CANCEL_WAIT_SECONDS = 30  # for cancelled cells to mark their runs KILLED


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--executor ray needs Ray, which is not installed; {INSTALL_HINT}"
                          ) from None
    return ray


@dataclass(frozen=True)
class CellResources:
    """What each task asks Ray for."""

    num_cpus: float = 1
    num_gpus: float = 0


def connect(address: str | None) -> Any:
    """Ray, connected to the cluster at ``address`` (``auto``, ``HOST:PORT``, ``ray://...``),
    or to a new one on this machine when ``address`` is None."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True,
                               "runtime_env": {"env_vars": env} if env else None}
    handler = signal.getsignal(signal.SIGTERM)  # ray.init replaces it; the CLI's stays
    try:
        if address is None:
            # "local": a new cluster even when `ray start` left one running here. Ray says it
            # protects it with a token (~/.ray/auth_token): not news for a cluster of one command.
            logging.getLogger("ray._private.authentication.authentication_token_setup"
                              ).setLevel(logging.ERROR)
            ray.init(address="local", include_dashboard=False, **options)
        else:
            ray.init(address=address, **options)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--ray-address {address}: no Ray cluster there ({reason[:200]}); "
                          "start one (ray start --head) or leave --ray-address out to run "
                          "on a Ray cluster of this machine") from None
    finally:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)
    return ray


# --- what a cell asks for ----------------------------------------------------------------


def check_gpus_per_cell(value: float) -> float:
    """Ray shares a GPU in fractions below one and gives whole GPUs above."""
    if not (math.isfinite(value) and value > 0) or (value > 1 and value != int(value)):
        raise ConfigError(f"--gpus-per-cell {value:g}: give a fraction of one GPU (0.25 puts "
                          "four cells on each) or a whole number of GPUs")
    return value


def cell_gpu_bytes(cell: Any) -> int:
    """A cell's GPU memory, roughly: weights, gradients and momentum (4 bytes each, and a copy
    in flight), every layer's fp32 output kept for the backward pass and its gradient, times
    the batch, and a process's fixed share."""
    import torch

    from alexnet.models import build_model_from_config
    from alexnet.models.summary import describe_model

    cfg = cell.config
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        model = build_model_from_config(cfg.model, 1000)  # the widest classifier of any data
        rows = describe_model(model, cfg.data.crop_size)
    per_image = sum(math.prod(r.output_shape[1:]) for r in rows)
    params = sum(p.numel() for p in model.parameters())
    return PROCESS_BYTES + 16 * params + 8 * per_image * cfg.train.batch_size


def estimate_gpus_per_cell(cells: Sequence[Any]) -> float:
    """The share of a GPU that fits the largest of ``cells``: 1/n for n cells per GPU."""
    largest = max(cell_gpu_bytes(c) for c in {c.config.model_dump_json(): c
                                                 for c in cells}.values())
    per_gpu = min(MAX_PER_GPU, max(1, ASSUMED_GPU_BYTES // largest))
    return round(1 / per_gpu, 4)  # Ray keeps four decimals


def plan_resources(ray: Any, cells: Sequence[Any], gpus_per_cell: float | None,
                   cpus_per_cell: float) -> CellResources:
    """GPUs for cells that train on one (``cuda``, or ``auto`` on a cluster that has GPUs),
    CPUs for the rest."""
    device = cells[0].config.runtime.device
    gpus = ray.cluster_resources().get("GPU", 0)
    if device.startswith("cuda") and not gpus:
        raise ConfigError("--device cuda: the Ray cluster has no GPUs; start its nodes where "
                          "GPUs are visible (ray start --num-gpus N) or pass --device cpu")
    if device == "cpu" or not gpus:
        if gpus_per_cell is not None:
            raise ConfigError(f"--gpus-per-cell {gpus_per_cell:g}: the cells train on CPUs "
                              "(the cluster has no GPUs, or --device cpu); leave it out")
        return CellResources(cpus_per_cell, 0)
    share = gpus_per_cell if gpus_per_cell is not None else estimate_gpus_per_cell(cells)
    return CellResources(cpus_per_cell, share)


def check_shared_stores(ray: Any, stores: dict[str, str]) -> None:
    """Cells on other machines cannot write into a file of this one: with such nodes in the
    cluster, the tracking store must be a server and the study storage a database server."""
    here = socket.gethostname()
    others = {n.get("NodeManagerHostname") for n in ray.nodes() if n.get("Alive")} - {here}
    if not others:
        return
    for option, url in stores.items():
        scheme = urlparse(url).scheme
        local = scheme in ("", "file", "sqlite") or (option == "--tracking-uri"
                                                     and scheme not in ("http", "https"))
        if local:
            hint = ("an MLflow tracking server (--tracking-uri http://HOST:5000, see ablate "
                    "server)" if option == "--tracking-uri" else "a database server "
                    "(--storage postgresql://USER@HOST/optuna)")
            raise ConfigError(f"{option} {url}: the Ray cluster has nodes on other machines "
                              f"({sorted(others)[0]}, ...), which cannot reach it; use {hint}")


class RayExecutor:
    """Every task a Ray task with ``resources``, retried when its process or node dies."""

    def __init__(self, address: str | None, resources: CellResources,
                 max_retries: int = MAX_RETRIES) -> None:
        self.address, self.resources, self.max_retries = address, resources, max_retries

    def run(self, fn: TaskFn, tasks: Sequence[Any], *, on_event: Emit, on_done: OnDone) -> None:
        ray = connect(self.address)
        events = event_box(ray)
        remote = ray.remote(run_task).options(
            num_cpus=self.resources.num_cpus, num_gpus=self.resources.num_gpus,
            max_retries=self.max_retries, retry_exceptions=False)
        threads = max(1, math.floor(self.resources.num_cpus))
        pending = {remote.remote(fn, task, events, threads): task for task in tasks}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=0.2)
                _forward(ray, events, on_event)
                for ref in done:
                    on_done(pending.pop(ref), _result(ray, ref))
        except KeyboardInterrupt:
            # Each running cell gets a KeyboardInterrupt: it marks its run KILLED, to resume.
            for ref in pending:
                ray.cancel(ref)
            ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_WAIT_SECONDS)
            _forward(ray, events, on_event)
            raise
        finally:
            with contextlib.suppress(Exception):  # a cluster gone: the error above says so
                ray.kill(events)


def _result(ray: Any, ref: Any) -> Any:
    """The task's return value, or the exception it ended with (its own where it raised one;
    WorkerDied where Ray gave up retrying a process or node that died)."""
    from ray import exceptions as rex

    try:
        return ray.get(ref)
    except rex.RayTaskError as err:
        cause = err.cause if isinstance(err.cause, Exception) else None
        return cause or RuntimeError(str(err).strip().splitlines()[-1])
    except rex.RayError as err:  # the worker or its node died once more than retried
        return WorkerDied(f"its Ray worker died {MAX_RETRIES + 1} times "
                          f"({str(err).strip().splitlines()[0][:200]})")


def event_box(ray: Any) -> Any:
    """The EventBox actor, on this process's node: placed anywhere, it could land on a worker
    node that dies and take the whole grid with it (seen in the node-kill test, 3 runs in 5).
    Should its node die anyway it is restarted, and its calls retried, losing only events."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1,
                      scheduling_strategy=here)(EventBox).remote()


def _forward(ray: Any, events: Any, on_event: Emit) -> None:
    for event in ray.get(events.drain.remote()):
        on_event(event)


class EventBox:
    """A Ray actor: tasks put their progress events, the submitting process takes them."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def put(self, event: Any) -> None:
        self.events.append(event)

    def drain(self) -> list[Any]:
        out, self.events = self.events, []
        return out

    def flush(self) -> None:
        """Answered after every earlier put of the same caller (an actor's calls from one
        caller run in order)."""


def run_task(fn: TaskFn, task: Any, events: Any, threads: int) -> Any:
    """One task in a Ray worker: ``fn(task, emit)``, its events sent without waiting, then
    one call that waits, so that every event is in the box before the result is seen."""
    import torch

    torch.set_num_threads(threads)  # Ray reuses its workers: set for every task
    try:
        return patiently(fn, task, lambda event: events.put.remote(event))
    finally:
        import ray

        ray.get(events.flush.remote())


def patiently(fn: TaskFn, task: Any, emit: Emit) -> Any:
    """``fn(task, emit)``, and again every heartbeat for as long as it answers that another
    process holds the cell (execute_cell's "running").

    Ray runs the task of a dead node again within seconds, but a holder on another machine
    counts as gone only after STALE_SECONDS of silence (tracking.process_gone): until then
    the cell would come back "running" and stay unfinished. Waiting, the retry takes the
    cell over as soon as its holder is stale and resumes it from its checkpoint; a cell that
    another live command trains is waited for and reported as it ends there."""
    from alexnet.runner import Outcome
    from alexnet.store import HEARTBEAT_SECONDS

    while True:
        result = fn(task, emit)
        if not (isinstance(result, Outcome) and result.state == "running"):
            return result
        time.sleep(HEARTBEAT_SECONDS)
