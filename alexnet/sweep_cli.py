"""`ablate sweep`: tune each arm's learning rate and weight decay with Optuna (the command;
the work is in ``alexnet.sweep``)."""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import typer

from alexnet.cli_common import (
    DataRoot,
    Dataset,
    Device,
    Epochs,
    Jobs,
    Quick,
    Seeds,
    SetItems,
    TrackingUri,
    command_overrides,
    console,
    err_console,
    parse_seeds,
    user_errors,
)


@user_errors
def sweep(
    name: Annotated[str, typer.Argument(help="Ablation name (see `ablate list`) or a .yaml path.")],
    arm: Annotated[list[str] | None, typer.Option(
        "--arm", help="Only this arm: activation=tanh, or just tanh; repeatable.")] = None,
    trials: Annotated[int, typer.Option(
        help="Finished-or-pruned trials to add per arm, across all workers and machines.")] = 20,
    timeout: Annotated[float | None, typer.Option(
        help="Seconds; no new trial starts after this (running ones finish).")] = None,
    quick: Quick = False,
    jobs: Jobs = 1,
    storage: Annotated[str | None, typer.Option(
        help="Optuna storage: an RDB URL (sqlite:///path.db, postgresql://...) shared by "
             "machines, or a journal file. Default: optuna.db beside the MLflow store.")] = None,
    sampler: Annotated[str, typer.Option(help="tpe | random")] = "tpe",
    pruner: Annotated[str, typer.Option(help="median | hyperband | none")] = "median",
    lr_range: Annotated[str, typer.Option("--lr-range", help="LOW,HIGH, log-uniform.")
                        ] = "1e-4,1e-1",
    wd_range: Annotated[str, typer.Option(
        "--wd-range", help="LOW,HIGH, log-uniform, zero being a choice too; off: the config's "
                           "weight decay (relu_vs_tanh: none).")] = "1e-6,1e-2",
    seeds: Seeds = None,
    epochs: Epochs = None,
    dataset: Dataset = None,
    data_root: DataRoot = None,
    device: Device = None,
    set_: SetItems = None,
    show: Annotated[bool, typer.Option(
        "--show", help="List this ablation's studies and their best values; run nothing.")
    ] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """Tune the learning rate and weight decay of each arm separately (Section 3.1), one
    Optuna study per arm, every trial an MLflow run under the arm's sweep run; then `ablate
    run NAME --tuned`. The objective is the last epoch's validation top-1 error, which the
    pruner sees every epoch. Running a sweep again continues its studies."""
    from alexnet import executors, store
    from alexnet.ablation import load_ablation
    from alexnet.sweep import (
        SearchSpace,
        SweepOptions,
        list_studies,
        parse_range,
        run_sweep,
        select_arms,
        study_name,
    )

    started = time.time()
    uri = store.tracking_uri(tracking_uri)
    store.check_store(uri)
    space = SearchSpace(parse_range(lr_range, "--lr-range") or (0, 0),
                        parse_range(wd_range, "--wd-range", may_be_off=True))
    opts = SweepOptions(trials=trials, timeout=timeout, jobs=jobs, sampler=sampler,
                        pruner=pruner, space=space, seeds=tuple(parse_seeds(seeds) or [0]))
    ab = load_ablation(name)
    overrides = command_overrides(epochs, dataset, data_root, device, set_)
    arms = select_arms(ab.cells(quick=quick, seeds=[0], overrides=overrides), arm)
    spec = store.storage_spec(storage, uri)
    if show:
        print_studies(list_studies(spec, [m.name for m in ab.members()]),
                      {study_name(c) for c in arms}, store.redact(spec))
        return
    executor = executors.local(jobs, arms[0].config.runtime.device)
    result = run_sweep(arms, uri, spec, opts, executor, started=started,
                       tags={"command": " ".join(["ablate", *sys.argv[1:]])},
                       on_event=lambda event: None)
    print_studies(result.summaries, None, store.redact(spec))
    console.print(f"then: ablate run {name}{' --quick' if quick else ''} --tuned", highlight=False)
    if result.short:
        err_console.print(f"[red]stopped short of the requested trials:[/] "
                          f"{', '.join(result.short)}", highlight=False)
        raise typer.Exit(1)


def print_studies(summaries: list[Any], current: set[str] | None, where: str) -> None:
    """arm, trials finished/pruned, the best validation error with its lr and weight decay;
    config is the last part of the study's name, <ablation>/<arm>/<config>."""
    from rich import box
    from rich.table import Table

    if not summaries:
        console.print(f"no studies yet in {where}", highlight=False)
        return
    several = len({s.ablation for s in summaries}) > 1
    table = Table(box=box.SIMPLE_HEAD, title=f"sweeps in {where}: best trial per arm")
    for header in ("arm", "done/pruned", "failed", "val err %", "lr", "wd", "config"):
        table.add_column(header, no_wrap=True, justify="left" if header in ("arm", "config")
                         else "right")
    for s in summaries:
        b = s.best
        mark = " *" if current is not None and s.study in current else ""
        table.add_row(f"{s.ablation}/{s.arm}" if several else s.arm, f"{s.complete}/{s.pruned}",
                      f"{s.failed}" + (f" ({s.running} running)" if s.running else ""),
                      f"{100 * b.val_error:.1f}" if b else "-", f"{b.lr:.3g}" if b else "-",
                      f"{b.weight_decay:.3g}" if b else "-", s.study.rpartition("/")[2] + mark)
    console.print(table)
    if current is not None:
        console.print("* = the study these options sweep (and `ablate run --tuned` reads)",
                      highlight=False)
