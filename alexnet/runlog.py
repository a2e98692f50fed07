"""A run's log: one line per epoch (losses, errors, learning rate, speed), as timm's train
script prints, shown above the progress bars and kept as the run's ``train.log`` artifact.

One formatter for both places, so the terminal and the artifact read alike.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

LOG_ARTIFACT = "train.log"


def cell_label(arms: dict[str, str], seed: int) -> str:
    """Short and readable at 80 columns: the arms' values and the seed, e.g. ``tanh seed 1``."""
    return f"{','.join(arms.values())} seed {seed}"


def epoch_line(label: str, m: dict[str, float], epochs: int) -> str:
    """``relu seed 0  epoch 3/8  train loss 1.234 err 45.6%  val loss 1.101 err 40.1% top-5 9.8%
    lr 0.01  1,234 img/s  5.2 s``"""
    width = len(str(epochs))
    return (f"{label}  epoch {int(m['epoch']):>{width}}/{epochs}  "
            f"train loss {m['train_loss']:.3f} err {100 * m['train_error']:.1f}%  "
            f"val loss {m['val_loss']:.3f} err {100 * m['val_error']:.1f}% "
            f"top-5 {100 * m['val_error_top5']:.1f}%  lr {m['lr']:.3g}  "
            f"{m['images_per_second']:,.0f} img/s  {m['epoch_seconds']:.1f} s")


def end_line(label: str, state: str, final: dict[str, float] | None, reason: str | None
             ) -> str:
    """How a cell ended, e.g. ``relu seed 0  finished: 8 epochs, val err 40.1%, 41 s``."""
    f = final or {}
    parts = []
    if "epochs_completed" in f:
        parts.append(f"{f['epochs_completed']:.0f} epochs")
    for key, name in (("final_val_error", "val err"), ("test_error", "test err")):
        if key in f:
            parts.append(f"{name} {100 * f[key]:.1f}%")
    if "train_seconds" in f:
        parts.append(f"{f['train_seconds']:.0f} s")
    if reason:
        parts.append(reason)
    return f"{label}  {state}" + (f": {', '.join(parts)}" if parts else "")


class RunLog:
    """The ``train.log`` artifact of a run, appended to as it trains. In a local store the
    file lives in the run's artifact folder from the first line, so an interrupted run keeps
    what it wrote and its resumption appends; elsewhere it is written here and uploaded when
    the run ends (after fetching what an earlier attempt uploaded)."""

    def __init__(self, c: Any, run_id: str, local_folder: Path | None) -> None:
        self.c, self.run_id = c, run_id
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if local_folder is not None:
            self.path = local_folder / LOG_ARTIFACT
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="ablate-log-")
            self.path = Path(self._tmp.name) / LOG_ARTIFACT
            with contextlib.suppress(Exception):  # absent: a new run
                c.download_artifacts(run_id, LOG_ARTIFACT, self._tmp.name)

    def write(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with self.path.open("a", encoding="utf-8") as f:
            f.write(f"{stamp}  {line}\n")

    def close(self) -> None:
        """Upload (when not written in place) and clean up; safe to call more than once."""
        if self._tmp is None:
            return
        if self.path.exists():
            with contextlib.suppress(Exception):  # a log is not worth failing a run for
                self.c.log_artifact(self.run_id, str(self.path))
        self._tmp.cleanup()
        self._tmp = None
