"""The `ablate` command line. Thin: parse, call, print. `--help` is the reference.

Exit codes: 0 every cell finished; 1 some runs failed or diverged; 2 bad input (nothing
run, nothing logged). A bad-input error is one line; `ablate --debug ...` shows the
traceback too.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from alexnet.cli_options import (
    DataRoot,
    Dataset,
    Device,
    Epochs,
    Quick,
    SetItems,
    TrackingUri,
)
from alexnet.errors import AblateError, ConfigError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Which of AlexNet's design choices matter? Run ablation grids, track them in MLflow, "
         "tune them with Optuna, and report measured deltas beside the paper's.")
# Piped output (CI logs, `| tee`) gets a width that fits the tables instead of 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
_state = {"debug": False}

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Bad input is one line on stderr and exit code 2; --debug shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AblateError as err:
            if _state["debug"]:
                raise
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False
          ) -> None:
    _state["debug"] = debug


# --- list / show -------------------------------------------------------------------------


@app.command("list")
@user_errors
def list_ablations() -> None:
    """The ablations, their claims and cell counts."""
    from rich.table import Table

    from alexnet.ablation import known_ablations, load_ablation

    table = Table("ablation", "title", "claims", "cells", "file")
    for name, path in known_ablations().items():
        ab = load_ablation(str(path))
        table.add_row(name, ab.title, ", ".join(ab.claims), str(len(ab.cells())),
                      _short_path(path))
    console.print(table)


def _short_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return "(installed package)"


@app.command()
@user_errors
def show(
    name: Annotated[str, typer.Argument(help="Ablation name or path to a .yaml file.")],
    quick: Annotated[bool, typer.Option("--quick", help="The cells of --quick.")] = False,
    seeds: Annotated[str | None, typer.Option(help="N (0..N-1) or a list: 0,1,2")] = None,
    set_: SetItems = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """The expanded cells (arm, seed, key) and each one's state in the store."""
    import time

    from rich.table import Table

    from alexnet import tracking
    from alexnet.ablation import load_ablation
    from alexnet.config import parse_set
    from alexnet.runner import cell_state

    uri = tracking.tracking_uri(tracking_uri)
    tracking.check_store(uri)
    ab = load_ablation(name)
    cells = ab.cells(quick=quick, seeds=parse_seeds(seeds), overrides=parse_set(set_ or []))
    store = tracking.local_store_dir(uri)
    c = None if store is not None and not (store / tracking.DB_NAME).exists() \
        else tracking.client(uri)
    now = int(time.time() * 1000)
    table = Table("ablation", "arm", "seed", "key", "state", "run")
    exp_ids: dict[str, str | None] = {}
    for cell in cells:
        state, run = "new", None
        if c is not None:
            if cell.ablation not in exp_ids:
                exp_ids[cell.ablation] = tracking.get_experiment_id(c, uri, cell.ablation,
                                                                    create=False)
            if exp_ids[cell.ablation]:
                state, run = cell_state(
                    tracking.runs_for_key(c, exp_ids[cell.ablation], cell.key), now)
        color = {"finished": "green", "failed": "red", "running": "yellow",
                 "interrupted": "yellow"}.get(state, "white")
        table.add_row(cell.ablation, cell.arm_label, str(cell.seed), cell.key,
                      f"[{color}]{state}[/]", run.info.run_id[:8] if run else "")
    console.print(table)


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


# --- run ---------------------------------------------------------------------------------


@app.command()
@user_errors
def run(
    name: Annotated[str, typer.Argument(help="Ablation name (see `ablate list`) or a .yaml path.")],
    quick: Quick = False,
    seeds: Annotated[str | None, typer.Option(help="N (seeds 0..N-1) or a list: 0,1,2")] = None,
    epochs: Epochs = None,
    dataset: Dataset = None,
    data_root: DataRoot = None,
    device: Device = None,
    set_: SetItems = None,
    jobs: Annotated[int, typer.Option(min=1, help="Cells run at once, in processes.")] = 1,
    tuned: Annotated[bool, typer.Option(
        "--tuned", help="Each arm at its best lr and weight decay from `ablate sweep`.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Rerun finished cells too.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan; run nothing.")
                       ] = False,
    profile: Annotated[bool, typer.Option(
        "--profile", help="Save a torch.profiler trace of a few steps in each run.")] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """Run an ablation grid: every arm × seed, each an MLflow run; finished cells are skipped."""
    from alexnet import tracking
    from alexnet.ablation import load_ablation

    uri = tracking.tracking_uri(tracking_uri)
    tracking.check_store(uri)
    ab = load_ablation(name)
    overrides = command_overrides(epochs, dataset, data_root, device, set_)
    cells = ab.cells(quick=quick, seeds=parse_seeds(seeds), overrides=overrides)
    if tuned:
        from alexnet.sweep import apply_tuned

        cells = apply_tuned(cells, uri)
    if dry_run:
        _print_plan(uri, cells)
        return
    _preflight_data(cells, jobs)
    from alexnet.progress import RichProgress
    from alexnet.runner import run_ablation

    with RichProgress(console) as progress:
        result = run_ablation(ab, cells, uri, jobs=jobs, force=force, progress=progress,
                              extra_parent_tags={"command": " ".join(["ablate", *sys.argv[1:]])},
                              profile=profile)
    _print_summary(result.outcomes)
    if result.failed:
        err_console.print(f"[red]{len(result.failed)} of {len(result.outcomes)} cells failed "
                          "or diverged:[/]")
        for o in result.failed:
            err_console.print(f"  {o.cell.ablation} {o.cell.arm_label} seed={o.cell.seed}: "
                              f"{o.reason}", highlight=False)
        raise typer.Exit(1)


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


def _preflight_data(cells: list[Any], jobs: int) -> None:
    """Open each distinct dataset once before anything is logged: bad data is bad input
    (exit 2), and the decoded cache is ready for every cell and worker."""
    from alexnet.data import open_data
    from alexnet.runner import open_data_once

    seen: set[str] = set()
    for cell in cells:
        ident = cell.config.data.model_dump_json(include={"source", "root", "image_size",
                                                          "max_train", "val_fraction",
                                                          "split_seed", "synthetic"})
        if ident in seen:
            continue
        seen.add(ident)
        if jobs == 1:
            open_data_once(cell)  # kept in memory for the cells that follow
        else:
            import torch

            open_data(cell.config.data, torch.device("cpu"))


def _print_plan(uri: str, cells: list[Any]) -> None:
    from rich.table import Table

    from alexnet import tracking
    from alexnet.runner import plan

    store = tracking.local_store_dir(uri)
    exists = store is None or (store / tracking.DB_NAME).exists()
    c = tracking.client(uri) if exists else None
    table = Table("ablation", "arm", "seed", "key", "would")
    for name in dict.fromkeys(cell.ablation for cell in cells):
        group = [cell for cell in cells if cell.ablation == name]
        exp_id = tracking.get_experiment_id(c, uri, name, create=False) if c else None
        for p in plan(c, uri, exp_id, group, force=False):
            table.add_row(name, p.cell.arm_label, str(p.cell.seed), p.cell.key,
                          {"skip": "skip (finished)", "new": "run", "resume": "resume",
                           "running": "skip (running elsewhere)"}[p.action])
    console.print(table)


def _pct(values: dict[str, float], key: str) -> str:
    return f"{100 * values[key]:.1f}" if key in values else ""


def _print_summary(outcomes: list[Any]) -> None:
    from rich.table import Table

    table = Table("ablation", "arm", "seed", "state", "val top-1 (%)", "train (%)",
                  "epochs", "time (s)", title="summary")
    for o in outcomes:
        f = o.final or {}
        color = {"finished": "green", "skipped": "dim", "failed": "red", "diverged": "red"
                 }.get(o.state, "yellow")
        table.add_row(o.cell.ablation, o.cell.arm_label, str(o.cell.seed),
                      f"[{color}]{o.state}[/]", _pct(f, "final_val_error"),
                      _pct(f, "final_train_error"),
                      f"{f['epochs_completed']:.0f}" if "epochs_completed" in f else "",
                      f"{f['train_seconds']:.1f}" if "train_seconds" in f else "")
    console.print(table)


# --- ui / report / describe-model ---------------------------------------------------------


@app.command()
@user_errors
def ui(
    host: Annotated[str, typer.Option(help="Bind address; 0.0.0.0 exposes it to the network."
                                      )] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 5000,
    tracking_uri: TrackingUri = None,
) -> None:
    """MLflow's UI over the same store."""
    from alexnet import tracking

    uri = tracking.tracking_uri(tracking_uri)
    tracking.check_store(uri, create=False)
    store = tracking.local_store_dir(uri)
    if store is not None and not (store / tracking.DB_NAME).exists():
        raise AblateError(f"no store at {store}; run an ablation first (ablate run NAME --quick)")
    console.print(f"MLflow UI for {uri} at http://{host}:{port}  (Ctrl-C stops it)")
    args = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
            "--host", host, "--port", str(port)]
    if store is not None:
        args += ["--artifacts-destination", (store / "artifacts").resolve().as_uri()]
    sys.stdout.flush()
    os.execv(sys.executable, args)  # the server gets our signals directly


@app.command()
@user_errors
def report(
    name: Annotated[str, typer.Argument(help="Ablation name, or `paper` for every claim.")],
    out: Annotated[Path, typer.Option(help="Folder for NAME.md and NAME/*.png.")] = Path(
        "reports"),
    tracking_uri: TrackingUri = None,
    grid: Annotated[list[str] | None, typer.Option(
        "--grid", metavar="RUN_ID",
        help="Report the grid this grid run belongs to (by its grid key) instead of the most "
             "recent complete one; for `paper`, once per ablation to override.")] = None,
) -> None:
    """Write reports/NAME.md: per-arm statistics, paired deltas against the paper's, figures.

    Runs of one grid only (one scale, tuned or not): the newest complete one, or --grid's.
    """
    from alexnet import tracking
    from alexnet.report import write_report

    uri = tracking.tracking_uri(tracking_uri)
    tracking.check_store(uri, create=False)
    path = write_report(name, uri, out, grids=grid or ())
    console.print(f"wrote {path}")


@app.command("describe-model")
@user_errors
def describe_model(
    name: Annotated[str, typer.Argument(help="alexnet | alexnet_cifar | convnet4")],
    num_classes: Annotated[int, typer.Option(min=2)] = 1000,
    activation: Annotated[str | None, typer.Option()] = None,
    norm: Annotated[str | None, typer.Option(help="lrn | bn | none")] = None,
    pool: Annotated[str | None, typer.Option(help="overlap | nonoverlap")] = None,
    dropout: Annotated[float | None, typer.Option()] = None,
    init: Annotated[str | None, typer.Option(help="paper | kaiming")] = None,
    towers: Annotated[int | None, typer.Option(help="1 | 2")] = None,
    width: Annotated[float | None, typer.Option()] = None,
) -> None:
    """A per-layer table (output shape, parameters) and the total."""
    from alexnet.config import ModelConfig
    from alexnet.models import build_model_from_config
    from alexnet.models import input_size as native_size
    from alexnet.models.summary import describe_model as describe
    from alexnet.models.summary import render_table

    given = {"name": name, "activation": activation, "norm": norm, "pool": pool,
             "dropout": dropout, "init": init, "towers": towers, "width": width}
    from pydantic import ValidationError

    from alexnet.config import describe_validation_error

    try:
        cfg = ModelConfig(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, "describe-model")) from None
    model = build_model_from_config(cfg, num_classes=num_classes)
    rows = describe(model, native_size(name))
    console.print(render_table(rows, sum(p.numel() for p in model.parameters())))


from alexnet.sweep_cli import sweep  # noqa: E402 - imports its heavy parts when run

app.command()(sweep)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
