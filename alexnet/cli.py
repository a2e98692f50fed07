"""The `ablate` command line. Thin: parse, call, print. `--help` is the reference.

Exit codes: 0 every cell finished; 1 some runs failed or diverged; 2 bad input (nothing
run, nothing logged); 130 / 143 interrupted by Ctrl-C / SIGTERM (a rerun resumes). A
bad-input error is one line; `ablate --debug ...` shows the traceback too.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

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
    check_executor_options,
    command_overrides,
    configure_logging,
    console,
    err_console,
    executor_for,
    parse_seeds,
    state,
    user_errors,
)
from alexnet.cli_inspect import cache, config
from alexnet.cli_store import clean
from alexnet.serving.cli import demo, predict, serve
from alexnet.sweep_cli import sweep
from alexnet.tracking_server import server

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Which of AlexNet's design choices matter? Run ablation grids, track them in MLflow, "
         "tune them with Optuna, and report measured deltas beside the paper's.")
app.command()(sweep)
app.command()(server)
app.command()(config)
app.command()(clean)
app.add_typer(cache, name="cache")
# A grid of more cells than this asks for --yes first: thousands is likely a typo.
CONFIRM_CELLS = 500


def _print_version(value: bool) -> None:
    if value:
        from alexnet import __version__

        typer.echo(f"ablate {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print the version.")
    ] = False,
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
    """What the store holds for an ablation: every scale it ran at, each cell's state.

    Scales (quick, real data, tuned...) are listed apart, newest first. States: finished,
    reusable (finished in another ablation), running, interrupted, failed, new.

    With --quick, --seeds or --set: the cells those flags give, as `ablate run` sees them.
    """
    from alexnet import store
    from alexnet.ablation import load_ablation
    from alexnet.cli_store import show_cells, show_store
    from alexnet.config import parse_set

    uri = store.tracking_uri(tracking_uri)
    store.check_store(uri)
    ab = load_ablation(name)
    if not (quick or seeds or set_):
        show_store(ab, uri)
        return
    show_cells(uri, ab.cells(quick=quick, seeds=parse_seeds(seeds),
                             overrides=parse_set(set_ or [])))


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
    yes: Annotated[bool, typer.Option(
        "--yes", "-y", help=f"Start a grid of more than {CONFIRM_CELLS} cells without asking."
    )] = False,
    list_cells: Annotated[bool, typer.Option(
        "--cells", help="After the per-arm summary, list every cell.")] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """Run an ablation grid: every arm × seed, each an MLflow run.

    Finished cells are skipped, interrupted ones resume, cells shared with another ablation
    are trained once. Each epoch's line prints above the progress bars (and goes to the
    run's train.log artifact); the end is each arm's mean ± sd over its seeds.
    """
    from alexnet import errors, store
    from alexnet.ablation import load_ablation
    from alexnet.packing import parse_jobs, resolve_jobs

    wanted_jobs = parse_jobs(jobs)
    check_executor_options(executor, ray_address, gpus_per_cell, cpus_per_cell)
    if executor != "local" and wanted_jobs != "auto":
        raise errors.ConfigError(f"--jobs {jobs} sizes the local process pool; with "
                                 f"--executor {executor} leave it out (--gpus-per-cell and "
                                 "--cpus-per-cell size a cell)")
    uri = store.tracking_uri(tracking_uri)
    store.check_store(uri)
    ab = load_ablation(name)
    overrides = command_overrides(epochs, dataset, data_root, device, set_)
    cells = ab.cells(quick=quick, seeds=parse_seeds(seeds), overrides=overrides)
    configure_logging(console)  # the input is good: from here on, lines go above the bars
    if tuned:
        from alexnet.tuned import apply_tuned_where_swept

        cells, untuned = apply_tuned_where_swept(cells, store.storage_spec(storage, uri))
        if untuned:
            console.print(f"--tuned: no sweep for {', '.join(untuned)}; these run at their "
                          "configured lr and weight decay", highlight=False)
    if dry_run:
        from alexnet.cli_store import show_plan

        show_plan(uri, cells)
        return
    from alexnet.cli_store import (
        announce,
        client_if_any,
        print_arm_summary,
        print_cell_summary,
    )
    from alexnet.grid import run_ablation
    from alexnet.progress import RichProgress
    from alexnet.runner import preflight_data

    guess = wanted_jobs if wanted_jobs != "auto" else 1  # the ETA's until auto has measured
    history, todo = announce(ab.name, cells, client_if_any(uri), guess, force=force, yes=yes,
                             limit=CONFIRM_CELLS)
    with RichProgress(console, past=history.seconds) as progress:
        with progress.preparing_data():
            preflight_data(todo)  # the data of cells that will train: checked, decoded once
        store.client(uri)  # a broken store is one line before any cell starts
        jobs_now = 1  # Ray places cells by the resources it has; --jobs is the local pool's
        if executor == "local":
            decision = resolve_jobs(wanted_jobs, todo)
            if decision.reason:
                console.print(decision.reason, highlight=False)
            jobs_now = decision.jobs
        progress.set_workers(jobs_now)
        runner = executor_for(executor, jobs_now, cells, ray_address, gpus_per_cell,
                              cpus_per_cell, {"--tracking-uri": uri})
        result = run_ablation(ab, cells, uri, force=force, progress=progress, profile=profile,
                              executor=runner,
                              parent_tags={"command": " ".join(["ablate", *sys.argv[1:]])})
    print_arm_summary(ab, result.outcomes, store.client(uri))
    if list_cells:
        print_cell_summary(result.outcomes)
    if result.listed > result.distinct:
        console.print(f"{result.listed} cells listed, {result.distinct} distinct: "
                      f"{result.listed - result.distinct} shared between ablations were trained "
                      "once and reused", highlight=False)
    if result.failed:
        err_console.print(f"[red]{len(result.failed)} of {len(result.outcomes)} cells failed "
                          "or diverged:[/]")
        for o in result.failed:
            err_console.print(f"  {o.cell.ablation} {o.cell.arm_label} seed={o.cell.seed}: "
                              f"{o.reason}", highlight=False)
        raise typer.Exit(1)


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


def _click_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage errors, aborts) as the installed typer raises them: typer 0.2x carries its own
    copy of click (typer.TyperException, typer.Abort); earlier ones raise click's."""
    import click

    usage = tuple(k for k in (getattr(typer, "TyperException", None), click.ClickException)
                  if k is not None)
    return usage, (typer.Abort, click.Abort, KeyboardInterrupt)


# --- predict / serve / demo: a finished cell's model at work (alexnet.serving.cli) ---------

for _command in (predict, serve, demo):
    app.command()(_command)


def main() -> None:
    """The console script. Ctrl-C and SIGTERM stop the command with one line (finished cells
    are kept, a rerun resumes the rest) and exit 130 / 143."""
    from alexnet.executors import interrupt_on_sigterm

    usage, aborts = _click_errors()
    received = interrupt_on_sigterm()
    try:
        code = app(standalone_mode=False)
    except usage as err:  # click's own message (a missing argument: the help), exit 2
        show = getattr(err, "show", None)
        if show is not None:
            show()
        else:
            err_console.print(f"error: {err}", highlight=False)
        sys.exit(getattr(err, "exit_code", 2))
    except aborts:
        code = None
        received = received or [signal.SIGINT]
    if received:  # typer 0.2x turns Ctrl-C into a plain exit code 130: the signal tells
        sig = received[-1]
        err_console.print(f"interrupted ({signal.Signals(sig).name}); finished cells are kept "
                          "and the same command resumes the rest", highlight=False)
        sys.exit(128 + sig)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
