"""Progress of a grid with rich: cells done of total with an ETA, and a bar per running cell
(epoch, loss, error)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from alexnet.ablation import Cell
from alexnet.grid import Progress as GridProgress
from alexnet.runner import Outcome


class RichProgress(GridProgress):
    def __init__(self, console: Console) -> None:
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(),
                             MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                             TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                             console=console, transient=False)
        self.grid: Any = None
        self.cells: dict[str, Any] = {}

    def __enter__(self) -> RichProgress:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.__exit__(*exc)

    def grid_started(self, name: str, total: int, skipped: int) -> None:
        note = f"{skipped} already finished" if skipped else ""
        self.grid = self.bars.add_task(f"[bold]{name}[/] cells", total=total, status=note)

    def cell_event(self, cell: Cell, kind: str, payload: Any) -> None:
        if kind == "start":
            self.cells[cell.key] = self.bars.add_task(
                f"  {cell.arm_label} seed={cell.seed}", total=payload, status="")
        task = self.cells.get(cell.key)
        if task is None:
            return
        if kind == "epoch":
            self.bars.update(task, completed=payload["epoch"],
                             status=f"loss {payload['train_loss']:.3f}  train err "
                                    f"{100 * payload['train_error']:.1f}%  val err "
                                    f"{100 * payload['val_error']:.1f}%")
        elif kind == "step":
            step, steps = payload
            self.bars.update(task, status=f"step {step}/{steps}")

    def cell_done(self, outcome: Outcome) -> None:
        task = self.cells.pop(outcome.cell.key, None)
        if task is not None:
            self.bars.remove_task(task)
        if self.grid is not None:
            self.bars.advance(self.grid)
