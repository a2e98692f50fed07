"""What one run produced: per-epoch metrics and the outcome. Plain data, no torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal


@dataclass
class EpochMetrics:
    epoch: int  # 1-based
    train_loss: float
    train_error: float
    val_loss: float
    val_error: float
    val_error_top5: float
    lr: float
    epoch_seconds: float
    images_per_second: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class RunResult:
    status: Literal["finished", "diverged"]
    history: list[EpochMetrics] = field(default_factory=list)
    reason: str | None = None
    epochs_to_target: int | None = None  # first epoch with training error <= target
    train_seconds: float = 0.0
    device: str = "cpu"
    # The final model on the held-out test split, scored once; None: not measured (no test
    # split, scoring off, or the run diverged).
    test_loss: float | None = None
    test_error: float | None = None
    test_error_top5: float | None = None

    @property
    def final(self) -> dict[str, float]:
        """The numbers a report reads: the last epoch's, plus best, time, and the test
        split's when measured (absent otherwise, never a placeholder)."""
        out: dict[str, float] = {"epochs_completed": float(len(self.history)),
                                 "train_seconds": self.train_seconds}
        if self.history:
            last = self.history[-1]
            for name in ("train_loss", "train_error", "val_loss", "val_error", "val_error_top5"):
                out[f"final_{name}"] = getattr(last, name)
            out["best_val_error"] = min(h.val_error for h in self.history)
            out["mean_epoch_seconds"] = sum(h.epoch_seconds for h in self.history) / len(
                self.history
            )
        if self.epochs_to_target is not None:
            out["epochs_to_target"] = float(self.epochs_to_target)
        for name in ("test_loss", "test_error", "test_error_top5"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out
