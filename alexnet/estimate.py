"""How long is left, estimated from what is known rather than from a recent rate: a cell's
time per step and per epoch (so an epoch of minutes still has an ETA after its first
steps), and a grid's cells left times what cells of the same grid took, here or in earlier
runs in the store (so the first cell of a rerun already has one).

Plain arithmetic on times given by the caller: no clock is read here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import fmean
from typing import Any

RECENT = 3  # epochs whose times stand for the next one: recent enough to follow a change


@dataclass
class CellClock:
    """One cell as it trains: epoch ``epoch`` of ``epochs``, step ``step`` of ``steps``. An
    epoch's time runs from its first step to the next epoch's (validation, checkpoint and
    logging included)."""

    epochs: int
    steps: int
    started: float
    epoch: int = 0  # the epoch being worked on (1-based); 0: not training yet
    step: int = 0
    epoch_started: float | None = None
    step_seconds: float | None = None  # training time per step, this epoch so far
    epoch_walls: list[float] = field(default_factory=list)  # whole epochs, as seen here
    train_walls: list[float] = field(default_factory=list)  # their training part

    def training(self, epoch: int, now: float) -> None:
        """Epoch ``epoch`` starts (a resumed cell starts past its finished epochs)."""
        if self.epoch_started is not None and epoch == self.epoch + 1:
            self.epoch_walls.append(now - self.epoch_started)
        self.epoch, self.step, self.epoch_started = epoch, 0, now

    def stepped(self, step: int, steps: int, now: float) -> None:
        if self.epoch_started is None:
            return
        self.step, self.steps = step, steps
        if step > 0:
            self.step_seconds = (now - self.epoch_started) / step
        if step == steps:
            self.train_walls.append(now - self.epoch_started)

    @property
    def fraction(self) -> float:
        """Epochs done, with the current one's steps as a fraction: the bar's position."""
        if self.epoch == 0:
            return 0.0
        return min(float(self.epochs), self.epoch - 1 + self.step / max(1, self.steps))

    def remaining(self, now: float) -> float | None:
        """Seconds left; None while nothing has been timed yet (before the first step)."""
        if self.epoch_started is None or self.step_seconds is None:
            return None
        if self.epoch_walls:
            per_epoch = fmean(self.epoch_walls[-RECENT:])
            trained = self.train_walls[:len(self.epoch_walls)][-RECENT:]
            overhead = max(0.0, per_epoch - fmean(trained))  # validating, saving, logging
        else:
            per_epoch, overhead = self.step_seconds * self.steps, 0.0
        if self.step < self.steps:
            this_epoch = self.step_seconds * self.steps + overhead
        else:  # trained; validating or saving now
            this_epoch = self.train_walls[-1] + overhead
        left_now = max(0.0, this_epoch - (now - self.epoch_started))
        return left_now + max(0, self.epochs - self.epoch) * per_epoch

    def total(self, now: float) -> float | None:
        """The cell's whole time as it now looks: elapsed here plus what is left."""
        left = self.remaining(now)
        return None if left is None else (now - self.started) + left


class GridClock:
    """A grid's cells: how many are left and how long they will take, ``workers`` at once."""

    def __init__(self, past: dict[str, float] | None = None, workers: int = 1) -> None:
        self.past = dict(past or {})  # grid key -> mean seconds per cell, from the store
        self.workers = max(1, workers)
        self.pending: dict[str, str] = {}  # cell key -> grid key, not started yet
        self.running: dict[str, tuple[str, CellClock]] = {}
        self.took: dict[str, list[float]] = {}  # grid key -> cells trained here, seconds

    def queued(self, cells: dict[str, str]) -> None:
        """``cells``: cell key -> grid key, every cell this grid will run."""
        self.pending.update(cells)

    def started(self, key: str, clock: CellClock) -> None:
        grid_key = self.pending.pop(key, None) or self.running.get(key, ("", clock))[0]
        self.running[key] = (grid_key, clock)

    def finished(self, key: str, now: float, trained: bool) -> None:
        """Cell ``key`` ended; a cell that trained here (not skipped, reused or failed
        early) says how long its grid's cells take."""
        self.pending.pop(key, None)
        grid_key, clock = self.running.pop(key, ("", None))
        if trained and clock is not None:
            self.took.setdefault(grid_key, []).append(now - clock.started)

    def per_cell(self, grid_key: str, now: float) -> float | None:
        """Seconds a cell of this grid takes: as measured here, else as in the store, else
        as its running cells look now, else (roughly) as any other grid's cells."""
        own = self._own(grid_key, now)
        if own is not None:
            return own
        others = [t for g in {*self.took, *self.past, *(g for g, _ in self.running.values())}
                  if g != grid_key and (t := self._own(g, now)) is not None]
        return fmean(others) if others else None

    def _own(self, grid_key: str, now: float) -> float | None:
        if self.took.get(grid_key):
            return fmean(self.took[grid_key])
        if grid_key in self.past:
            return self.past[grid_key]
        totals = [t for g, c in self.running.values() if g == grid_key
                  if (t := c.total(now)) is not None]
        return fmean(totals) if totals else None

    def remaining(self, now: float) -> float | None:
        """Seconds until the last cell ends; None while a cell left has no estimate."""
        work = 0.0
        for grid_key, clock in self.running.values():
            left = clock.remaining(now)
            if left is None:
                left = self.per_cell(grid_key, now)
            if left is None:
                return None
            work += left
        for grid_key in self.pending.values():
            each = self.per_cell(grid_key, now)
            if each is None:
                return None
            work += each
        lanes = min(self.workers, max(1, len(self.running) + len(self.pending)))
        return work / lanes


# --- what earlier runs in the store say ----------------------------------------------------


@dataclass
class History:
    seconds: dict[str, float]  # grid key -> mean seconds of a finished cell
    finished: set[str]  # cell keys with a finished run (in any experiment)


def store_history(c: Any, grid_keys: set[str]) -> History:
    """The finished cell runs of these grids in the store: how long a cell took (its wall
    time, or its ``train_seconds`` for a run whose wall time spans an interruption) and
    which cells need no training."""
    from alexnet import tracking

    seconds: dict[str, float] = {}
    finished: set[str] = set()
    ids = tracking.experiment_ids(c) if grid_keys else []
    for grid_key in sorted(grid_keys):
        runs = c.search_runs(ids, max_results=50000, filter_string=(
            f"tags.`ablate.kind` = 'cell' and tags.`ablate.grid_key` = '{grid_key}' "
            "and attributes.status = 'FINISHED'"))
        finished |= {r.data.tags.get("cell_key", "") for r in runs}
        times = [cell_seconds(r) for r in runs if "ablate.reused_from" not in r.data.tags]
        times = [t for t in times if t is not None]
        if times:
            seconds[grid_key] = fmean(times)
    return History(seconds, finished)


def cell_seconds(run: Any) -> float | None:
    train = run.data.metrics.get("train_seconds")
    if run.info.end_time is None or run.info.start_time is None:
        return train
    wall = (run.info.end_time - run.info.start_time) / 1000
    if train is not None and wall > 2 * train + 60:  # interrupted and resumed later
        return train
    return wall


def grid_seconds(cells_to_run: list[Any], history: History, workers: int = 1) -> float | None:
    """The time ``cells_to_run`` should take by earlier runs of their grids; None when a
    grid among them has never finished a cell in this store."""
    total = 0.0
    for cell in cells_to_run:
        if cell.grid_key not in history.seconds:
            return None
        total += history.seconds[cell.grid_key]
    return total / min(max(1, workers), max(1, len(cells_to_run)))


def clock_text(seconds: float | None) -> str:
    """``0:42``, ``12:05``, ``3:02:10``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
