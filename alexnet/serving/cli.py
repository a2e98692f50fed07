"""`ablate predict`, `ablate serve` and `ablate demo`: a finished cell's model at work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from alexnet.cli_common import TrackingUri, console, user_errors

Target = Annotated[str, typer.Argument(
    metavar="ABLATION|RUN_ID", help="An ablation (with --arm), or a cell run's id.")]
Arm = Annotated[str | None, typer.Option(
    help="The arm: its values (relu; lrn,overlap) or its label (activation=relu).")]
Seed = Annotated[int | None, typer.Option(
    min=0, help="The cell's seed (default: the arm's lowest with a finished run).")]
Host = Annotated[str, typer.Option(help="Bind address; 0.0.0.0 exposes it to the network.")]


def _plain(line: str) -> None:
    console.print(line, markup=False, highlight=False, soft_wrap=True)


@user_errors
def predict(
    target: Target,
    images: Annotated[list[Path], typer.Argument(
        metavar="IMAGE...", help="Image files of the size the cell trained on.")],
    arm: Arm = None,
    seed: Seed = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="One JSON list, in the served model's answer format.")] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """The top-5 classes of each image, with probabilities, by one cell's final model.

    The model is rebuilt from the run's config and weights (nothing is unpickled), and each
    image is prepared as evaluation prepared the held-out images.
    """
    import torch

    from alexnet import store
    from alexnet.serving.classifier import read_image_file
    from alexnet.serving.runs import load_run_classifier, resolve

    uri = store.tracking_uri(tracking_uri)
    cell_run = resolve(uri, target, arm, seed)
    model = load_run_classifier(uri, cell_run.source_id)
    batch = torch.stack([model.read(read_image_file(p), str(p)) for p in images])
    predictions = model.predict(batch)  # every image read before anything is printed
    if as_json:
        print(json.dumps([{"image": str(p), "run_id": cell_run.run_id, **pred.as_dict()}
                          for p, pred in zip(images, predictions, strict=True)], indent=1))
        return
    _plain(cell_run.describe())
    for path, pred in zip(images, predictions, strict=True):
        _plain(f"{path}")
        width = max(len(label) for label, _ in pred.top)
        for rank, (label, p) in enumerate(pred.top, 1):
            _plain(f"  {rank}. {label:<{width}}  {100 * p:6.2f}%")


@user_errors
def serve(
    target: Target,
    arm: Arm = None,
    seed: Seed = None,
    host: Host = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.")] = 5001,
    tracking_uri: TrackingUri = None,
) -> None:
    """Serve one cell's MLflow model with MLflow's scoring server (`mlflow models serve`),
    and print a curl line that classifies an image file."""
    from alexnet import store
    from alexnet.serving.runs import resolve
    from alexnet.serving.server import serve_model

    uri = store.tracking_uri(tracking_uri)
    cell_run = resolve(uri, target, arm, seed)
    raise typer.Exit(serve_model(uri, cell_run, host, port, echo=_plain))


@user_errors
def demo(
    ablations: Annotated[list[str] | None, typer.Argument(
        metavar="[ABLATION]...", help="Ablations to show (default: every one in the store).")
    ] = None,
    seed: Seed = None,
    host: Host = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.")] = 8501,
    tracking_uri: TrackingUri = None,
) -> None:
    """A local web page: drop an image, see every arm's top-5 side by side. It needs
    Streamlit, the package's `demo` extra."""
    from alexnet import store
    from alexnet.serving.demo import serve_demo

    uri = store.tracking_uri(tracking_uri)
    raise typer.Exit(serve_demo(uri, ablations or [], seed, host, port, echo=_plain))
