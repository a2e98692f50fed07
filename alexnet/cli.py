"""The `ablate` command line. Thin: parse, call, print. `--help` is the reference.

Exit codes: 0 every cell finished; 1 some runs failed or diverged; 2 bad input (nothing
run, nothing logged); 130 / 143 interrupted by Ctrl-C / SIGTERM (a rerun resumes). A
bad-input error is one line; `ablate --debug ...` shows the traceback too.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from alexnet.cli_common import (
    CpusPerCell,
    DataRoot,
    Dataset,
    Device,
    Epochs,
    ExecutorName,
    GpusPerCell,
    Quick,
    RayAddress,
    Seeds,
    SetItems,
    TrackingUri,
    command_overrides,
    console,
    err_console,
    executor_for,
    parse_seeds,
    state,
    user_errors,
)
from alexnet.serving.cli import demo, predict, serve
from alexnet.sweep_cli import sweep
from alexnet.tracking_server import server

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Which of AlexNet's design choices matter? Run ablation grids, track them in MLflow, "
         "tune them with Optuna, and report measured deltas beside the paper's.")
app.command()(sweep)
app.command()(server)


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False
          ) -> None:
    from alexnet.ui_server import quiet_mlflow

    state["debug"] = debug
    quiet_mlflow()  # before any command imports mlflow: telemetry off unless asked for


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
    seeds: Seeds = None,
    set_: SetItems = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Every cell (arm, seed, key) and its state in the store: finished, reusable (finished
    in another ablation), running, interrupted, failed, new."""
    from rich.table import Table

    from alexnet import store
    from alexnet.ablation import load_ablation
    from alexnet.config import parse_set
    from alexnet.grid import plan

    uri = store.tracking_uri(tracking_uri)
    store.check_store(uri)
    ab = load_ablation(name)
    cells = ab.cells(quick=quick, seeds=parse_seeds(seeds), overrides=parse_set(set_ or []))
    db = store.sqlite_path(uri)
    c = None if db is not None and not db.exists() else store.client(uri)
    table = Table("ablation", "arm", "seed", "key", "state", "run")
    colors = {"finished": "green", "reusable": "green", "failed": "red", "running": "yellow",
              "interrupted": "yellow"}
    for p in plan(c, uri, cells):
        table.add_row(p.cell.ablation, p.cell.arm_label, str(p.cell.seed), p.cell.key,
                      f"[{colors.get(p.state, 'white')}]{p.state}[/]",
                      p.run_id[:8] if p.run_id else "")
    console.print(table)


# --- run ---------------------------------------------------------------------------------


@app.command()
@user_errors
def run(
    name: Annotated[str, typer.Argument(help="Ablation name (see `ablate list`) or a .yaml path.")],
    quick: Quick = False,
    seeds: Seeds = None,
    epochs: Epochs = None,
    dataset: Dataset = None,
    data_root: DataRoot = None,
    device: Device = None,
    set_: SetItems = None,
    jobs: Annotated[str, typer.Option(
        help="Cells run at once, in processes: N, or auto: on a GPU as many as its memory "
             "holds and keep it busy (a short probe measures one cell), on a CPU 1.")
    ] = "auto",
    executor: ExecutorName = "local",
    ray_address: RayAddress = None,
    gpus_per_cell: GpusPerCell = None,
    cpus_per_cell: CpusPerCell = 1,
    tuned: Annotated[bool, typer.Option(
        "--tuned", help="Each arm at its best lr and weight decay from `ablate sweep`.")] = False,
    storage: Annotated[str | None, typer.Option(
        help="Where --tuned finds the sweeps (default: optuna.db beside the MLflow store).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rerun finished cells too.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan; run nothing.")
                       ] = False,
    profile: Annotated[bool, typer.Option(
        "--profile", help="Save a torch.profiler trace of a few steps in each run.")] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """Run an ablation grid: every arm × seed, each an MLflow run; finished cells are skipped,
    interrupted ones resume, cells shared with another ablation are trained once."""
    from alexnet import errors, store
    from alexnet.ablation import load_ablation
    from alexnet.packing import parse_jobs, resolve_jobs

    wanted_jobs = parse_jobs(jobs)
    if executor != "local" and wanted_jobs != "auto":
        raise errors.ConfigError(f"--jobs {jobs} sizes the local process pool; with "
                                 f"--executor {executor} leave it out (--gpus-per-cell and "
                                 "--cpus-per-cell size a cell)")
    uri = store.tracking_uri(tracking_uri)
    store.check_store(uri)
    ab = load_ablation(name)
    overrides = command_overrides(epochs, dataset, data_root, device, set_)
    cells = ab.cells(quick=quick, seeds=parse_seeds(seeds), overrides=overrides)
    if tuned:
        from alexnet.tuned import apply_tuned_where_swept

        cells, untuned = apply_tuned_where_swept(cells, store.storage_spec(storage, uri))
        if untuned:
            console.print(f"--tuned: no sweep for {', '.join(untuned)}; these run at their "
                          "configured lr and weight decay", highlight=False)
    if dry_run:
        show_plan(uri, cells)
        return
    from alexnet.grid import run_ablation
    from alexnet.progress import RichProgress
    from alexnet.runner import preflight_data

    preflight_data(cells)
    store.client(uri)  # a broken store is one line before any progress is drawn
    jobs_now = 1  # Ray places cells by the resources it has; --jobs is the local pool's
    if executor == "local":
        decision = resolve_jobs(wanted_jobs, cells)
        if decision.reason:
            console.print(decision.reason, highlight=False)
        jobs_now = decision.jobs
    runner = executor_for(executor, jobs_now, cells, ray_address, gpus_per_cell, cpus_per_cell,
                          {"--tracking-uri": uri})
    with RichProgress(console) as progress:
        result = run_ablation(ab, cells, uri, force=force, progress=progress, profile=profile,
                              executor=runner,
                              parent_tags={"command": " ".join(["ablate", *sys.argv[1:]])})
    print_summary(result)
    if result.failed:
        err_console.print(f"[red]{len(result.failed)} of {len(result.outcomes)} cells failed "
                          "or diverged:[/]")
        for o in result.failed:
            err_console.print(f"  {o.cell.ablation} {o.cell.arm_label} seed={o.cell.seed}: "
                              f"{o.reason}", highlight=False)
        raise typer.Exit(1)


def show_plan(uri: str, cells: list[Any]) -> None:
    from rich.table import Table

    from alexnet import store
    from alexnet.grid import plan

    db = store.sqlite_path(uri)
    c = None if db is not None and not db.exists() else store.client(uri)
    table = Table("ablation", "arm", "seed", "key", "would")
    would = {"finished": "skip (finished)", "reusable": "reuse (finished in another ablation)",
             "running": "skip (running elsewhere)", "interrupted": "resume"}
    seen: set[str] = set()
    for p in plan(c, uri, cells):
        what = would.get(p.state, "run") if p.cell.key not in seen else "reuse (same cell above)"
        seen.add(p.cell.key)
        table.add_row(p.cell.ablation, p.cell.arm_label, str(p.cell.seed), p.cell.key, what)
    console.print(table)


def _pct(values: dict[str, float], key: str) -> str:
    return f"{100 * values[key]:.1f}" if key in values else ""


def print_summary(result: Any) -> None:
    from rich.table import Table

    table = Table("ablation", "arm", "seed", "state", "val top-1 (%)", "train (%)",
                  "epochs", "time (s)", title="summary")
    for o in result.outcomes:
        f = o.final or {}
        color = {"finished": "green", "skipped": "dim", "reused": "dim", "failed": "red",
                 "diverged": "red"}.get(o.state, "yellow")
        table.add_row(o.cell.ablation, o.cell.arm_label, str(o.cell.seed),
                      f"[{color}]{o.state}[/]", _pct(f, "final_val_error"),
                      _pct(f, "final_train_error"),
                      f"{f['epochs_completed']:.0f}" if "epochs_completed" in f else "",
                      f"{f['train_seconds']:.1f}" if "train_seconds" in f else "")
    console.print(table)
    if result.listed > result.distinct:
        console.print(f"{result.listed} cells listed, {result.distinct} distinct: "
                      f"{result.listed - result.distinct} shared between ablations were trained "
                      "once and reused", highlight=False)


# --- ui / report / describe-model ---------------------------------------------------------


@app.command()
@user_errors
def ui(
    host: Annotated[str, typer.Option(help="Bind address; 0.0.0.0 exposes it to the network."
                                      )] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.")] = 5000,
    tracking_uri: TrackingUri = None,
) -> None:
    """MLflow's UI over the same store, opened on each ablation's training runs."""
    from alexnet import store
    from alexnet.ui_server import serve_ui

    raise typer.Exit(serve_ui(store.tracking_uri(tracking_uri), host, port,
                              echo=_echo_plain))


def _echo_plain(line: str) -> None:
    console.print(line, markup=False, highlight=False, soft_wrap=True)


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
    from alexnet import store
    from alexnet.report import write_report

    uri = store.tracking_uri(tracking_uri)
    store.check_store(uri, create=False)
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
    remove_conv: Annotated[str | None, typer.Option(help="none | conv2 | conv3 | conv4")] = None,
) -> None:
    """A per-layer table (output shape, parameters) and the total."""
    from alexnet.models import build_model, input_size
    from alexnet.models.summary import describe_model as describe
    from alexnet.models.summary import render_table

    given = {"activation": activation, "norm": norm, "pool": pool, "dropout": dropout,
             "init": init, "towers": towers, "width": width, "remove_conv": remove_conv}
    model = build_model(name, num_classes, **{k: v for k, v in given.items() if v is not None})
    rows = describe(model, input_size(name))
    console.print(render_table(rows, sum(p.numel() for p in model.parameters())))


# --- predict / serve / demo: a finished cell's model at work (alexnet.serving.cli) ---------

for _command in (predict, serve, demo):
    app.command()(_command)


def main() -> None:
    """The console script. Ctrl-C and SIGTERM stop the command with one line (finished cells
    are kept, a rerun resumes the rest) and exit 130 / 143."""
    import click

    from alexnet.executors import interrupt_on_sigterm

    received = interrupt_on_sigterm()
    try:
        code = app(standalone_mode=False)  # Typer turns Ctrl-C into exit code 130 itself
    except click.ClickException as err:  # usage errors: click's own message, exit 2
        err.show()
        sys.exit(err.exit_code)
    except click.Abort:  # end of input at a prompt
        code = 1
    if received:
        name = signal.Signals(received[-1]).name
        err_console.print(f"interrupted ({name}); finished cells are kept and the same "
                          "command resumes the rest", highlight=False)
        sys.exit(128 + received[-1])
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
