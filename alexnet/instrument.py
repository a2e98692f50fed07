"""What a run records about the machine: MLflow's system metrics (CPU, memory, and GPU
utilization and memory where there is one) and, on request, a torch.profiler trace."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

SAMPLING_SECONDS = 5.0


@contextlib.contextmanager
def system_metrics(run_id: str, uri: str, *, resume: bool) -> Iterator[None]:
    """MLflow's SystemMetricsMonitor on this run while the block runs (system/* metrics)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(run_id, sampling_interval=SAMPLING_SECONDS,
                                   resume_logging=resume, tracking_uri=uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        # MLflow's loop drops the samples of its last, unfinished interval, so a cell
        # shorter than one (a --quick cell takes about a second) would log none: publish
        # what it collected since, with one sample taken now.
        with contextlib.suppress(Exception):  # a run must not fail over its system metrics
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()


class StepProfiler:
    """A torch.profiler trace of a few training steps, after a warm-up, for one run.

    Drive it with ``on_step`` from the training loop; ``trace`` is the Chrome trace file
    (open it in Perfetto or chrome://tracing) once the steps have been recorded.
    """

    def __init__(self, folder: Path, *, wait: int = 2, warmup: int = 2, active: int = 5) -> None:
        import torch

        self.trace = folder / "trace.json"
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = torch.profiler.profile(
            activities=activities, record_shapes=True,
            schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1),
            on_trace_ready=lambda p: p.export_chrome_trace(str(self.trace)))

    def __enter__(self) -> StepProfiler:
        self._profiler.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._profiler.__exit__(*exc)

    def chain(self, on_step: Callable[[int, int], None] | None) -> Callable[[int, int], None]:
        def step(i: int, n: int) -> None:
            self._profiler.step()
            if on_step is not None:
                on_step(i, n)

        return step
