"""Train one run: the single function the grid, the sweep and the tests all call.

Read top to bottom: resolve the device, open the data, build the model, then per epoch
train (metrics accumulate on the device), evaluate, step the schedule, checkpoint; at the
end, score the final model on the held-out test split, once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from alexnet.config import RunConfig
from alexnet.data import Data, open_data
from alexnet.models import build_model_from_config
from alexnet.results import EpochMetrics, RunResult

CHECKPOINT_FORMAT = 1
log = logging.getLogger(__name__)


EpochCallback = Callable[[EpochMetrics], None]
StepCallback = Callable[[int, int], None]
# (phase, epoch); phase: training | validating | checkpointing | testing
PhaseCallback = Callable[[str, int], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from alexnet.errors import ConfigError

        raise ConfigError("runtime.device: cuda was asked for but no CUDA device is visible; "
                          "use --device cpu or --device auto")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def make_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    # fused: the whole update as one kernel over all parameters, on CPU and CUDA alike; the
    # per-tensor loop costs more than the arithmetic for the small nets (quick profile: 5%
    # of a step). Same update, elementwise, so still deterministic.
    if o.name == "adam":  # what blog implementations use; the paper uses SGD (Section 5)
        return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay,
                                fused=True)
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                           weight_decay=o.weight_decay, fused=True)


def make_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer) -> Any:
    s = cfg.schedule
    if s.kind == "plateau":
        # Section 5: divide by 10 when validation error stops improving, three times at
        # most. The floor min_lr is what stops a fourth division.
        floor = cfg.optim.lr * s.factor**s.max_decays
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=s.factor, patience=s.patience, min_lr=floor,
            threshold=1e-3, threshold_mode="abs")
    if s.kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs)
    if s.kind == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=s.step_epochs,
                                               gamma=s.factor)
    return None  # constant: Figure 1 compares activations at fixed learning rates


# --- precision, layout, compile: how fast a run goes, never what it computes ------------
# Measured in benchmarks/cpu_speed.py (figures in benchmarks/RESULTS.md).


def cpu_has_native_bf16() -> bool:
    """True on an x86 CPU with bf16 arithmetic in hardware (AVX-512 BF16 or AMX-BF16).

    Elsewhere torch emulates bf16 on the CPU and autocast is slower than fp32, so ``auto``
    keeps fp32 there. ARM's bf16 extension is left out: not measured yet.
    """
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def use_bf16(device: torch.device, cfg: RunConfig) -> bool:
    """Whether the step runs under bf16 autocast: ``runtime.amp``, with ``auto`` resolved.

    Autocast keeps the weights, the optimizer and the loss in fp32; convs and matmuls (and
    LocallyConnected2d's einsum, a batched matmul) run in bf16.
    """
    if cfg.runtime.amp != "auto":
        return cfg.runtime.amp == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def use_channels_last(device: torch.device, cfg: RunConfig) -> bool:
    """channels_last on every device: on the CPU (oneDNN convs, max-pool vectorized over
    channels, LRN as one matmul) it measured faster than NCHW in fp32 and more so in bf16,
    from the quick profile's tiny nets up to width 1."""
    return cfg.runtime.channels_last


def prepare_model(model: nn.Module, device: torch.device, cfg: RunConfig
                  ) -> tuple[nn.Module, nn.Module, bool]:
    """Put ``model`` in the run's layout and wrap it for the step.

    Returns the model (whose state is saved), the module the step calls (compiled or the
    same one: they share parameters) and whether inputs go channels_last.
    """
    channels_last = use_channels_last(device, cfg)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if cfg.runtime.compile else model
    return model, step_model, channels_last


def autocast_for(device: torch.device, cfg: RunConfig) -> contextlib.AbstractContextManager:
    if use_bf16(device, cfg):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_model_layout(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if channels_last and images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    return images


def train_epoch(model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                optimizer: torch.optim.Optimizer, device: torch.device, cfg: RunConfig,
                channels_last: bool, on_step: StepCallback | None, steps: int
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One pass over the training batches. Returns on-device (loss sum, error count) and n.

    Nothing here reads a tensor back to the host: the sums are read once per epoch.
    """
    model.train()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    wrong = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    for step, (images, labels) in enumerate(batches, start=1):
        images = _to_model_layout(images, channels_last)
        with autocast_for(device, cfg):
            logits = model(images)
            loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach().double() * labels.shape[0]
        wrong += (logits.detach().argmax(1) != labels).sum()
        seen += labels.shape[0]
        if on_step is not None:
            on_step(step, steps)
    return loss_sum, wrong, seen


def softmax_probs(model: nn.Module, images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Float32 softmax outputs (B, classes) of one evaluation batch, under the caller's
    autocast. Ten crops (B, 10, C, H, W) are averaged per image (Section 4.1)."""
    if images.dim() == 5:  # (B, crops, C, H, W)
        b, c = images.shape[:2]
        flat = _to_model_layout(images.flatten(0, 1), channels_last)
        return model(flat).float().softmax(1).view(b, c, -1).mean(1)
    return model(_to_model_layout(images, channels_last)).float().softmax(1)


def score_batch(probs: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(loss sum, top-1 errors, top-k errors) of one batch as a float64 tensor on its
    device: summed over batches and read back once, with no host sync per batch."""
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum").double()
    topk = probs.topk(k, dim=1).indices
    wrong1 = (topk[:, 0] != labels).sum()
    wrongk = (~(topk == labels[:, None]).any(1)).sum()
    return torch.stack([loss, wrong1.double(), wrongk.double()])


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, device: torch.device, cfg: RunConfig,
             channels_last: bool, split: Literal["val", "test"] = "val"
             ) -> tuple[float, float, float]:
    """Validation (or test) loss, top-1 and top-5 error. With ten crops (Section 4.1) the
    softmax outputs of the crops are averaged before scoring."""
    model.eval()
    totals = torch.zeros(3, device=device, dtype=torch.float64)
    n = 0
    k = min(5, data.num_classes)
    batches = data.test_batches if split == "test" else data.eval_batches
    for images, labels in batches(cfg.train.eval_batch_size):
        with autocast_for(device, cfg):
            probs = softmax_probs(model, images, channels_last)
        totals += score_batch(probs, labels, k)
        n += labels.shape[0]
    loss_sum, wrong1, wrong5 = totals.tolist()  # one sync
    return loss_sum / n, wrong1 / n, wrong5 / n


# --- checkpoints -------------------------------------------------------------------------


class Checkpoint:
    """Where a run saves its state every epoch and resumes from: one file, written atomically
    (a process killed mid-write leaves the previous checkpoint intact) and read with
    ``weights_only=True``, so a file planted there can never run code. A checkpoint that cannot
    be read, or belongs to another config, costs the epochs since the start and one warning."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, key: str) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # weights_only refused something that could run code
            log.warning("checkpoint %s holds more than tensors and plain data (it was not "
                        "written by this project) and is never loaded; training from the "
                        "start", self.path)
            return None
        except Exception as err:  # truncated, garbage
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else \
                type(err).__name__
            log.warning("checkpoint %s cannot be read (%s); training from the start",
                        self.path, reason)
            return None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT \
                or state.get("cell_key") != key:
            log.warning("checkpoint %s belongs to another run config; training from the start",
                        self.path)
            return None
        return state

    def save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + f".tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def exists(self) -> bool:
        return self.path.exists()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # its folder too, once empty
            self.path.parent.rmdir()


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --- the run -----------------------------------------------------------------------------


def train_run(cfg: RunConfig, *, checkpoint: Checkpoint | None = None,
              on_epoch: EpochCallback | None = None, on_step: StepCallback | None = None,
              data: Data | None = None,
              on_end: Callable[[nn.Module], None] | None = None,
              score_test: bool = True, on_phase: PhaseCallback | None = None) -> RunResult:
    """Train one run from a validated config and return its history.

    With a ``checkpoint`` the state is saved at the end of every epoch, and a run whose
    checkpoint exists resumes after its last finished epoch; on CPU it ends with the same
    numbers as an uninterrupted run. A NaN/inf loss ends the run with status "diverged",
    not an exception. ``on_epoch`` sees each new epoch's metrics (MLflow logging, Optuna
    pruning: an exception raised there propagates); ``on_end`` gets the trained model of a
    run that did not diverge (its final weights are kept); ``on_phase`` hears what the run
    is doing, for progress displays (a resumed run starts with "training" at its next epoch).

    When the data has a test split and ``score_test`` is on, the final model is scored on
    it once, after the last epoch (or at once, when a resumed run has no epochs left);
    a diverged run is not scored. Sweeps pass ``score_test=False``: they tune on
    validation and must never see the test split.
    """
    phase = on_phase or (lambda name, epoch: None)
    device = resolve_device(cfg.runtime.device)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    seed_everything(cfg.seed)
    if data is None:
        data = open_data(cfg.data, device)
    model = build_model_from_config(cfg.model, num_classes=data.num_classes).to(device)
    model, step_model, channels_last = prepare_model(model, device, cfg)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer)

    result = RunResult(status="finished", device=str(device))
    key = cfg.key()
    start_epoch = 1
    state = checkpoint.load(key) if checkpoint is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        result.history = [EpochMetrics(**h) for h in state["history"]]
        result.epochs_to_target = state["epochs_to_target"]
        result.train_seconds = state["train_seconds"]
        _set_rng_state(state["rng"], device)
        start_epoch = len(result.history) + 1

    steps = data.steps_per_epoch(cfg.train.batch_size)
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        if result.epochs_to_target is not None and cfg.train.stop_at_target:
            break
        phase("training", epoch)
        lr = optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        batches = data.train_batches(epoch, cfg.train.batch_size, cfg.seed)
        loss_sum, wrong, seen = train_epoch(step_model, batches, optimizer, device, cfg,
                                            channels_last, on_step, steps)
        train_loss, train_wrong = torch.stack([loss_sum, wrong.double()]).tolist()  # one sync
        train_time = time.perf_counter() - t0
        if not math.isfinite(train_loss):
            result.status = "diverged"
            result.reason = f"diverged at epoch {epoch}: training loss is {train_loss}"
            break
        phase("validating", epoch)
        val_loss, val_error, val_error5 = evaluate(step_model, data, device, cfg, channels_last)
        metrics = EpochMetrics(
            epoch=epoch, train_loss=train_loss / seen, train_error=train_wrong / seen,
            val_loss=val_loss, val_error=val_error, val_error_top5=val_error5, lr=lr,
            epoch_seconds=time.perf_counter() - t0,
            images_per_second=seen / max(train_time, 1e-9))
        result.history.append(metrics)
        result.train_seconds += metrics.epoch_seconds
        if result.epochs_to_target is None and metrics.train_error <= cfg.train.target_train_error:
            result.epochs_to_target = epoch
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val_error)
        elif scheduler is not None:
            scheduler.step()
        # Report before saving: if the process dies in between, the epoch is trained and
        # reported again on resume (same numbers), rather than saved but never reported.
        if on_epoch is not None:
            on_epoch(metrics)
        if checkpoint is not None and cfg.runtime.checkpoint:
            phase("checkpointing", epoch)
            checkpoint.save({
                "format": CHECKPOINT_FORMAT, "cell_key": key, "epoch": epoch,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "history": [h.as_dict() for h in result.history],
                "epochs_to_target": result.epochs_to_target,
                "train_seconds": result.train_seconds, "rng": _rng_state(device),
                "config": cfg.model_dump(mode="json")})
    if score_test and data.test_size and result.status == "finished" and result.history:
        # The only read of the test split: nothing above (schedule, early stop, the
        # caller's on_epoch) has seen it, so it is an unbiased estimate of this model.
        phase("testing", len(result.history))
        result.test_loss, result.test_error, result.test_error_top5 = evaluate(
            step_model, data, device, cfg, channels_last, split="test")
    if on_end is not None and result.status == "finished":
        on_end(model)
    return result
