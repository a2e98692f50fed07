"""Executors: where cells (and sweep workers) run. One interface, so that a grid and a sweep
do not care whether they run in this process, in a pool of local processes, or on a cluster
(cluster.py).

``run(fn, tasks, on_event, on_done)`` calls ``fn(task, emit)`` for every task and
``on_done(task, result_or_exception)`` as each ends; ``emit`` carries progress events back to
this process. Ctrl-C (and SIGTERM, which the CLI turns into Ctrl-C) stops the tasks, whose
runs are then marked interrupted by ``execute_cell``, and propagates.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from logging.handlers import QueueHandler
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
Emit = Callable[[Any], None]
TaskFn = Callable[[Any, Emit], Any]
OnDone = Callable[[Any, Any], None]


class WorkerDied(RuntimeError):
    """The process running a task ended abruptly (killed by the OS, out of memory)."""


class Executor(Protocol):
    def run(self, fn: TaskFn, tasks: Sequence[Any], *, on_event: Emit,
            on_done: OnDone) -> None: ...


def interrupt_on_sigterm() -> list[int]:
    """SIGTERM (what `timeout` and schedulers send) is handled like Ctrl-C: the current
    cells are marked interrupted and can resume. Returns the signals received, as they come."""
    received: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return received


class InProcess:
    """One task after another, in this process: the default, and what --jobs 1 means."""

    def run(self, fn: TaskFn, tasks: Sequence[Any], *, on_event: Emit, on_done: OnDone) -> None:
        for task in tasks:
            try:
                result = fn(task, on_event)
            except Exception as err:  # noqa: BLE001 - handed to on_done, like a worker's
                result = err
            on_done(task, result)


def threads_per_job(jobs: int, device: str) -> int:
    """On a CPU the cores are split between the jobs; a GPU's jobs need few host threads."""
    if device.startswith("cuda") or (device == "auto" and _cuda()):
        return 2
    return max(1, (os.cpu_count() or 1) // jobs)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# --- a pool of local processes -------------------------------------------------------------

_EVENTS: Any = None


class _ForwardLogs(QueueHandler):
    """A worker's log records go to the parent as events, where its handlers (the CLI's,
    above the progress bars) show them: workers never write to the terminal themselves."""

    def enqueue(self, record: logging.LogRecord) -> None:
        self.queue.put(("log", "", record))


def _init_worker(threads: int, events: Any) -> None:
    global _EVENTS
    _EVENTS = events
    logging.getLogger().handlers = [_ForwardLogs(events)]
    logging.getLogger("alexnet").setLevel(logging.INFO)  # the parent filters again
    interrupt_on_sigterm()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    events.put(("worker", "", os.getpid()))


def _call(fn: TaskFn, task: Any) -> Any:
    return fn(task, _EVENTS.put)


class ProcessPool:
    """``jobs`` tasks at a time, each in a fresh process (``max_tasks_per_child=1``: nothing
    one cell leaves behind, memory or a CUDA context, reaches the next). A worker killed by
    the OS breaks a ProcessPoolExecutor and every task in flight with it: those tasks are
    submitted again to a new pool, once (their cells resume from their checkpoints); a task
    that breaks the pool a second time fails with WorkerDied."""

    def __init__(self, jobs: int, threads: int) -> None:
        self.jobs, self.threads = jobs, threads

    def run(self, fn: TaskFn, tasks: Sequence[Any], *, on_event: Emit, on_done: OnDone) -> None:
        ctx = mp.get_context("spawn")  # fork after torch and MLflow have threads is unsafe
        with ctx.Manager() as manager:
            events = manager.Queue()
            pids: set[int] = set()
            broke: dict[int, int] = {}
            todo = list(enumerate(tasks))
            while todo:
                pool = ProcessPoolExecutor(self.jobs, mp_context=ctx, max_tasks_per_child=1,
                                           initializer=_init_worker,
                                           initargs=(self.threads, events))
                futures = {pool.submit(_call, fn, task): (i, task) for i, task in todo}
                todo = []
                try:
                    while futures:
                        done, _ = wait(futures, timeout=0.2, return_when=FIRST_COMPLETED)
                        _drain(events, on_event, pids)
                        for future in done:
                            i, task = futures.pop(future)
                            error = future.exception()
                            if isinstance(error, BrokenProcessPool):
                                broke[i] = broke.get(i, 0) + 1
                                if broke[i] < 2:
                                    todo.append((i, task))
                                    continue
                                error = WorkerDied(f"its worker process died twice ({error})")
                            on_done(task, error if error is not None else future.result())
                except KeyboardInterrupt:
                    for pid in pids:  # Ctrl-C reached them too; SIGTERM did not
                        _signal(pid, signal.SIGTERM)
                    pool.shutdown(wait=True, cancel_futures=True)
                    _drain(events, on_event, pids)
                    raise
                pool.shutdown(wait=True)
                _drain(events, on_event, pids)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _drain(events: Any, on_event: Emit, pids: set[int]) -> None:
    while True:
        try:
            event = events.get_nowait()
        except (queue.Empty, EOFError, OSError):
            return
        if event[0] == "worker":
            pids.add(event[2])
        elif event[0] == "log":
            record, logger = event[2], logging.getLogger(event[2].name)
            if logger.isEnabledFor(record.levelno):  # as if it were logged here
                logger.handle(record)
        else:
            on_event(event)


def local(jobs: int, device: str = "auto") -> Executor:
    """This process for one job at a time, else a pool of ``jobs`` processes."""
    if jobs <= 1:
        return InProcess()
    return ProcessPool(jobs, threads_per_job(jobs, device))
