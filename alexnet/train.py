"""Train one run: the single function the grid, the sweep and the tests all call.

Read top to bottom: resolve the device, open the data, build the model, then per epoch
train (metrics accumulate on the device), evaluate, step the schedule, checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from alexnet.config import RunConfig
from alexnet.data import Data, open_data
from alexnet.models import build_model_from_config
from alexnet.results import EpochMetrics, RunResult

CHECKPOINT_FORMAT = 1


EpochCallback = Callable[[EpochMetrics], None]
StepCallback = Callable[[int, int], None]


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
    if o.name == "adam":  # what blog implementations use; the paper uses SGD (Section 5)
        return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                           weight_decay=o.weight_decay)


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


def _autocast(device: torch.device, cfg: RunConfig) -> contextlib.AbstractContextManager:
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
        with _autocast(device, cfg):
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


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, device: torch.device, cfg: RunConfig,
             channels_last: bool) -> tuple[float, float, float]:
    """Validation loss, top-1 and top-5 error. With ten crops (Section 4.1) the softmax
    outputs of the crops are averaged before scoring."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    wrong1 = torch.zeros((), device=device, dtype=torch.int64)
    wrong5 = torch.zeros((), device=device, dtype=torch.int64)
    n = 0
    k = min(5, data.num_classes)
    for images, labels in data.eval_batches(cfg.train.eval_batch_size):
        with _autocast(device, cfg):
            if images.dim() == 5:  # (B, crops, C, H, W)
                b, c = images.shape[:2]
                flat = _to_model_layout(images.flatten(0, 1), channels_last)
                probs = model(flat).float().softmax(1).view(b, c, -1).mean(1)
            else:
                probs = model(_to_model_layout(images, channels_last)).float().softmax(1)
        loss_sum += F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum").double()
        topk = probs.topk(k, dim=1).indices
        wrong1 += (topk[:, 0] != labels).sum()
        wrong5 += (~(topk == labels[:, None]).any(1)).sum()
        n += labels.shape[0]
    totals = torch.stack([loss_sum, wrong1.double(), wrong5.double()]).tolist()  # one sync
    return totals[0] / n, totals[1] / n, totals[2] / n


# --- checkpoints -------------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a process killed mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, key: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it belongs to this config, else None (start afresh)."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # a corrupt checkpoint costs the epochs since the start, nothing more
        return None
    if state.get("format") != CHECKPOINT_FORMAT or state.get("cell_key") != key:
        return None
    return state


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


def train_run(cfg: RunConfig, *, checkpoint_path: Path | None = None,
              on_epoch: EpochCallback | None = None, on_step: StepCallback | None = None,
              data: Data | None = None) -> RunResult:
    """Train one run from a validated config and return its history.

    With ``checkpoint_path`` the state is saved at the end of every epoch, and a run
    whose checkpoint exists resumes after its last finished epoch; on CPU it ends with
    the same numbers as an uninterrupted run. A NaN/inf loss ends the run with status
    "diverged", not an exception. ``on_epoch`` sees each new epoch's metrics (MLflow
    logging, Optuna pruning: an exception raised there propagates).
    """
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
    state = load_checkpoint(checkpoint_path, key) if checkpoint_path else None
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
        if checkpoint_path is not None and cfg.runtime.checkpoint:
            save_checkpoint(checkpoint_path, {
                "format": CHECKPOINT_FORMAT, "cell_key": key, "epoch": epoch,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "history": [h.as_dict() for h in result.history],
                "epochs_to_target": result.epochs_to_target,
                "train_seconds": result.train_seconds, "rng": _rng_state(device),
                "config": cfg.model_dump(mode="json")})
    return result
