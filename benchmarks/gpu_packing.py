"""Packing small cells onto one GPU: aggregate training images/s with 1, 2, 4 and 8 cells
training at once, each in its own process, as `ablate run --jobs N` runs them.

    python benchmarks/gpu_packing.py [--device auto|cpu|cuda] [--data-root PATH]
        [--models convnet4,alexnet_cifar] [--cells 1,2,4,8] [--seconds S] [--quick]
        [--write-results] [--results-file FILE] [--out FILE]
        [--plan-seeds N --plan-budget SECONDS [--plan-file FILE]]

Every cell is the grid's base configuration of its model (the cifar profile: batch 128,
augmentation on the device, validation carved from train) through the project's data path
and training step; the cells start together (a barrier), train for ``--seconds`` and report
the images they trained. A GPU runs one process's kernels at a time, so the aggregate grows
only while one cell leaves the device idle: the table shows where that stops, beside what
``--jobs auto`` (alexnet.packing) chooses from its one-cell probe.

``--plan-seeds/--plan-budget`` turn the best aggregate per model into the number of epochs
of the paper grid (its distinct cells at that many seeds) that fit in a time budget, written
as ``EPOCHS=N`` to ``--plan-file``: the GPU job's sweep and grid read it.
``--quick`` is a CPU smoke run: tiny widths, 1 and 2 cells, one-second windows.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import queue
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from alexnet.config import RunConfig, build_config
from alexnet.data import open_data
from alexnet.errors import AblateError
from alexnet.train import resolve_device, use_channels_last

HERE = Path(__file__).resolve().parent
RESULTS_FILE = HERE / "RESULTS.md"
DEFAULT_DATA_ROOT = Path(os.environ.get("ALEXNET_CIFAR10_ROOT",
                                        HERE.parent.parent / "shared" / "data" / "cifar10"))
MARK_START = "<!-- gpu-packing:start -->"
MARK_END = "<!-- gpu-packing:end -->"
BARRIER_SECONDS = 600  # workers wait this long for each other: imports, data, CUDA start-up
# The plan: evaluation is a forward pass (about a third of a training step) over the
# validation split each epoch; epochs are bounded by the cifar profile's own 30.
EVAL_COST = 1 / 3
PLAN_EPOCHS = (2, 30)


@dataclass
class Settings:
    device: torch.device
    models: dict[str, float]  # model -> width
    cells: tuple[int, ...]
    seconds: float
    warmup: int  # steps before the barrier
    threads: int  # per worker process
    data: dict[str, Any]  # data overrides: the folder, or synthetic images
    data_note: str
    quick: bool

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class Row:
    model: str
    cells: int
    per_cell: list[float] = field(default_factory=list)  # images/s of each cell
    peak_bytes: list[int] = field(default_factory=list)
    error: str = ""

    @property
    def aggregate(self) -> float:
        return sum(self.per_cell)


def cell_config(s: Settings, model: str, seed: int = 0) -> RunConfig:
    return build_config("cifar", {
        "model.name": model, "model.width": s.models[model], **s.data,
        "runtime.device": str(s.device), "runtime.threads": s.threads, "seed": seed})


# --- one worker: one cell training for a while --------------------------------------------------


def worker(config: dict, warmup: int, seconds: float, barrier: Any, results: Any) -> None:
    """Open the data, warm up, wait for the others, train for ``seconds``, report."""
    try:
        from alexnet.models import build_model_from_config
        from alexnet.packing import for_seconds
        from alexnet.train import make_optimizer, seed_everything, train_epoch

        cfg = RunConfig.model_validate(config)
        torch.set_num_threads(cfg.runtime.threads or 1)
        device = resolve_device(cfg.runtime.device)
        seed_everything(cfg.seed)
        data = open_data(cfg.data, device)
        model = build_model_from_config(cfg.model, num_classes=data.num_classes).to(device)
        channels_last = use_channels_last(device, cfg)  # as train_run
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = make_optimizer(cfg, model)
        bs = cfg.train.batch_size
        endless = (b for epoch in range(1, 10**6) for b in data.train_batches(epoch, bs, cfg.seed))

        def train(batches: Any) -> int:
            _, _, seen = train_epoch(model, batches, optimizer, device, cfg, channels_last,
                                     None, 0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return seen

        train(b for _, b in zip(range(warmup), endless, strict=False))
        barrier.wait(BARRIER_SECONDS)
        started = time.perf_counter()
        seen = train(for_seconds(endless, seconds))
        elapsed = time.perf_counter() - started
        peak = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0
        results.put({"images_per_s": seen / elapsed, "peak": peak})
    except BaseException as err:  # noqa: BLE001 - reported as the row's error
        barrier.abort()
        text = str(err).strip().splitlines()
        results.put({"error": f"{type(err).__name__}: {text[0] if text else ''}"[:200]})


def measure(s: Settings, model: str, n: int) -> Row:
    """``n`` cells of ``model`` at once, each in a fresh process (spawned, as the pool's)."""
    print(f"measuring: {model}, {n} cell(s) at once ...", file=sys.stderr, flush=True)
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=worker, daemon=True, args=(
        cell_config(s, model, seed=i).model_dump(mode="json"), s.warmup, s.seconds, barrier,
        results)) for i in range(n)]
    for p in procs:
        p.start()
    row = Row(model, n)
    try:
        for _ in range(n):
            got = results.get(timeout=BARRIER_SECONDS + 60 + s.seconds)
            if "error" in got:
                row.error = row.error or got["error"]
            else:
                row.per_cell.append(got["images_per_s"])
                row.peak_bytes.append(got["peak"])
    except queue.Empty:
        row.error = row.error or "a worker gave no answer"
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    if row.error:
        row.per_cell, row.peak_bytes = [], []
    return row


# --- what --jobs auto would choose --------------------------------------------------------------


def auto_choice(s: Settings, model: str) -> str:
    """``--jobs auto``'s answer for a grid of this model's cells, and its reason."""
    from alexnet.packing import decide, max_jobs_for_cpus, probe

    if not s.cuda:
        return "1 (a CPU: cells use all its cores)"
    cfg = cell_config(s, model)
    data = open_data(cfg.data, s.device)
    try:
        d = decide(probe(cfg, data), max_jobs_for_cpus())
    finally:
        del data
        torch.cuda.empty_cache()
    return f"{d.jobs} ({d.reason.removeprefix('--jobs auto: ')})"


# --- the paper grid's epochs in a budget --------------------------------------------------------


def plan(rows: list[Row], s: Settings, seeds: int, budget: float) -> tuple[int | None, str]:
    """Epochs of the paper grid (its distinct cells at ``seeds`` seeds) that ``budget``
    seconds of packed training hold, at the best aggregate measured for each model. Process
    start-up, logging and the sweep are outside it: leave them room in the budget."""
    from alexnet.ablation import load_ablation

    cells = load_ablation("paper").cells(quick=s.quick, seeds=list(range(seeds)),
                                         overrides=s.data)
    distinct = Counter(c.config.model.name for c in {c.key: c for c in cells}.values())
    best = {m: max((r.aggregate for r in rows if r.model == m and r.per_cell), default=0.0)
            for m in distinct}
    if not all(best.values()):
        missing = ", ".join(m for m, v in best.items() if not v)
        return None, f"plan: none, {missing} not measured"
    data = open_data(cell_config(s, next(iter(distinct))).data, "cpu")
    train, val = data.train_size, data.val_size
    one_epoch = sum(n * train * (1 + EVAL_COST * val / train) / best[m]
                    for m, n in distinct.items())
    fit = int(budget // one_epoch)
    epochs = min(max(fit, PLAN_EPOCHS[0]), PLAN_EPOCHS[1])
    cells_text = " + ".join(f"{n} {m}" for m, n in distinct.items())
    return epochs, (
        f"plan: the paper grid at {seeds} seed(s) is {sum(distinct.values())} distinct cells "
        f"({cells_text}); one epoch of all of them ({train:,} training + {val:,} validation "
        f"images each) takes about {one_epoch:.0f} s at the best aggregate measured per model, "
        f"so {budget:g} s hold {fit} epochs: EPOCHS={epochs} (bounded to {PLAN_EPOCHS[0]}"
        f"..{PLAN_EPOCHS[1]})")


# --- the table ----------------------------------------------------------------------------------


def table(rows: list[Row], s: Settings) -> pd.DataFrame:
    alone = {r.model: r.aggregate for r in rows if r.cells == 1 and r.per_cell}
    records = []
    for r in rows:
        ok = bool(r.per_cell)
        records.append({
            "model": f"{r.model}" + ("" if s.models[r.model] == 1 else
                                     f" w={s.models[r.model]:g}"),
            "cells at once": r.cells,
            "images/s per cell": f"{r.aggregate / r.cells:,.0f}" if ok else "",
            "aggregate images/s": f"{r.aggregate:,.0f}" if ok else "",
            "vs 1 cell": f"{r.aggregate / alone[r.model]:.2f}x" if ok and r.model in alone
            else "",
            "GPU memory per cell": f"{max(r.peak_bytes) / 2**30:.2f} GiB" if ok and s.cuda
            else "",
            "note": f"failed: {r.error}" if r.error else "",
        })
    return pd.DataFrame.from_records(records)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def report(rows: list[Row], s: Settings, choices: dict[str, str], plan_line: str) -> str:
    lines = [
        "### Packing small cells onto one GPU: aggregate training images/s", "",
        f"- device: {device_name(s.device)}; torch {torch.__version__}, Python "
        f"{platform.python_version()}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- each cell: its own process ({s.threads} CPU thread(s)), the cifar profile's base "
        f"configuration of the model (batch 128, augmentation on the device), {s.data_note}; "
        f"{s.warmup} warm-up steps, then all cells start together and train for "
        f"{s.seconds:g} s" + ("; --quick: a CPU smoke run" if s.quick else ""),
        "- aggregate: the sum of the cells' training images/s; vs 1 cell: over one cell alone",
        *[f"- `--jobs auto` for {m}: {c}" for m, c in choices.items()],
        "", table(rows, s).to_markdown(index=False), ""]
    best = {}
    for r in rows:
        if r.per_cell and r.aggregate > best.get(r.model, (0, 0))[1]:
            best[r.model] = (r.cells, r.aggregate)
    lines.append("Best: " + "; ".join(f"{m} {n} cell(s) at once, {x:,.0f} images/s"
                                      for m, (n, x) in best.items()))
    if plan_line:
        lines += ["", plan_line]
    return "\n".join(lines) + "\n"


# --- command line -------------------------------------------------------------------------------


def settings(args: argparse.Namespace) -> Settings:
    device = resolve_device(args.device)
    root = Path(args.data_root).expanduser()
    quick = args.quick
    if (root / "train").is_dir():
        data = {"data.source": "imagefolder", "data.root": str(root.resolve())}
        if quick:
            data["data.max_train"] = 256
        note = f"the image folder `{root.name}`" + (", 256 training images" if quick else "")
    elif quick:
        data = {"data.source": "synthetic", "data.synthetic.train_size": 1024,
                "data.synthetic.val_size": 256}
        note = "1,024 synthetic images (no image folder given)"
    else:
        raise SystemExit(f"error: no image folder at {root} (train/<class>/*.jpg); pass "
                         "--data-root, or --quick for synthetic images")
    default_models = {"convnet4": 0.25, "alexnet_cifar": 0.125} if quick else \
        {"convnet4": 1.0, "alexnet_cifar": 1.0}
    models = {m: default_models.get(m, 0.125 if quick else 1.0)
              for m in args.models.split(",")} if args.models else default_models
    cells = tuple(int(n) for n in args.cells.split(",")) if args.cells else \
        ((1, 2) if quick else (1, 2, 4, 8))
    return Settings(device=device, models=models, cells=cells,
                    seconds=args.seconds or (1.0 if quick else 6.0),
                    warmup=2 if quick else 20, threads=args.threads or (1 if quick else 2),
                    data=data, data_note=note, quick=quick)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT),
                   help="CIFAR-10 image folder holding train/<class>/*.jpg")
    p.add_argument("--models", default="", help="comma-separated (default convnet4,alexnet_cifar)")
    p.add_argument("--cells", default="", help="cells at once, comma-separated (default 1,2,4,8)")
    p.add_argument("--seconds", type=float, default=None,
                   help="measured training time per row (default 6, --quick 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per cell (default 2, as `ablate run` gives a GPU job)")
    p.add_argument("--quick", action="store_true", help="CPU smoke run (see above)")
    p.add_argument("--plan-seeds", type=int, default=None)
    p.add_argument("--plan-budget", type=float, default=None, help="seconds")
    p.add_argument("--plan-file", type=Path, default=None,
                   help="write EPOCHS=N here (with --plan-seeds and --plan-budget)")
    p.add_argument("--write-results", action="store_true",
                   help=f"write the table between its markers in {RESULTS_FILE.name}")
    p.add_argument("--results-file", type=Path, default=RESULTS_FILE)
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        s = settings(args)
        for model in s.models:
            cell_config(s, model)  # a bad model name or data setting: one line, now
    except AblateError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Decode the folder once, here: the workers then read the tensor cache.
    for model in s.models:
        open_data(cell_config(s, model).data, "cpu")
    choices = {m: auto_choice(s, m) for m in s.models}
    rows = [measure(s, m, n) for m in s.models for n in s.cells]
    epochs, plan_line = None, ""
    if args.plan_seeds and args.plan_budget:
        epochs, plan_line = plan(rows, s, args.plan_seeds, args.plan_budget)
        if args.plan_file and epochs is not None:
            args.plan_file.write_text(f"# {plan_line}\nEPOCHS={epochs}\n")
    text = report(rows, s, choices, plan_line)
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    if args.write_results:
        sys.path.insert(0, str(HERE))
        from gpu import write_between_markers

        write_between_markers(args.results_file, text, MARK_START, MARK_END)
        print(f"wrote {args.results_file}", file=sys.stderr)
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
