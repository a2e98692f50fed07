"""What a user sees while a grid runs: ETAs from step and epoch times and from earlier runs,
the phase of each cell, bars that stay readable at 80 columns, a line per epoch above them
and in the run's train.log."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from alexnet import store, tracking
from alexnet.ablation import load_ablation
from alexnet.config import build_config
from alexnet.data import folder
from alexnet.data.progress import reporting_to
from alexnet.estimate import CellClock, GridClock, clock_text, grid_seconds, store_history
from alexnet.progress import RichProgress
from alexnet.runlog import RunLog, epoch_line
from alexnet.runner import Outcome
from alexnet.train import Checkpoint, train_run

ABLATE = str(Path(sys.executable).parent / "ablate")
CELLS = load_ablation("relu_vs_tanh").cells(quick=True)
CELL = CELLS[0]  # activation=relu, seed 0
EPOCH = {"epoch": 1, "train_loss": 2.1, "train_error": 0.8, "val_loss": 1.9, "val_error": 0.7,
         "val_error_top5": 0.3, "lr": 0.01, "epoch_seconds": 30.0, "images_per_second": 68.0}


# --- estimates -------------------------------------------------------------------------------


def test_a_cell_has_an_eta_after_its_first_step_however_long_the_epoch():
    clock = CellClock(epochs=3, steps=10, started=0.0)
    clock.training(1, now=0.0)
    assert clock.remaining(1.0) is None  # nothing timed yet
    clock.stepped(1, 10, now=2.0)  # 2 s per step: an epoch of 20 s
    assert clock.remaining(2.0) == pytest.approx(18 + 2 * 20)
    assert clock.remaining(5.0) == pytest.approx(15 + 2 * 20)  # counts down between events
    assert clock.fraction == pytest.approx(0.1)


def test_once_an_epoch_is_timed_its_validation_and_saving_count_too():
    clock = CellClock(epochs=2, steps=10, started=0.0)
    clock.training(1, now=0.0)
    clock.stepped(10, 10, now=10.0)  # trained in 10 s, then 4 s of validation and saving
    clock.training(2, now=14.0)
    clock.stepped(5, 10, now=19.0)
    assert clock.remaining(19.0) == pytest.approx(10 + 4 - 5)
    assert clock.total(19.0) == pytest.approx(28.0)


def test_a_resumed_cell_starts_its_bar_at_the_epochs_it_had_finished():
    clock = CellClock(epochs=8, steps=10, started=0.0)
    clock.training(6, now=0.0)
    assert clock.fraction == 5.0


def test_a_grid_estimates_its_first_cell_from_earlier_runs_of_the_same_grid():
    grid = GridClock(past={"g": 30.0}, workers=1)
    grid.queued({"a": "g", "b": "g", "c": "g", "d": "other"})
    assert grid.remaining(0.0) == pytest.approx(4 * 30)  # "other": like the grid that ran
    assert GridClock().remaining(0.0) == 0.0  # nothing to run
    nothing_known = GridClock()
    nothing_known.queued({"a": "g"})
    assert nothing_known.remaining(0.0) is None
    grid = GridClock(past={"g": 30.0}, workers=2)
    grid.queued({"a": "g", "b": "g", "c": "g", "d": "g"})
    assert grid.remaining(0.0) == pytest.approx(4 * 30 / 2)
    clock = CellClock(epochs=1, steps=1, started=0.0)
    grid.started("a", clock)
    grid.finished("a", now=10.0, trained=True)  # what this machine does now wins
    assert grid.remaining(10.0) == pytest.approx(3 * 10 / 2)


def test_without_history_the_running_cell_stands_for_the_others():
    grid = GridClock()
    grid.queued({"a": "g", "b": "g"})
    clock = CellClock(epochs=2, steps=10, started=0.0)
    grid.started("a", clock)
    clock.training(1, now=0.0)
    clock.stepped(1, 10, now=1.0)  # this cell: 20 s in all
    assert grid.remaining(1.0) == pytest.approx(19 + 20)


def test_clock_text():
    assert [clock_text(s) for s in (None, 5, 61.4, 3725)] == ["?", "0:05", "1:01", "1:02:05"]


def test_history_reads_finished_cells_of_the_grid_from_the_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = store.client(uri)
    exp = c.create_experiment("x")

    def cell_run(key: str, grid_key: str, seconds: float, status: str = "FINISHED",
                 **tags: str) -> None:
        run = c.create_run(exp, start_time=1_000_000, tags={
            "ablate.kind": "cell", "cell_key": key, "ablate.grid_key": grid_key, **tags})
        c.log_metric(run.info.run_id, "train_seconds", seconds)
        c.set_terminated(run.info.run_id, status, end_time=1_000_000 + int(seconds * 1000))

    cell_run("k1", "g", 10)
    cell_run("k2", "g", 20)
    cell_run("k3", "g", 99, status="FAILED")
    cell_run("k4", "g", 500, **{"ablate.reused_from": "elsewhere"})  # a copy, not a timing
    cell_run("k5", "h", 7)
    history = store_history(c, {"g"})
    assert history.seconds == {"g": pytest.approx(15.0)}
    assert history.finished == {"k1", "k2", "k4"}
    cells = load_ablation("relu_vs_tanh").cells(quick=True)
    assert grid_seconds(cells, history) is None  # their grid never ran here
    assert grid_seconds(cells[:2], type(history)({cells[0].grid_key: 6.0}, set()), 2) == 6.0
    assert tracking.experiment_ids(c)  # the store was a real one


# --- the bars ----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def screen(progress: RichProgress, width: int) -> list[str]:
    out = Console(file=io.StringIO(), width=width, color_system=None, record=True)
    out.print(progress.bars.get_renderable())
    return [line.rstrip() for line in out.export_text().splitlines()]


def a_running_cell(width: int) -> tuple[RichProgress, FakeClock]:
    clock = FakeClock()
    console = Console(file=io.StringIO(), width=width, color_system=None)
    progress = RichProgress(console, past={CELL.grid_key: 60.0}, clock=clock)
    progress.cells_queued(CELLS)
    progress.grid_started("relu_vs_tanh", 6, 0)
    grid = next(line for line in screen(progress, width) if "relu_vs_tanh" in line)
    assert "0/6" in grid and "eta 6:00" in grid  # six cells of 60 s, by earlier runs
    progress.cell_event(CELL, "phase", {"phase": "decoding train", "epoch": 0, "done": 12_300,
                                        "total": 45_000})
    lines = screen(progress, width)
    assert any("relu seed 0" in line and "decoding train 12.3k/45.0k" in line for line in lines)
    progress.cell_event(CELL, "start", {"epochs": 8, "steps": 64})
    progress.cell_event(CELL, "phase", {"phase": "training", "epoch": 1, "done": 0, "total": 0})
    clock.now += 3.0
    progress.cell_event(CELL, "step", (3, 64))
    return progress, clock


@pytest.mark.parametrize("width", [80, 200])
def test_bars_keep_their_columns_at_80_columns(width):
    progress, clock = a_running_cell(width)
    lines = screen(progress, width)
    assert all(len(line) <= width for line in lines)
    grid = next(line for line in lines if "relu_vs_tanh" in line)
    cell = next(line for line in lines if "relu seed 0" in line)
    assert "1/8 ep" in cell and "training 3/64" in cell
    assert "eta 8:29" in cell  # 1 s a step: 61 s left of this epoch, then 7 of 64 s
    assert "eta 13:29" in grid  # that, and five more cells of 60 s
    progress.cell_event(CELL, "phase", {"phase": "validating", "epoch": 1, "done": 0,
                                        "total": 0})
    assert any("relu seed 0" in line and "validating" in line
               for line in screen(progress, width))


def test_each_epoch_is_a_log_line_and_a_cell_end_says_how_it_went(caplog):
    progress, _ = a_running_cell(80)
    caplog.set_level(logging.INFO, logger="alexnet")
    progress.cell_event(CELL, "epoch", EPOCH)
    progress.cell_done(Outcome(CELL, "finished", "run", None, {
        "epochs_completed": 8.0, "final_val_error": 0.25, "train_seconds": 41.0}))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == epoch_line("relu seed 0", EPOCH, 8)
    assert lines[0].startswith("relu seed 0  epoch 1/8  train loss 2.100 err 80.0%  val loss "
                               "1.900 err 70.0%")
    assert "lr 0.01" in lines[0] and "68 img/s" in lines[0]
    assert lines[1] == "relu seed 0  finished: 8 epochs, val err 25.0%, 41 s"
    assert not any("relu seed 0" in line for line in screen(progress, 80))  # bar gone


def test_decoding_before_the_grid_has_a_bar_with_counts():
    clock = FakeClock()
    progress = RichProgress(Console(file=io.StringIO(), width=80), clock=clock)
    with progress.preparing_data():
        from alexnet.data.progress import report

        report("decoding train", 0, 1000)
        clock.now += 1.0
        report("decoding train", 250, 1000)
        data = next(line for line in screen(progress, 80) if line.startswith("data"))
        assert "decoding train 250/1,000" in data and "eta 0:03" in data
    assert not any(line.startswith("data") for line in screen(progress, 80))


# --- where the phases come from ------------------------------------------------------------


def test_decoding_reports_images_done_of_total(tmp_path):
    paths = []
    for i in range(600):  # two chunks
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((4, 4, 3), i % 256, np.uint8)).save(path)
        paths.append(str(path))
    heard: list[tuple[str, int, int]] = []
    with reporting_to(lambda *a: heard.append(a)):
        folder.decode_all(paths, 4, what="decoding train")
    assert heard[0] == ("decoding train", 0, 600) and heard[-1] == ("decoding train", 600, 600)
    assert [d for _, d, _ in heard] == sorted(d for _, d, _ in heard)
    folder.decode_all(paths[:2], 4)  # nobody listening: nothing to tell, nothing fails


def test_training_reports_its_phases_epoch_by_epoch(tmp_path):
    cfg = build_config("quick", {"data.synthetic.train_size": 64, "data.synthetic.val_size": 32,
                                 "train.epochs": 2, "runtime.device": "cpu"})
    phases: list[tuple[str, int]] = []
    train_run(cfg, checkpoint=Checkpoint(tmp_path / "c.pt"),
              on_phase=lambda name, epoch: phases.append((name, epoch)))
    assert phases == [(p, e) for e in (1, 2) for p in ("training", "validating", "checkpointing")]


def test_run_log_appends_across_a_resume(tmp_path):
    first = RunLog(None, "run", tmp_path)
    first.write("relu seed 0  epoch 1/2  ...")
    first.close()
    again = RunLog(None, "run", tmp_path)  # the resumed run, same artifact folder
    again.write("relu seed 0  epoch 2/2  ...")
    again.close()
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert [line.split("  ", 1)[1] for line in lines] == ["relu seed 0  epoch 1/2  ...",
                                                          "relu seed 0  epoch 2/2  ..."]
    assert Path(tmp_path / "train.log").stat().st_size > 0


# --- a real run in a terminal ------------------------------------------------------------------

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


class Terminal:
    """``ablate`` on a pseudo-terminal of 80x24, as a user runs it: its screen output as
    text segments (rows as drawn, escape codes removed), and a keyboard for Ctrl-C."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))

        def controlling_terminal() -> None:  # as a shell does: Ctrl-C reaches this process
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        self.proc = subprocess.Popen([ABLATE, *args], cwd=cwd, stdin=slave, stdout=slave,
                                     stderr=slave, preexec_fn=controlling_terminal,
                                     env={**env, "TERM": "xterm-256color"})
        os.close(slave)
        self.raw = b""

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode("utf-8", "replace"))

    def rows(self) -> list[str]:
        return [row for row in re.split(r"[\r\n]", self.text) if row.strip()]

    def read_until(self, seen: Callable[[list[str]], bool], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not seen(self.rows()):
            assert time.monotonic() < deadline, "not seen in time:\n" + self.text[-3000:]
            assert self.proc.poll() is None or self._read(0.1), "exited:\n" + self.text[-3000:]
            self._read(0.2)

    def _read(self, wait: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], wait)
        if not ready:
            return False
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # the other side closed
            return False
        self.raw += chunk
        return bool(chunk)

    def finish(self, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None or self._read(0.1):
            assert time.monotonic() < deadline, "did not end:\n" + self.text[-3000:]
            self._read(0.2)
        os.close(self.master)
        return self.proc.returncode


def images(root: Path, per_class: int) -> None:
    rng = np.random.default_rng(0)
    for k, name in enumerate(("ant", "bee", "cat")):
        (root / "train" / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(40 * k + rng.normal(100, 40, (32, 32, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / "train" / name / f"{i}.png")


SLOW = """\
name: slow
title: one cell whose steps take seconds on a CPU
base:
  profile: cifar
  set:
    model.width: 1.0
    data.source: imagefolder
    data.root: {root}
    data.val_fraction: 0.2
    train.batch_size: 192
    train.epochs: 2
    runtime.device: cpu
    runtime.threads: 1
axes:
  activation:
    relu: {{model.activation: relu}}
seeds: [0]
"""


def cell_rows(rows: list[str]) -> list[str]:
    return [row for row in rows if "relu seed 0" in row and " ep " in f"{row} "]


@pytest.mark.slow
def test_in_a_terminal_a_cell_shows_its_phases_an_eta_in_epoch_1_and_ctrl_c_resumes(tmp_path):
    images(tmp_path / "images", per_class=160)  # 384 training images: 2 steps of 192
    (tmp_path / "ablations").mkdir()
    (tmp_path / "ablations" / "slow.yaml").write_text(SLOW.format(root=tmp_path / "images"))

    term = Terminal(tmp_path, "run", "slow")
    term.read_until(lambda rows: any("2/2 ep" in r and "training" in r for r in rows))
    rows = term.rows()
    assert any(r.startswith("data") and "decoding train" in r for r in rows)
    epoch_1 = [r for r in cell_rows(rows) if "1/2 ep" in r]
    with_eta = [i for i, r in enumerate(epoch_1) if "training" in r and re.search(r"eta \d", r)]
    assert with_eta, "\n".join(epoch_1)  # an ETA while epoch 1 still trains
    assert any("validating" in r for r in epoch_1)
    logged = term.text.index("relu seed 0  epoch 1/2  ")
    assert term.text.index(epoch_1[with_eta[0]]) < logged
    speed = re.search(r"epoch 1/2 .*?([\d,]+) img/s", term.text[logged:], re.DOTALL)
    assert speed and int(speed.group(1).replace(",", "")) < 192  # steps of more than 1 s
    os.write(term.master, b"\x03")  # Ctrl-C, in epoch 2
    assert term.finish() == 130
    assert "interrupted (SIGINT); finished cells are kept and the same command resumes the " \
        "rest" in re.sub(r"\s+", " ", term.text)
    assert "Traceback" not in term.text

    resumed = Terminal(tmp_path, "run", "slow")
    assert resumed.finish() == 0
    rows = cell_rows(resumed.rows())
    assert rows and all("1/2 ep" not in r and "0/2 ep" not in r for r in rows)  # no jump
    assert "slow: 1 cell to train" in resumed.text
    assert "relu seed 0  epoch 2/2" in resumed.text and "summary: slow" in resumed.text
