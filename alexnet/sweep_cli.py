"""`ablate sweep` (the command; the work is in ``alexnet.sweep``)."""

from __future__ import annotations

import math
import sys
import time
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
    Jobs,
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
    user_errors,
)
from alexnet.errors import ConfigError


def parse_range(text: str, option: str) -> tuple[float, float] | None:
    """``"1e-4,1e-1"`` → (1e-4, 0.1), checked 0 < LOW < HIGH; ``"off"`` → None."""
    if text.strip().lower() == "off" and option == "--wd-range":
        return None
    try:
        low, high = (float(p) for p in text.split(","))
    except ValueError:
        raise ConfigError(f"{option} {text!r}: expected LOW,HIGH, e.g. {option} 1e-4,1e-1"
                          ) from None
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0:
        raise ConfigError(f"{option} {low:g},{high:g}: a log-uniform range needs 0 < LOW < HIGH")
    if low >= high:
        raise ConfigError(f"{option} {low:g},{high:g}: LOW must be below HIGH")
    return low, high


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
    executor: ExecutorName = "local", ray_address: RayAddress = None,
    gpus_per_cell: GpusPerCell = None, cpus_per_cell: CpusPerCell = 1,
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
    from alexnet import store
    from alexnet.ablation import load_ablation, select_arms
    from alexnet.sweep import (
        PRUNERS,
        SAMPLERS,
        SearchSpace,
        SweepOptions,
        run_sweep,
    )
    from alexnet.tuned import list_studies, study_name

    started = time.time()
    for option, value, allowed in (("--sampler", sampler, SAMPLERS), ("--pruner", pruner,
                                                                       PRUNERS)):
        if value not in allowed:
            raise ConfigError(f"{option} {value!r}: choose one of {', '.join(allowed)}")
    if trials < 1 or (timeout is not None and timeout <= 0):
        raise ConfigError(f"--trials {trials}: give at least 1" if trials < 1 else
                          f"--timeout {timeout:g}: give a positive number of seconds")
    uri = store.tracking_uri(tracking_uri)
    store.check_store(uri)
    space = SearchSpace(parse_range(lr_range, "--lr-range"), parse_range(wd_range, "--wd-range"))
    opts = SweepOptions(trials, timeout, jobs, sampler, pruner, space,
                        tuple(parse_seeds(seeds) or [0]))
    ab = load_ablation(name)
    overrides = command_overrides(epochs, dataset, data_root, device, set_)
    arms = select_arms(ab.cells(quick=quick, seeds=[0], overrides=overrides), arm)
    spec = store.storage_spec(storage, uri)
    if show:
        print_studies(list_studies(spec, [m.name for m in ab.members()]),
                      {study_name(c) for c in arms}, store.redact(spec))
        return
    runner = executor_for(executor, jobs, arms, ray_address, gpus_per_cell, cpus_per_cell,
                          {"--tracking-uri": uri, "--storage": spec})
    summaries, short = run_sweep(arms, uri, spec, opts, runner, started=started,
                                 on_event=lambda event: None,
                                 tags={"command": " ".join(["ablate", *sys.argv[1:]])})
    print_studies(summaries, None, store.redact(spec))
    console.print(f"then: ablate run {name}{' --quick' if quick else ''} --tuned", highlight=False)
    if short:
        err_console.print(f"[red]stopped short of the requested trials:[/] {', '.join(short)}",
                          highlight=False)
        raise typer.Exit(1)


def print_studies(summaries: list[Any], current: set[str] | None, where: str) -> None:
    """Each study's trials and best trial; config is the end of its name."""
    from rich.table import Table

    table = Table("arm", "done/pruned/failed/running", "val err %", "lr", "wd", "config",
                  title=f"sweeps in {where}: best trial per arm")
    for s in summaries:
        b = s.best
        table.add_row(f"{s.ablation}/{s.arm}", f"{s.complete}/{s.pruned}/{s.failed}/{s.running}",
                      *([f"{100 * b.val_error:.1f}", f"{b.lr:.3g}", f"{b.weight_decay:.3g}"]
                        if b else ["-"] * 3), s.study.rpartition("/")[2]
                      + (" *" if current and s.study in current else ""))
    console.print(table if summaries else f"no studies yet in {where}")
    if current is not None:
        console.print("* = the study these options sweep (and `ablate run --tuned` reads)",
                      highlight=False)
