"""How many cells share one GPU: ``ablate run --jobs auto``, the default.

A CIFAR-sized cell cannot fill a large GPU: its kernels finish faster than one Python process
launches the next, and evaluation, logging and data draws leave the device idle too. Processes
on one GPU take turns on it (time slices; MPS is not assumed), so several cells at once pay
exactly while one cell leaves the device idle, and as long as their memory fits.

A short probe measures that on the grid's largest cell: a second or two of real training steps
(its data, model and optimizer, as ``train_run`` sets them up) while NVML reports the share of
time a kernel was running, and the allocator's peak. ``choose_jobs`` turns the measurements
into a number; it is a pure function, so its reasoning is tested without a GPU. On a CPU the
cores are the limit and cells already use all of them: auto is 1 there.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from alexnet.errors import ConfigError

if TYPE_CHECKING:
    from alexnet.ablation import Cell
    from alexnet.config import RunConfig

AUTO = "auto"
# A CUDA context with cuDNN and cuBLAS loaded, and their workspaces: memory a worker process
# holds that the caching allocator does not count. Measured contexts are 0.5-0.8 GiB.
CONTEXT_BYTES = 1 << 30
HEADROOM = 0.8  # of the free memory: fragmentation, evaluation batches, a larger arm
MIN_GAIN = 0.25  # another cell must add a quarter of one cell's throughput to be worth it
MAX_AUTO_JOBS = 8  # beyond this the processes' CPU threads, not the GPU, are the limit
PROBE_SECONDS = 1.5  # measured, after PROBE_WARMUP_SECONDS of untimed steps
PROBE_WARMUP_SECONDS = 0.5
UTIL_SAMPLE_SECONDS = 0.1


@dataclass(frozen=True)
class Choice:
    jobs: int
    limit: str  # what stopped it from being more: utilization | memory | cpu cores
    by_util: int
    by_memory: int
    max_jobs: int


@dataclass(frozen=True)
class Probe:
    """One cell's needs, measured on the GPU it will run on."""

    model: str
    device_name: str
    peak_bytes: int  # the allocator's peak: data, model, optimizer state, activations
    free_bytes: int  # free on the device with the probe's own model released
    util: float | None  # share of time a kernel ran (NVML), None when it cannot be read
    step_seconds: float  # wall time of one training step, the host's view


@dataclass(frozen=True)
class Decision:
    jobs: int
    reason: str  # one line for the console; empty when there was nothing to decide


def parse_jobs(text: str) -> int | Literal["auto"]:
    """``--jobs``: a positive number of processes, or ``auto``."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        jobs = int(text)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise ConfigError(f"--jobs {text!r}: give a number of processes (1, 4) or auto")
    return jobs


def cells_to_fill(util: float) -> int:
    """Cells taking turns until one more would add less than MIN_GAIN of a cell's throughput.

    k cells that each keep the device busy ``util`` of the time keep it busy min(k * util, 1)
    of the time, so the k-th adds (min(k u, 1) - min((k-1) u, 1)) / u cells' worth."""
    u = min(max(util, 0.01), 1.0)
    k = 1
    while (min((k + 1) * u, 1.0) - min(k * u, 1.0)) / u >= MIN_GAIN:  # ends: k * u >= 1
        k += 1
    return k


def choose_jobs(free_bytes: int, per_cell_bytes: int, util: float, max_jobs: int) -> Choice:
    """How many cells run at once on one GPU: as many as keep it busy (``cells_to_fill``),
    fit in HEADROOM of its free memory, and the CPU cores drive; always at least 1 (a cell
    too large for the free memory fails on its own, with the allocator's message)."""
    if per_cell_bytes <= 0 or max_jobs < 1:
        raise ValueError(f"per_cell_bytes {per_cell_bytes} and max_jobs {max_jobs} must be "
                         "positive")
    by_util = cells_to_fill(util)
    by_memory = int(max(free_bytes, 0) * HEADROOM // per_cell_bytes)
    limits = [("utilization", by_util), ("memory", by_memory), ("cpu cores", max_jobs)]
    limit, jobs = min(limits, key=lambda item: item[1])  # the first of equals
    return Choice(max(1, jobs), limit, by_util, by_memory, max_jobs)


def max_jobs_for_cpus(cpus: int | None = None) -> int:
    """The cells this machine's cores can drive: a GPU job uses a few host threads
    (executors.threads_per_job), one of them busy launching kernels."""
    from alexnet.executors import threads_per_job

    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            os.cpu_count() or 1
    return max(1, min(MAX_AUTO_JOBS, cpus // threads_per_job(MAX_AUTO_JOBS, "cuda")))


# --- the probe (CUDA) --------------------------------------------------------------------------


def largest(cells: Sequence[Cell]) -> Cell:
    """The cell with the most parameters (the first of equals): the one that leaves the
    least room, in memory and in device time."""
    import torch

    from alexnet.models import build_model_from_config

    def params(cell: Cell) -> int:
        with torch.device("meta"):  # no memory, no initialization: instant
            model = build_model_from_config(cell.config.model, num_classes=10)
        return sum(p.numel() for p in model.parameters())

    sizes = {cell.config.model.model_dump_json(): cell for cell in cells}
    return max(sizes.values(), key=params)


def for_seconds(batches: Iterator[Any], seconds: float) -> Iterator[Any]:
    """``batches`` until ``seconds`` have passed, by the host's clock."""
    end = time.perf_counter() + seconds
    for batch in batches:
        if time.perf_counter() >= end:
            return
        yield batch


def _gpu_util(device: Any) -> float | None:
    """NVML's share of the last sample period in which a kernel ran, 0..1; None when NVML
    (nvidia-ml-py) is missing or cannot read this device."""
    import torch

    try:
        return torch.cuda.utilization(device) / 100
    except Exception:  # noqa: BLE001 - no NVML is an answer too: the caller says so
        return None


def probe(cfg: RunConfig, data: Any, seconds: float = PROBE_SECONDS) -> Probe:
    """Train ``cfg``'s model on ``data`` for a moment on its CUDA device; measure the peak
    memory, the step time and the share of time the device was busy. Eager, as the
    measurements are about the device's idle time and a compile would take longer than the
    probe (a compiled cell needs less of both, so the answer errs on the safe side)."""
    import torch

    from alexnet.train import resolve_device

    device = resolve_device(cfg.runtime.device)
    if device.type != "cuda":
        raise ValueError(f"probe needs a CUDA device, not {device}")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    util, step_seconds = _train_and_watch(cfg, data, device, seconds)
    peak = torch.cuda.max_memory_reserved(device)
    torch.cuda.empty_cache()  # the probe's model is gone: what is free now is the cells'
    free, _ = torch.cuda.mem_get_info(device)
    return Probe(model=cfg.model.name, device_name=torch.cuda.get_device_name(device),
                 peak_bytes=peak, free_bytes=free, util=util, step_seconds=step_seconds)


def _train_and_watch(cfg: RunConfig, data: Any, device: Any, seconds: float
                     ) -> tuple[float | None, float]:
    """Training steps for ``seconds`` after a warm-up, as ``train_run`` takes them on CUDA,
    while a thread samples NVML's utilization. Returns (mean utilization, seconds a step)."""
    import torch

    from alexnet.models import build_model_from_config
    from alexnet.train import make_optimizer, seed_everything, train_epoch, use_channels_last

    seed_everything(cfg.seed)
    model = build_model_from_config(cfg.model, num_classes=data.num_classes).to(device)
    channels_last = use_channels_last(device, cfg)  # as train_run
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    bs = cfg.train.batch_size
    endless = itertools.chain.from_iterable(
        data.train_batches(epoch, bs, cfg.seed) for epoch in itertools.count(1))

    def steps(duration: float) -> int:
        _, _, seen = train_epoch(model, for_seconds(endless, duration), optimizer, device,
                                 cfg, channels_last, None, 0)
        torch.cuda.synchronize(device)
        return max(1, seen // bs)

    steps(PROBE_WARMUP_SECONDS)
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(UTIL_SAMPLE_SECONDS):
            util = _gpu_util(device)
            if util is not None:
                samples.append(util)

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    sampler.start()
    try:
        n = steps(seconds)
    finally:
        stop.set()
        sampler.join()
    wall = time.perf_counter() - started
    return (sum(samples) / len(samples) if samples else None), wall / n


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def decide(p: Probe, max_jobs: int) -> Decision:
    """The probe's measurements as a number of cells, and one line saying why."""
    if p.util is None:
        return Decision(1, "--jobs auto: 1 cell at a time: the GPU's utilization cannot be "
                           "read (NVML, from nvidia-ml-py, is missing); pass --jobs N to pack "
                           "cells")
    c = choose_jobs(p.free_bytes, p.peak_bytes + CONTEXT_BYTES, p.util, max_jobs)
    return Decision(c.jobs, (
        f"--jobs auto: {c.jobs} cell{'s' if c.jobs > 1 else ''} at once, limited by "
        f"{c.limit}: one {p.model} cell holds {gib(p.peak_bytes)} (+ {gib(CONTEXT_BYTES)} "
        f"for its CUDA context) and keeps the {p.device_name} busy {p.util:.0%} of the time "
        f"({1e3 * p.step_seconds:.1f} ms a step); utilization allows {c.by_util}, "
        f"{gib(p.free_bytes)} free memory {c.by_memory}, the CPU cores {c.max_jobs}"))


def resolve_jobs(wanted: int | Literal["auto"], cells: Sequence[Cell]) -> Decision:
    """``--jobs``: a number is kept; auto is 1 on a CPU and measured on a GPU (the cells'
    data must be open already, as ``runner.preflight_data`` leaves it)."""
    if wanted != AUTO:
        return Decision(int(wanted), "")
    from alexnet.runner import open_data_once
    from alexnet.train import resolve_device

    if not cells or resolve_device(cells[0].config.runtime.device).type != "cuda":
        return Decision(1, "")
    cell = largest(cells)
    return decide(probe(cell.config, open_data_once(cell)), max_jobs_for_cpus())
