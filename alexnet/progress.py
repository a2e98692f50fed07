"""A grid's progress in the terminal, with rich: a bar for the grid (cells done of total,
ETA) and one per running cell (epoch, what it is doing: decoding data N/M, training step
N/M, validating, checkpointing, testing; ETA). Each epoch's line (losses, errors, lr,
img/s) and each cell's end are logged above the bars, as timm's train script does.

Columns have fixed widths chosen from the terminal's, so that nothing collapses at 80
columns; ETAs come from ``estimate`` (times per step and epoch, earlier cells), never
from a recent rate that long epochs leave empty.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Column
from rich.text import Text

from alexnet.ablation import Cell
from alexnet.estimate import CellClock, GridClock, clock_text
from alexnet.grid import Progress as GridProgress
from alexnet.runlog import cell_label, end_line, epoch_line
from alexnet.runner import Outcome

log = logging.getLogger("alexnet.cells")

Clock = Callable[[], float]


class EtaColumn(ProgressColumn):
    """``eta 1:23`` from the task's ``eta`` field: a function of the time, None if unknown."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(table_column=Column(width=11, no_wrap=True))
        self.clock = clock

    def render(self, task: Task) -> Text:
        if task.finished:
            return Text("")
        eta = task.fields.get("eta")
        return Text(f"eta {clock_text(eta(self.clock()) if eta else None)}", style="cyan")


def columns(width: int, clock: Clock) -> list[ProgressColumn]:
    """Label, bar, count, phase, [elapsed,] ETA: fixed widths but the bar's, which takes
    what is left (at least 6 columns of 80)."""
    wide = width >= 110
    label, count, phase = (30, 10, 30) if wide else (20, 8, 26)

    def text(field: str, width: int, **kw: Any) -> TextColumn:
        return TextColumn(field, table_column=Column(width=width, no_wrap=True,
                                                     overflow="ellipsis", **kw))

    return [text("{task.description}", label),
            BarColumn(bar_width=None, table_column=Column(ratio=1, min_width=6)),
            text("{task.fields[count]}", count, justify="right"),
            text("{task.fields[phase]}", phase),
            *([TimeElapsedColumn()] if wide else []),
            EtaColumn(clock)]


def amount(n: int) -> str:
    """Counts short enough for a phase column: 512, 4,096, 45.0k, 1.28M."""
    if n < 10_000:
        return f"{n:,}"
    return f"{n / 1000:.1f}k" if n < 1_000_000 else f"{n / 1_000_000:.2f}M"


class RichProgress(GridProgress):
    def __init__(self, console: Console, *, workers: int = 1,
                 past: dict[str, float] | None = None, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.bars = Progress(*columns(console.width, clock), console=console, expand=True,
                             transient=False)
        self.grid_clock = GridClock(past, workers)
        self.grid: Any = None
        self.done = 0
        self.failed = 0
        self.cells: dict[str, Any] = {}  # cell key -> task id
        self.clocks: dict[str, CellClock] = {}
        self.labels: dict[str, str] = {}

    def set_workers(self, workers: int) -> None:
        """Cells at once, once known (``--jobs auto`` decides after the data is open)."""
        self.grid_clock.workers = max(1, workers)

    def __enter__(self) -> RichProgress:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.grid is not None and exc[0] is None:
            self.bars.update(self.grid, phase="done")
        self.bars.__exit__(*exc)

    # --- before the grid: data decoded once, in this process -----------------------------

    @contextlib.contextmanager
    def preparing_data(self) -> Iterator[None]:
        """Within the block, data decoding shows as a bar of its own (images N of M)."""
        from alexnet.data.progress import reporting_to

        task = self.bars.add_task("data", total=1, count="", phase="opening", eta=None)
        first: list[tuple[float, int]] = []

        def report(what: str, done: int, total: int) -> None:
            now = self.clock()
            if not first or done < first[0][1]:
                first[:] = [(now, done)]
            t0, d0 = first[0]
            rate = (done - d0) / (now - t0) if now > t0 and done > d0 else None
            left = (total - done) / rate if rate else None
            self.bars.update(task, total=total, completed=done,
                             phase=f"{what} {amount(done)}/{amount(total)}",
                             eta=(lambda at, left=left, now=now: max(0.0, left - (at - now))
                                  ) if left is not None else None,
                             refresh=done in (0, total))

        try:
            with reporting_to(report):
                yield
        finally:
            self.bars.remove_task(task)

    # --- the grid ------------------------------------------------------------------------

    def cells_queued(self, cells: list[Cell]) -> None:
        self.grid_clock.queued({cell.key: cell.grid_key for cell in cells})

    def grid_started(self, name: str, total: int, skipped: int) -> None:
        self.grid = self.bars.add_task(f"[bold]{name}[/]", total=total, count=f"0/{total}",
                                       phase="cells", eta=self.grid_clock.remaining)
        self.total = total

    def grid_phase(self, text: str) -> None:
        if self.grid is not None:
            self.bars.update(self.grid, phase=text)

    def cell_event(self, cell: Cell, kind: str, payload: Any) -> None:
        now = self.clock()
        key = cell.key
        if key not in self.cells:
            self.labels[key] = cell_label(cell.arms, cell.seed)
            self.cells[key] = self.bars.add_task(f"  {self.labels[key]}", total=1, count="",
                                                 phase="", eta=None)
        task = self.cells[key]
        if kind == "start":
            info = payload if isinstance(payload, dict) else {"epochs": payload, "steps": 1}
            self.clocks[key] = clock = CellClock(info["epochs"], info["steps"], now)
            self.grid_clock.started(key, clock)
            self.bars.update(task, total=clock.epochs, eta=clock.remaining)
        elif kind == "phase":
            self._phase(key, task, payload, now)
        elif kind == "step" and key in self.clocks:
            step, steps = payload
            clock = self.clocks[key]
            clock.stepped(step, steps, now)
            self.bars.update(task, completed=clock.fraction, phase=f"training {step}/{steps}")
        elif kind == "epoch":
            epochs = self.clocks[key].epochs if key in self.clocks else int(payload["epoch"])
            log.info(epoch_line(self.labels[key], payload, epochs))

    def _phase(self, key: str, task: Any, info: dict[str, Any], now: float) -> None:
        name, clock = info["phase"], self.clocks.get(key)
        text = f"{name} {amount(info['done'])}/{amount(info['total'])}" if info.get(
            "total") else name
        if name == "training" and clock is not None:
            clock.training(info["epoch"], now)
            self.bars.update(task, completed=clock.fraction,
                             count=f"{info['epoch']}/{clock.epochs} ep")
        # Drawn now, not at the next tick: a short phase (validating) is seen, every time.
        self.bars.update(task, phase=text, refresh=True)

    def cell_done(self, outcome: Outcome) -> None:
        key = outcome.cell.key
        label = self.labels.get(key) or cell_label(outcome.cell.arms, outcome.cell.seed)
        trained = key in self.clocks and outcome.state in ("finished", "diverged")
        self.grid_clock.finished(key, self.clock(), trained)
        self.clocks.pop(key, None)
        task = self.cells.pop(key, None)
        if task is not None:
            self.bars.remove_task(task)
        if outcome.state in ("failed", "diverged"):
            self.failed += 1
            log.warning(end_line(label, outcome.state, outcome.final, outcome.reason))
        elif outcome.state == "finished":
            log.info(end_line(label, outcome.state, outcome.final, None))
        self.done += 1
        if self.grid is not None:
            failed = f", {self.failed} failed" if self.failed else ""
            self.bars.update(self.grid, completed=self.done, count=f"{self.done}/{self.total}",
                             phase=f"cells{failed}")
