"""Training speed on one GPU: the project's step beside the loops people write by hand.

    python benchmarks/gpu.py [--device auto|cpu|cuda] [--data-root PATH] [--steps N]
                             [--quick] [--no-compile] [--write-results] [--out FILE]

Measured in one process, one run, one row each:

- the paper's ``alexnet`` at 227 (two towers, one tower), batch 128 and 256, a fixed batch
  already on the device, through ``alexnet.train.train_epoch``: the step users get (bf16
  autocast and channels_last on CUDA, metrics summed on the device), eager and compiled;
- the same network, and torchvision's ``alexnet``, in the plain fp32 loop written by hand
  (no autocast, NCHW, ``loss.item()`` every step);
- the blog implementations' way: torchvision ``ImageFolder`` over the CIFAR-10 folder,
  per-image PIL ``Resize(227)`` (upsampling 32x32) + ``ToTensor`` + ``Normalize`` in
  ``DataLoader`` workers, torchvision ``alexnet``, Adam;
- one epoch of the CIFAR-10 folder for ``convnet4`` and ``alexnet_cifar`` through the
  project's data path (``open_data``, batches made on the device), train only and + eval.

FLOP/s count 6 x the multiply-accumulates per image (forward 2, backward 4), counted by
forward hooks on Conv2d/Linear; MFU is against the device's dense bf16 peak.
``--quick`` is a CPU smoke run: small batches, a few steps, width-reduced nets, labelled.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from alexnet.config import RunConfig, build_config
from alexnet.data import Data, open_data
from alexnet.errors import ConfigError, DataError
from alexnet.models import build_model, build_model_from_config
from alexnet.train import evaluate, make_optimizer, resolve_device, train_epoch, use_channels_last

HERE = Path(__file__).resolve().parent
RESULTS_FILE = HERE / "RESULTS.md"
DEFAULT_DATA_ROOT = Path(os.environ.get("ALEXNET_CIFAR10_ROOT",
                                        HERE.parent.parent / "shared" / "data" / "cifar10"))
MARK_START = "<!-- gpu-benchmark:start -->"
MARK_END = "<!-- gpu-benchmark:end -->"

# Dense (no 2:4 sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's datasheets (which
# print the sparse figure, twice these), matched on the CUDA device name in this order.
# "NVIDIA H100 80GB HBM3" is the SXM part; the NVL parts ("NVIDIA H100 NVL", "NVIDIA H200
# NVL") run at lower clocks and must match before the plain names. An unlisted part (a
# laptop GPU) gets no MFU rather than a guessed one.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100 SXM", 989.0),
    ("H100 80GB HBM3", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("A100", 312.0),
)

# The paper's cost per 227 image (PAPER.md); the hook counter is checked against these.
PAPER_MACS = {2: 724e6, 1: 1135e6}
TARGET_IMAGES_PER_S = 25_000  # alexnet two towers at 227, bf16
TARGET_EPOCH_S = {"convnet4": 1.0, "alexnet_cifar": 3.0}
TARGET_VS_BLOG = 20.0
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Settings:
    device: torch.device
    batches: tuple[int, ...]
    steps: int  # timed steps per row
    warmup: int  # untimed steps before each timed region
    width: float  # of the 227 `alexnet` rows: 1.0 unless --quick
    cifar_widths: dict[str, float]  # of the epoch rows
    compile: bool
    data_root: Path
    workers: int  # DataLoader workers of the blog loop
    max_train: int | None  # training images of the epoch rows (None: the whole folder)
    eval_fraction: float  # of the folder, scored by the "+ eval" rows
    quick: bool

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class Row:
    what: str
    batch: int | None = None
    images_per_s: float | None = None
    macs: float | None = None  # per image, forward; None: not counted for this row
    seconds: float | None = None  # wall time of an epoch row
    note: str = ""
    compare: bool = False  # an alexnet-at-227 row, comparable with the project's step
    kind: str = ""  # project | project-compiled | plain | torchvision | blog | epoch-...
    model: str = ""


# --- counting and timing ------------------------------------------------------------------


def count_macs(model: nn.Module, size: int) -> int:
    """Multiply-accumulates of one forward pass per image, over Conv2d and Linear layers.

    Runs on a copy-free meta tensor when the model lives on the meta device; a grouped
    convolution's kernel sees in_channels / groups maps, which is what makes the two-tower
    net cheaper (Section 3.2). Pooling, LRN and activations are not counted (<1%).
    """
    total = 0

    def hook(module: nn.Module, _inputs: tuple, out: torch.Tensor) -> None:
        nonlocal total
        per_image = out[0].numel()
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += per_image * (module.in_channels // module.groups) * kh * kw
        else:
            total += per_image * module.in_features

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    param = next(model.parameters())
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype))
    finally:
        for h in handles:
            h.remove()
    return total


def macs_of(make: Callable[[], nn.Module], size: int) -> int:
    """Count on the meta device: no memory, no init, instant even for 60 M parameters."""
    with torch.device("meta"):
        return count_macs(make(), size)


def elapsed(device: torch.device, run: Callable[[], object]) -> float:
    """Seconds taken by ``run()``. On CUDA: CUDA events around it and one synchronize
    before (so earlier work is not billed) and after (so queued work is)."""
    if device.type != "cuda":
        started = time.perf_counter()
        run()
        return time.perf_counter() - started
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def release(device: torch.device) -> None:
    """Free the last row's model and optimizer state before the next row is built."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_batch(s: Settings, batch: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch already on the device: these rows time the step, not the data."""
    g = torch.Generator(device=s.device).manual_seed(0)
    images = torch.randn(batch, 3, 227, 227, device=s.device, generator=g)
    labels = torch.randint(0, num_classes, (batch,), device=s.device, generator=g)
    return images, labels


def alexnet_name(s: Settings, towers: int) -> str:
    width = "" if s.width == 1 else f" w={s.width:g} (--quick)"
    return f"alexnet{width} {towers} tower{'s' if towers > 1 else ''} @227"


# --- the rows -----------------------------------------------------------------------------


def project_config(s: Settings, towers: int, compiled: bool) -> RunConfig:
    return build_config("imagenet", {
        "model.towers": towers, "model.width": s.width,
        "runtime.device": str(s.device), "runtime.compile": compiled})


def project_step_row(s: Settings, towers: int, batch: int, compiled: bool) -> Row:
    """The step ``train_run`` takes, set up as ``train_run`` sets it up."""
    cfg = project_config(s, towers, compiled)
    model = build_model_from_config(cfg.model, num_classes=1000).to(s.device)
    channels_last = use_channels_last(s.device, cfg)  # as train_run
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    if compiled:
        torch.compiler.reset()  # a fresh compile per row: the warm-up below is all of it
    step_model = torch.compile(model) if compiled else model
    images, labels = device_batch(s, batch, 1000)

    def run(steps: int) -> None:
        # train_epoch itself, fed the same on-device batch: autocast, layout change,
        # optimizer step and on-device metric sums exactly as a real epoch has them.
        train_epoch(step_model, itertools.repeat((images, labels), steps), optimizer,
                    s.device, cfg, channels_last, None, steps)

    warm = elapsed(s.device, lambda: run(s.warmup))
    seconds = elapsed(s.device, lambda: run(s.steps))
    mode = "bf16 autocast, channels_last" if s.cuda else "CPU: fp32, NCHW, as train_run"
    note = f"compile + {s.warmup} warm-up steps: {warm:.1f} s, not timed" if compiled else ""
    macs = macs_of(lambda: build_model_from_config(cfg.model, num_classes=1000), 227)
    return Row(f"{alexnet_name(s, towers)}: project step ({mode}"
               f"{', torch.compile' if compiled else ''})",
               batch, batch * s.steps / seconds, macs=macs, note=note, compare=True,
               kind="project-compiled" if compiled else "project", model=f"alexnet{towers}")


def hand_loop(model: nn.Module, optimizer: torch.optim.Optimizer,
              batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
              steps: int) -> float:
    """The loop of tutorials and blog posts: fp32, NCHW, and ``loss.item()`` every step.

    The ``.item()`` is kept on purpose: printing or summing a Python float each step is how
    that code tracks its loss, and it makes the host wait for the GPU every step, so the
    next step's kernels are never queued ahead. Timing it away would flatter the loop.
    "fp32" is PyTorch's default fp32, which lets cuDNN run convolutions in TF32; the
    report prints the precision settings in force.
    """
    running = 0.0
    for _ in range(steps):
        images, labels = next(batches)
        images, labels = images.to(device), labels.to(device)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running += loss.item()
    return running


def plain_loop_row(s: Settings, batch: int, torchvision_net: bool) -> Row:
    """The paper's net (or torchvision's) in the hand-written fp32 loop, SGD as Section 5."""
    if torchvision_net:
        make = lambda: torchvision.models.alexnet(weights=None)  # noqa: E731
        name = "torchvision alexnet @227"
    else:
        make = lambda: build_model("alexnet", towers=2, width=s.width)  # noqa: E731
        name = alexnet_name(s, 2)
    model = make().to(s.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    batches = itertools.repeat(device_batch(s, batch, 1000))
    elapsed(s.device, lambda: hand_loop(model, optimizer, batches, s.device, s.warmup))
    seconds = elapsed(s.device, lambda: hand_loop(model, optimizer, batches, s.device, s.steps))
    return Row(f"{name}: plain fp32 loop (no autocast, NCHW, loss.item() per step)",
               batch, batch * s.steps / seconds, macs=macs_of(make, 227), compare=True,
               kind="torchvision" if torchvision_net else "plain",
               model="tv" if torchvision_net else "alexnet2")


def cycle(loader: torch.utils.data.DataLoader) -> Iterator:
    for _ in itertools.count():
        yield from loader


def blog_loop_row(s: Settings, batch: int) -> Row:
    """What the blog implementations this project grew out of do with CIFAR-10.

    Every 32x32 image is upsampled to 227 in PIL, one image at a time in DataLoader
    workers (PAPER.md: ~50x the compute of training at 32), then torchvision's alexnet
    and Adam in the hand-written fp32 loop. Worker start-up falls in the warm-up.
    """
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.Resize(227), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    dataset = datasets.ImageFolder(str(s.data_root / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=s.workers,
        pin_memory=s.cuda, persistent_workers=s.workers > 0)
    make = lambda: torchvision.models.alexnet(weights=None, num_classes=len(dataset.classes))  # noqa: E731
    model = make().to(s.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batches = cycle(loader)
    elapsed(s.device, lambda: hand_loop(model, optimizer, batches, s.device, s.warmup))
    seconds = elapsed(s.device, lambda: hand_loop(model, optimizer, batches, s.device, s.steps))
    return Row(f"blog loop: ImageFolder + PIL Resize(227) + DataLoader(num_workers="
               f"{s.workers}), torchvision alexnet, Adam, fp32", batch,
               batch * s.steps / seconds, macs=macs_of(make, 227), compare=True, kind="blog",
               model="tv")


def open_cifar(s: Settings) -> tuple[Data, Data, float]:
    """The folder through ``open_data``, as a run with data.source=imagefolder opens it.

    Two views of the one decode cache: all training images (val_fraction 0, so the epoch
    is the folder's 50,000), and a carved split of ``eval_fraction`` for the eval rows.
    """
    cfg = cifar_config(s, "convnet4", compiled=False).data
    started = time.perf_counter()
    train = open_data(cfg, s.device)
    held_out = open_data(cfg.model_copy(update={"val_fraction": s.eval_fraction,
                                                "max_train": None}), s.device)
    return train, held_out, time.perf_counter() - started


def cifar_config(s: Settings, name: str, compiled: bool) -> RunConfig:
    return build_config("cifar", {
        "model.name": name, "model.width": s.cifar_widths[name],
        "data.source": "imagefolder", "data.root": str(s.data_root),
        "data.val_fraction": 0.0, "data.max_train": s.max_train,
        "runtime.device": str(s.device), "runtime.compile": compiled})


def cifar_epoch_rows(s: Settings, name: str, train: Data, held_out: Data,
                     compiled: bool) -> list[Row]:
    """One timed epoch (train only, then + eval) of ``name`` on the project's data path."""
    cfg = cifar_config(s, name, compiled)
    model = build_model_from_config(cfg.model, num_classes=train.num_classes).to(s.device)
    channels_last = use_channels_last(s.device, cfg)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    if compiled:
        torch.compiler.reset()
    step_model = torch.compile(model) if compiled else model
    bs = cfg.train.batch_size

    def epoch(number: int, steps: int | None = None) -> None:
        batches = itertools.islice(train.train_batches(number, bs, cfg.seed), steps)
        loss_sum, wrong, _ = train_epoch(step_model, batches, optimizer, s.device, cfg,
                                         channels_last, None, train.steps_per_epoch(bs))
        torch.stack([loss_sum, wrong.double()]).tolist()  # train_run's one read per epoch

    def warm_up() -> None:
        # Compiled: a whole epoch and an eval pass, so that the tail batch's shape and eval
        # mode are compiled before the clock starts. Eager: a few steps.
        if compiled:
            epoch(0)
            evaluate(step_model, held_out, s.device, cfg, channels_last)
        else:
            epoch(0, s.warmup)

    warm = elapsed(s.device, warm_up)
    train_s = elapsed(s.device, lambda: epoch(1))
    eval_s = elapsed(s.device, lambda: evaluate(step_model, held_out, s.device, cfg,
                                                channels_last))
    width = "" if s.cifar_widths[name] == 1 else f" w={s.cifar_widths[name]:g} (--quick)"
    mode = ("bf16, channels_last" if s.cuda else "CPU fp32") + (", compiled" if compiled else "")
    label = f"{name}{width} @32: CIFAR-10 epoch, data path ({mode})"
    n, m = train.train_size, held_out.val_size
    note = f"compile + warm-up epoch: {warm:.1f} s, not timed" if compiled else ""
    kind = "epoch-compiled" if compiled else "epoch"
    return [
        Row(f"{label}, train {n:,}", bs, n / train_s, seconds=train_s, note=note,
            kind=kind, model=name),
        Row(f"{label}, train {n:,} + eval {m:,}", bs, n / (train_s + eval_s),
            seconds=train_s + eval_s, kind=kind + "+eval", model=name),
    ]


# --- running everything -------------------------------------------------------------------


def measure(rows: list[Row], what: str, make: Callable[[], Row | list[Row]],
            device: torch.device) -> None:
    """Run one row; a failure (out of memory, no compiler) becomes a row saying so."""
    print(f"measuring: {what} ...", file=sys.stderr, flush=True)
    try:
        out = make()
        rows.extend(out if isinstance(out, list) else [out])
    except Exception as err:  # one broken row should not lose the others' numbers
        rows.append(Row(what, note=f"failed: {type(err).__name__}: {str(err).splitlines()[0]}"
                        if str(err) else f"failed: {type(err).__name__}"))
    finally:
        release(device)


def run_all(s: Settings) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    notes: list[str] = []
    dev = s.device
    modes = [False, True] if s.compile else [False]
    for compiled, towers, batch in itertools.product(modes, (2, 1), s.batches):
        what = f"{alexnet_name(s, towers)} project step, batch {batch}" + (
            ", compiled" if compiled else "")
        measure(rows, what, lambda t=towers, b=batch, c=compiled:
                project_step_row(s, t, b, c), dev)
    for batch in s.batches:
        measure(rows, f"plain fp32 loop, batch {batch}",
                lambda b=batch: plain_loop_row(s, b, torchvision_net=False), dev)
        measure(rows, f"torchvision alexnet fp32 loop, batch {batch}",
                lambda b=batch: plain_loop_row(s, b, torchvision_net=True), dev)

    if not (s.data_root / "train").is_dir():
        skip = f"skipped: no image folder at {s.data_root} (pass --data-root PATH/cifar10)"
        notes.append(f"data rows {skip}")
        rows.append(Row("blog loop (ImageFolder + PIL Resize(227) + DataLoader)",
                        note=skip, compare=True, kind="blog"))
        for name in ("convnet4", "alexnet_cifar"):
            rows.append(Row(f"{name} @32: CIFAR-10 epoch, data path", note=skip, kind="epoch"))
        return rows, notes

    measure(rows, "blog loop", lambda: blog_loop_row(s, s.batches[0]), dev)
    try:
        train, held_out, load_s = open_cifar(s)
    except DataError as err:
        notes.append(f"epoch rows skipped: {err}")
        return rows, notes
    notes.append(f"data path: {train.train_size:,} training and {held_out.val_size:,} eval "
                 f"images from {s.data_root}, opened (decode or cache read, stats) in "
                 f"{load_s:.1f} s, not timed")
    for compiled, name in itertools.product(modes, ("convnet4", "alexnet_cifar")):
        measure(rows, f"{name} CIFAR-10 epoch" + (", compiled" if compiled else ""),
                lambda n=name, c=compiled: cifar_epoch_rows(s, n, train, held_out, c), dev)
    return rows, notes


# --- the table ----------------------------------------------------------------------------


def peak_for(name: str) -> float | None:
    """Dense bf16 TFLOP/s of the GPU called ``name``; None when it is not in the table."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def peak_tflops(device: torch.device) -> float | None:
    return peak_for(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {torch.get_num_threads()} thread(s))"


def reference(rows: list[Row]) -> dict[int, float]:
    """images/s of the project's step per batch: the paper's two-tower net, eager."""
    return {r.batch: r.images_per_s for r in rows
            if r.kind == "project" and r.model == "alexnet2" and r.images_per_s}


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def table(rows: list[Row], device: torch.device) -> pd.DataFrame:
    ref = reference(rows)
    peak = peak_tflops(device)
    records = []
    for r in rows:
        tflops = r.images_per_s * 6 * r.macs / 1e12 if r.images_per_s and r.macs else None
        if tflops is None:
            mfu = ""
        elif peak is None:
            mfu = "n/a"
        else:
            mfu = f"{tflops / peak:.1%}"
        vs = ref.get(r.batch) if r.compare and r.images_per_s else None
        records.append({
            "what": r.what,
            "batch": str(r.batch) if r.batch else "",
            "images/s": fmt_rate(r.images_per_s) if r.images_per_s else "",
            "vs project step": f"{r.images_per_s / vs:.2f}x" if vs else "",
            "TFLOP/s": f"{tflops:.3g}" if tflops is not None else "",
            "MFU": mfu,
            "epoch s": f"{r.seconds:.2f}" if r.seconds is not None else "",
            "note": r.note,
        })
    return pd.DataFrame.from_records(records)


def fp32_precision() -> str:
    """What "fp32" means on this GPU with PyTorch's defaults (never changed here)."""
    try:
        conv = torch.backends.cudnn.conv.fp32_precision
        matmul = torch.backends.cuda.matmul.fp32_precision
    except AttributeError:  # before torch 2.9
        conv = "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
        matmul = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return f"fp32 rows at PyTorch defaults: cuDNN conv fp32_precision={conv}, matmul={matmul}"


def environment(s: Settings, macs: dict[int, int]) -> list[str]:
    peak = peak_tflops(s.device)
    peak_text = f"{peak:g} TFLOP/s" if peak else "unknown" if s.cuda else "n/a on CPU"
    cudnn = torch.backends.cudnn.version() if s.cuda else None
    check = ", ".join(f"{t} tower{'s' if t > 1 else ''} {macs[t] / 1e6:,.1f} M "
                      f"(paper ~{PAPER_MACS[t] / 1e6:,.0f} M)" for t in (2, 1))
    return [
        f"- device: {device_name(s.device)}; dense bf16 peak: {peak_text}",
        f"- torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA "
        f"{torch.version.cuda or 'n/a'}" + (f", cuDNN {cudnn}" if cudnn else "")
        + f", Python {platform.python_version()}",
        f"- {s.steps} timed steps after {s.warmup} warm-up steps per row; compile: "
        f"{'on' if s.compile else 'off (--no-compile)'}"
        + ("; --quick: reduced sizes, a smoke run" if s.quick else "")
        + f"; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- MACs per 227 image, hook counter over Conv2d/Linear, full width: {check}; "
        "training FLOPs = 6 x MACs",
        "- images/s: training images per second; vs project step: this row's images/s "
        "over the project step's (alexnet two towers, eager) at the same batch; epoch "
        "rows: training images over the epoch's seconds (eval included in + eval rows)",
    ]


def best(rows: list[Row], kinds: tuple[str, ...], model: str, batch: int | None = None
         ) -> Row | None:
    found = [r for r in rows if r.kind in kinds and r.model == model and r.images_per_s
             and (batch is None or r.batch == batch)]
    return max(found, key=lambda r: r.images_per_s, default=None)


def ratio(a: Row | None, b: Row | None) -> float | None:
    return a.images_per_s / b.images_per_s if a and b else None


def summary(rows: list[Row], s: Settings) -> str:
    """The headline: the project's step against each hand-written alternative."""
    b = s.batches[0]
    project = best(rows, ("project",), "alexnet2", b)
    parts = []
    for label, kind, model in (("plain fp32 loop", "plain", "alexnet2"),
                               ("torchvision fp32 loop", "torchvision", "tv"),
                               ("blog loop", "blog", "tv")):
        x = ratio(project, best(rows, (kind,), model, b))
        parts.append(f"vs {label}: {x:.1f}x" if x else f"vs {label}: n/a")
    # The blog loop trains CIFAR-10 at 227; the project trains it at 32 (alexnet_cifar).
    x = ratio(best(rows, ("epoch", "epoch-compiled"), "alexnet_cifar"),
              best(rows, ("blog",), "tv"))
    parts.append("CIFAR-10 training images/s, alexnet_cifar on the data path vs blog loop: "
                 + (f"{x:.1f}x" if x else "n/a"))
    line = f"project step (alexnet two towers, batch {b}) " + "; ".join(parts)
    if s.quick:
        line += " (--quick: the project's nets are width-reduced, torchvision's is not)"
    return line


def targets(rows: list[Row], s: Settings) -> list[str]:
    """The project's GPU targets, measured; only meaningful (and only printed) on CUDA."""
    def verdict(ok: bool | None) -> str:
        return "n/a (rows skipped)" if ok is None else "met" if ok else "MISSED"

    lines = []
    top = best(rows, ("project", "project-compiled"), "alexnet2")
    lines.append(f"- alexnet two towers @227 >= {TARGET_IMAGES_PER_S:,} images/s: "
                 + (f"{top.images_per_s:,.0f} ({top.what}, batch {top.batch}) " if top else "")
                 + verdict(top.images_per_s >= TARGET_IMAGES_PER_S if top else None))
    for name, limit in TARGET_EPOCH_S.items():
        found = [r for r in rows if r.kind in ("epoch", "epoch-compiled") and r.model == name
                 and r.seconds]
        fastest = min(found, key=lambda r: r.seconds, default=None)
        lines.append(f"- {name} CIFAR-10 training epoch <= {limit:g} s: "
                     + (f"{fastest.seconds:.2f} s ({fastest.what}) " if fastest else "")
                     + verdict(fastest.seconds <= limit if fastest else None))
    blog = best(rows, ("blog",), "tv")
    fastest_step = best(rows, ("project", "project-compiled"), "alexnet2", s.batches[0])
    x = ratio(fastest_step, blog)
    lines.append(f"- >= {TARGET_VS_BLOG:g}x the blog loop's images/s (fastest project step "
                 f"at batch {s.batches[0]}): "
                 + (f"{x:.1f}x " if x else "") + verdict(x >= TARGET_VS_BLOG if x else None))
    return lines


def report(rows: list[Row], notes: list[str], s: Settings, macs: dict[int, int]) -> str:
    lines = ["### Training throughput: the project's step vs hand-written loops", "",
             *environment(s, macs)]
    if s.cuda:
        lines.append(f"- {fp32_precision()}")
    else:
        lines.append("- CPU run: absolute times say nothing about the GPU targets")
    lines += [f"- {n}" for n in notes]
    lines += ["", table(rows, s.device).to_markdown(index=False), ""]
    if s.cuda:
        lines += ["Targets:", "", *targets(rows, s), ""]
    lines.append(summary(rows, s))
    return "\n".join(lines) + "\n"


def write_between_markers(path: Path, block: str, mark_start: str = MARK_START,
                          mark_end: str = MARK_END) -> None:
    """Replace what lies between the markers in ``path``; add them at the end if absent.

    Nothing outside the markers is touched. The other GPU benchmarks have markers of their own.
    """
    text = path.read_text() if path.exists() else ""
    section = f"{mark_start}\n{block.rstrip()}\n{mark_end}"
    start, end = text.find(mark_start), text.find(mark_end)
    if start != -1 and end > start:
        text = text[:start] + section + text[end + len(mark_end):]
    elif start == -1 and end == -1:
        sep = "" if not text else "\n" if text.endswith("\n") else "\n\n"
        text = f"{text}{sep}{section}\n"
    else:
        raise SystemExit(f"{path}: only one of {mark_start} / {mark_end} found, or in the "
                         "wrong order; fix the markers by hand")
    path.write_text(text)


# --- command line -------------------------------------------------------------------------


def settings(args: argparse.Namespace) -> Settings:
    device = resolve_device(args.device)
    on_cpu = device.type == "cpu"
    steps = args.steps or (2 if args.quick else 3 if on_cpu else 50)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick or on_cpu else 10)
    return Settings(
        device=device,
        batches=(8, 16) if args.quick else (128, 256),
        steps=steps,
        warmup=warmup,
        width=0.25 if args.quick else 1.0,
        # convnet4 is small enough at full width even on a CPU; alexnet_cifar is not.
        cifar_widths={"convnet4": 1.0, "alexnet_cifar": 0.25 if args.quick else 1.0},
        compile=not args.no_compile,
        data_root=Path(args.data_root).expanduser(),
        workers=args.workers,
        max_train=512 if args.quick else None,
        eval_fraction=0.01 if args.quick else 0.2,  # 500 images, or 10,000 (CIFAR's test size)
        quick=args.quick,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT),
                   help="CIFAR-10 image folder holding train/<class>/*.jpg; the blog-loop and "
                        "epoch rows are skipped, with a note, when it is absent")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per row (default 50 on CUDA, 3 on CPU, 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps before each row (default 10 on CUDA, else 1)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader workers of the blog loop (blog posts use 2-4)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke run: batch 8/16, 2 steps, width-reduced nets (labelled), "
                        "512 training images in the epoch rows")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--write-results", action="store_true",
                   help=f"write the table between the markers in {RESULTS_FILE.name}")
    p.add_argument("--results-file", type=Path, default=RESULTS_FILE,
                   help="the file --write-results writes (default benchmarks/RESULTS.md)")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        s = settings(args)
    except ConfigError as err:  # --device cuda without a GPU: one line, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not s.cuda and not s.quick:
        print("warning: running on the CPU: absolute CPU times are not meaningful for the GPU "
              "targets, and full-size rows take minutes each; --quick is a smoke run",
              file=sys.stderr)
    macs = {t: macs_of(lambda t=t: build_model("alexnet", towers=t), 227) for t in (2, 1)}
    rows, notes = run_all(s)
    text = report(rows, notes, s, macs)
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    if args.write_results:
        write_between_markers(args.results_file, text)
        print(f"wrote {args.results_file}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
