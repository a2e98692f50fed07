"""Command-line options that several `ablate` commands share, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Quick = Annotated[bool, typer.Option(
    "--quick", help="Synthetic data, tiny width, few epochs; the axes are kept.")]
Epochs = Annotated[int | None, typer.Option(min=1, help="Override train.epochs.")]
Dataset = Annotated[str | None, typer.Option(help="synthetic | cifar10 | cifar100 | imagefolder")]
DataRoot = Annotated[Path | None, typer.Option(
    help="Where the data is: the image folder, or the CIFAR download cache.")]
Device = Annotated[str | None, typer.Option(help="auto | cpu | cuda")]
SetItems = Annotated[list[str] | None, typer.Option(
    "--set", help="key=value for any config key, e.g. optim.lr=0.02; repeatable.")]
TrackingUri = Annotated[str | None, typer.Option(
    "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlruns).")]
