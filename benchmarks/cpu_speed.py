"""CPU training speed: the project's step with its defaults against plain fp32.

    python benchmarks/cpu_speed.py [--steps N] [--warmup N] [--rounds N] [--threads N]
                                   [--with-compile] [--quick]

For ``convnet4`` and ``alexnet_cifar`` (width 1, batch 128, 32x32 images, the ``cifar``
profile's recipe) two arms train side by side in one process:

- defaults: the run config's ``runtime`` defaults, set up as ``train_run`` sets them up
  (``alexnet.train.prepare_model``: bf16 autocast where the CPU has native bf16, layout,
  compile) and stepped through ``alexnet.train.train_epoch``, the step users get;
- plain fp32: the same step with ``runtime.amp=off``, ``channels_last=false``,
  ``compile=false``.

After the warm-up steps (not timed) the timed steps are cut into rounds and the arms take
turns, so a machine shared with other work slows both alike; images/s is the total over
the rounds. ``--with-compile`` adds a third arm, the defaults plus ``torch.compile``, and
prints its compile + warm-up time. The last line is ``speedup: N.Nx``, the geometric mean
over the two models of defaults / plain fp32. ``--quick`` is a seconds-long smoke run
(tiny widths, batch 16), labelled as such.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from alexnet.config import RunConfig, build_config
from alexnet.models import build_model_from_config
from alexnet.train import (
    cpu_has_native_bf16,
    make_optimizer,
    prepare_model,
    seed_everything,
    train_epoch,
    use_bf16,
)

MODELS = ("convnet4", "alexnet_cifar")
PLAIN_FP32 = {"runtime.amp": "off", "runtime.channels_last": False, "runtime.compile": False}
CPU = torch.device("cpu")


@dataclass
class Arm:
    """One way of training one model, and the time its timed steps took."""

    label: str
    cfg: RunConfig
    step_model: nn.Module
    optimizer: torch.optim.Optimizer
    channels_last: bool
    warmup_seconds: float = 0.0
    seconds: float = 0.0
    images: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def run_config(name: str, width: float, batch: int, overrides: dict) -> RunConfig:
    return build_config("cifar", {"model.name": name, "model.width": width,
                                  "train.batch_size": batch, "runtime.device": "cpu",
                                  **overrides})


def describe(cfg: RunConfig, channels_last: bool) -> str:
    parts = ["bf16 autocast" if use_bf16(CPU, cfg) else "fp32",
             "channels_last" if channels_last else "NCHW"]
    if cfg.runtime.compile:
        parts.append("compiled")
    return ", ".join(parts)


def make_arm(label: str, cfg: RunConfig) -> Arm:
    """Model, layout, compile and optimizer exactly as ``train_run`` builds them."""
    seed_everything(cfg.seed)
    model = build_model_from_config(cfg.model, num_classes=10).to(CPU)
    model, step_model, channels_last = prepare_model(model, CPU, cfg)
    return Arm(label, cfg, step_model, make_optimizer(cfg, model), channels_last)


def train_steps(arm: Arm, batch: tuple[torch.Tensor, torch.Tensor], steps: int) -> float:
    """Seconds for ``steps`` training steps of ``arm`` on one fixed batch."""
    start = time.perf_counter()
    loss_sum, _, _ = train_epoch(arm.step_model, iter([batch] * steps), arm.optimizer, CPU,
                                 arm.cfg, arm.channels_last, None, steps)
    loss_sum.item()  # the epoch's one read-back, as in train_run
    return time.perf_counter() - start


def measure(arms: list[Arm], batch: tuple[torch.Tensor, torch.Tensor], warmup: int,
            steps: int, rounds: int) -> None:
    for arm in arms:
        arm.warmup_seconds = train_steps(arm, batch, warmup)
    per_round = max(1, steps // rounds)
    for _ in range(rounds):
        for arm in arms:  # take turns: load from other work falls on every arm alike
            arm.seconds += train_steps(arm, batch, per_round)
            arm.images += per_round * batch[0].shape[0]


def main(argv: Sequence[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per arm first")
    parser.add_argument("--rounds", type=int, default=4, help="turns the timed steps take")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--with-compile", action="store_true",
                        help="add the defaults + torch.compile arm")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    args = parser.parse_args(argv)
    width, batch_size = 1.0, 128
    if args.quick:
        width, batch_size, args.warmup, args.steps, args.rounds = 0.125, 16, 1, 2, 2
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"device: CPU, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, native bf16: "
          f"{'yes' if cpu_has_native_bf16() else 'no'}"
          f"{' (QUICK smoke run: tiny widths, not a measurement)' if args.quick else ''}")
    print(f"width {width:g}, batch {batch_size}, 32x32, {args.warmup} warm-up + {args.steps} "
          f"timed steps per arm in {args.rounds} alternating rounds\n")
    print("| model | arm | mode | warm-up s | images/s | vs plain fp32 |")
    print("|---|---|---|---:|---:|---:|")
    ratios: dict[str, float] = {}
    for name in MODELS:
        defaults = run_config(name, width, batch_size, {})
        arms = [make_arm("defaults", defaults),
                make_arm("plain fp32", run_config(name, width, batch_size, PLAIN_FP32))]
        if args.with_compile:
            torch.compiler.reset()
            arms.append(make_arm("defaults + compile",
                                 run_config(name, width, batch_size, {"runtime.compile": True})))
        generator = torch.Generator().manual_seed(0)
        batch = (torch.randn(batch_size, 3, 32, 32, generator=generator),
                 torch.randint(0, 10, (batch_size,), generator=generator))
        measure(arms, batch, args.warmup, args.steps, args.rounds)
        plain = arms[1].images_per_second
        for arm in arms:
            print(f"| {name} | {arm.label} | {describe(arm.cfg, arm.channels_last)} | "
                  f"{arm.warmup_seconds:.1f} | {arm.images_per_second:,.1f} | "
                  f"{arm.images_per_second / plain:.2f}x |")
        ratios[name] = arms[0].images_per_second / plain
    speedup = statistics.geometric_mean(ratios.values())
    each = ", ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items())
    print(f"\ndefaults vs plain fp32: {each}; geometric mean:")
    print(f"speedup: {speedup:.1f}x")
    return speedup


if __name__ == "__main__":
    main()
