"""`ablate sweep`: tune each arm's learning rate and weight decay with Optuna.

The command function only; ``alexnet.cli`` registers it (``app.command()(sweep)``). The
work is in ``alexnet.sweep``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from alexnet.cli_options import DataRoot, Dataset, Device, Epochs, Quick, SetItems, TrackingUri


def sweep(
    name: Annotated[str, typer.Argument(help="Ablation name (see `ablate list`) or a .yaml path.")],
    arm: Annotated[list[str] | None, typer.Option(
        "--arm", help="Only this arm: activation=tanh, or just tanh; repeatable. "
                      "Default: every arm.")] = None,
    trials: Annotated[int, typer.Option(
        help="Finished-or-pruned trials to add per arm, across all workers and processes.")
    ] = 20,
    timeout: Annotated[float | None, typer.Option(
        help="Seconds; no new trial starts after this (running ones finish).")] = None,
    quick: Quick = False,
    jobs: Annotated[int, typer.Option(
        help="Worker processes, each running trials of the same study.")] = 1,
    storage: Annotated[str | None, typer.Option(
        help="Optuna storage: an RDB URL (sqlite:///path.db, postgresql://...) for several "
             "machines, or a journal file. Default: optuna.journal beside the MLflow store.")
    ] = None,
    sampler: Annotated[str, typer.Option(help="tpe | random")] = "tpe",
    pruner: Annotated[str, typer.Option(
        help="median | hyperband | none; stops trials whose validation error lags.")
    ] = "median",
    lr_range: Annotated[str, typer.Option(
        "--lr-range", help="LOW,HIGH of the log-uniform learning rate.")] = "1e-4,1e-1",
    wd_range: Annotated[str, typer.Option(
        "--wd-range", help="LOW,HIGH of the log-uniform weight decay; zero is always a "
                           "choice too (the wd_zero parameter). off: search the learning rate "
                           "alone, keeping the config's weight decay (relu_vs_tanh: none).")
    ] = "1e-6,1e-2",
    seeds: Annotated[str | None, typer.Option(
        help="Seeds each trial trains (N for 0..N-1, or a list 0,1); the objective is their "
             "mean. Default: 0.")] = None,
    epochs: Epochs = None,
    dataset: Dataset = None,
    data_root: DataRoot = None,
    device: Device = None,
    set_: SetItems = None,
    show: Annotated[bool, typer.Option(
        "--show", help="List this ablation's studies, their trial counts and best values; "
                       "run nothing.")] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """Tune the learning rate and weight decay of each arm separately (Section 3.1), one
    Optuna study per arm; every trial is an MLflow run under the arm's sweep run. Then
    `ablate run NAME --tuned` trains each arm at its best values.

    The objective is the last epoch's validation top-1 error; the pruner sees it every
    epoch. Running a sweep again continues its studies.
    """
    args = dict(locals(), started=time.time())
    from alexnet.cli import user_errors

    user_errors(_sweep)(**args)


def _sweep(name: str, arm: list[str] | None, trials: int, timeout: float | None, quick: bool,
           jobs: int, storage: str | None, sampler: str, pruner: str, lr_range: str,
           wd_range: str, seeds: str | None, epochs: int | None, dataset: str | None,
           data_root: Path | None, device: str | None,
           set_: list[str] | None, show: bool, tracking_uri: str | None, started: float
           ) -> None:
    from alexnet import tracking
    from alexnet.ablation import load_ablation
    from alexnet.cli import command_overrides, console, err_console, parse_seeds
    from alexnet.sweep import (
        SearchSpace,
        SweepOptions,
        list_studies,
        parse_range,
        resolve_store,
        run_sweep,
        select_arms,
        study_name,
    )

    uri = tracking.tracking_uri(tracking_uri)
    tracking.check_store(uri)
    lr = parse_range(lr_range, "--lr-range")
    assert lr is not None
    space = SearchSpace(lr, parse_range(wd_range, "--wd-range", may_be_off=True))
    opts = SweepOptions(trials=trials, timeout=timeout, jobs=jobs, sampler=sampler,
                        pruner=pruner, space=space, seeds=tuple(parse_seeds(seeds) or [0]))
    ab = load_ablation(name)
    overrides = command_overrides(epochs, dataset, data_root, device, set_)
    arms = select_arms(ab.cells(quick=quick, seeds=[0], overrides=overrides), arm)
    store = resolve_store(storage, uri)
    if show:
        current = {study_name(c) for c in arms}
        _print_studies(console, list_studies(store, [m.name for m in ab.members()]), current,
                       store.describe())
        return
    result = run_sweep(arms, uri, store, opts,
                       echo=lambda line: console.print(line, highlight=False, soft_wrap=True),
                       extra_tags={"command": " ".join(["ablate", *sys.argv[1:]])},
                       started=started)
    _print_studies(console, result.summaries, None, store.describe())
    console.print(f"then: ablate run {name}{' --quick' if quick else ''} --tuned   "
                  f"(optuna-dashboard {_dashboard_arg(store.describe())})", highlight=False)
    if result.failed_arms:
        err_console.print(f"[red]stopped short of the requested trials:[/] "
                          f"{', '.join(result.failed_arms)}", highlight=False)
        raise typer.Exit(1)


def _dashboard_arg(spec: str) -> str:
    return spec if "://" in spec else f"'{spec}'"


def _print_studies(console: Any, summaries: list[Any], current: set[str] | None,
                   where: str) -> None:
    """arm, trials finished/pruned, the best validation error with its lr and weight decay;
    config is the last part of the study's name, <ablation>/<arm>/<config>."""
    from rich import box
    from rich.table import Table

    if not summaries:
        console.print(f"no studies yet in {where}", highlight=False)
        return
    several = len({s.ablation for s in summaries}) > 1
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False,
                  title=f"sweeps in {where}: best trial per arm")
    for header in ("arm", "done/pruned", "val err %", "lr", "wd", "config"):
        table.add_column(header, no_wrap=True,
                         justify="left" if header in ("arm", "config") else "right")
    notes = []
    for s in summaries:
        b = s.best
        label = f"{s.ablation}/{s.arm}" if several else s.arm
        mark = " *" if current is not None and s.study in current else ""
        table.add_row(label, f"{s.complete}/{s.pruned}",
                      f"{100 * b.val_error:.1f}" if b else "-", f"{b.lr:.3g}" if b else "-",
                      f"{b.weight_decay:.3g}" if b else "-", s.study.rpartition("/")[2] + mark)
        if s.failed or s.running:
            notes.append(f"{label}: {s.failed} failed, {s.running} running")
    console.print(table)
    for note in notes:
        console.print(note, highlight=False)
    if current is not None:
        console.print("* = the study these options sweep (and `ablate run --tuned` reads)",
                      highlight=False)


if __name__ == "__main__":  # `python -m alexnet.sweep_cli NAME ...` before cli.py registers it
    _app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    _app.command()(sweep)
    _app()
