"""What the `ablate` commands share: their common options, the console, and how bad input
becomes one line and exit code 2."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from alexnet.errors import AblateError, ConfigError

if TYPE_CHECKING:
    from alexnet.executors import Executor

# Piped output (CI logs, `| tee`) gets a width that fits the tables instead of 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
state = {"debug": False}

Quick = Annotated[bool, typer.Option(
    "--quick", help="Synthetic data, tiny width, few epochs, Adam; the axes are kept.")]
Seeds = Annotated[str | None, typer.Option(help="N (seeds 0..N-1) or a list: 0,1,2")]
Epochs = Annotated[int | None, typer.Option(min=1, help="Override train.epochs.")]
Dataset = Annotated[str | None, typer.Option(help="synthetic | cifar10 | cifar100 | imagefolder")]
DataRoot = Annotated[Path | None, typer.Option(
    help="Where the data is: the image folder, or the CIFAR download cache.")]
Device = Annotated[str | None, typer.Option(help="auto | cpu | cuda")]
SetItems = Annotated[list[str] | None, typer.Option(
    "--set", help="key=value for any config key, e.g. optim.lr=0.02; repeatable.")]
TrackingUri = Annotated[str | None, typer.Option(
    "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlruns).")]
Jobs = Annotated[int, typer.Option(min=1, help="Cells (or trials) run at once, in processes.")]
ExecutorName = Annotated[str, typer.Option(
    "--executor", help="local: --jobs processes here; ray: each cell a Ray task, as many at "
                       "once as the cluster has room for (pip install -e '.[cluster]').")]
RayAddress = Annotated[str | None, typer.Option(
    "--ray-address", help="--executor ray: auto (the cluster `ray start` made), HOST:PORT or "
                          "ray://HOST:10001; default: a new Ray cluster on this machine.")]
GpusPerCell = Annotated[float | None, typer.Option(
    "--gpus-per-cell", help="--executor ray: a cell's share of a GPU, 0.25 = four per GPU "
                            "(default: estimated from the model and batch).")]
CpusPerCell = Annotated[float, typer.Option(
    "--cpus-per-cell", help="--executor ray: CPUs (threads) per cell that trains on CPUs.")]

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Bad input is one line on stderr and exit code 2; --debug shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AblateError as err:
            if state["debug"]:
                raise
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        if "," in text or text.startswith("["):
            return [int(s) for s in text.strip("[]").split(",") if s.strip()]
        n = int(text)
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give a count (3) or a list (0,1,2)") from None
    if n < 1:
        raise ConfigError(f"--seeds {text}: give at least one seed")
    return list(range(n))


def command_overrides(epochs: int | None, dataset: str | None, data_root: Path | None,
                      device: str | None, set_: list[str] | None) -> dict[str, Any]:
    """The dotted overrides that command-line options stand for; --set comes last."""
    from alexnet.config import parse_set

    overrides: dict[str, Any] = {}
    if epochs is not None:
        overrides["train.epochs"] = epochs
    if dataset is not None:
        overrides["data.source"] = dataset
    if data_root is not None:
        if not data_root.exists():
            raise ConfigError(f"--data-root {data_root}: no such directory; point it at the "
                              "folder holding train/<class>/... or the CIFAR archives")
        overrides["data.root"] = str(data_root.resolve())
    if device is not None:
        overrides["runtime.device"] = device
    overrides.update(parse_set(set_ or []))
    return overrides


def check_executor_options(name: str, address: str | None, gpus_per_cell: float | None,
                           cpus_per_cell: float) -> None:
    """``--executor`` and its options, checked before anything is opened or printed."""
    if name == "local":
        if address is not None or gpus_per_cell is not None:
            option = "--ray-address" if address is not None else "--gpus-per-cell"
            raise ConfigError(f"{option} goes with --executor ray; add it, or leave {option} out")
        return
    if name != "ray":
        raise ConfigError(f"--executor {name!r}: choose local or ray")
    if not (0 < cpus_per_cell < 1e4):
        raise ConfigError(f"--cpus-per-cell {cpus_per_cell:g}: give a positive number")
    from alexnet import cluster

    cluster.import_ray()
    if gpus_per_cell is not None:
        cluster.check_gpus_per_cell(gpus_per_cell)


def executor_for(name: str, jobs: int, cells: list[Any], address: str | None,
                 gpus_per_cell: float | None, cpus_per_cell: float,
                 stores: dict[str, str]) -> Executor:
    """The executor that ``--executor`` names, for ``cells`` (all of one device), checked
    before anything is logged: a Ray cluster is reached, and ``stores`` (option -> URL) are
    ones every node can reach."""
    from alexnet import executors

    check_executor_options(name, address, gpus_per_cell, cpus_per_cell)
    if name == "local":
        return executors.local(jobs, cells[0].config.runtime.device)
    from alexnet import cluster

    ray = cluster.connect(address)
    cluster.check_shared_stores(ray, stores)
    resources = cluster.plan_resources(ray, cells, gpus_per_cell, cpus_per_cell)
    return cluster.RayExecutor(address, resources)


# --- logging: one place for every line a command prints while it runs ----------------------


class _Lines(logging.Formatter):
    """The message (after the time, where the format has one); warnings and errors say so."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        if record.levelno >= logging.WARNING:
            record.message = f"{record.levelname.lower()}: {record.message}"
        return super().formatMessage(record)


def configure_logging(target: Console | None = None) -> None:
    """Lines from alexnet's loggers (data decoding, each epoch, each cell's end) at INFO and
    everyone else's warnings go through rich, above any progress bars, with the time; MLflow
    neither sets up its own stderr handler nor draws download bars that would break them.
    Call before MLflow is imported (it reads its switch then); worker processes inherit it.

    Not in a terminal (a pipe, a file, a batch job's log) the lines go to stderr as plain
    text, one line each however long, so that they can be grepped."""
    from rich.logging import RichHandler

    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    console = target or err_console
    handler: logging.Handler
    if console.is_terminal:
        handler = RichHandler(console=console, show_level=False, show_path=False,
                              markup=False, highlighter=None, log_time_format="[%X]",
                              omit_repeated_times=False)
        handler.setFormatter(_Lines("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Lines("[%(asctime)s] %(message)s", "%H:%M:%S"))
    handler.ablate = True  # type: ignore[attr-defined]  # ours: replaced, others kept
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not getattr(h, "ablate", False)] + [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("alexnet").setLevel(logging.INFO)
    if "mlflow" in sys.modules:  # imported already: undo the handler it set up
        mlflow_logger = logging.getLogger("mlflow")
        mlflow_logger.handlers, mlflow_logger.propagate = [], True
