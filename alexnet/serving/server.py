"""`ablate serve`: MLflow's scoring server (``mlflow models serve``) for one cell's model.

The model takes image files: JSON carries them base64-encoded in a column ``image`` (the
model's signature says it is binary, so MLflow's server decodes it). ``curl_line`` is what a
user types; a wrong image is an HTTP 400 whose message is our one line, never a crash.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from alexnet.errors import StoreError
from alexnet.serving.runs import CellRun, has_mlflow_model
from alexnet.ui_server import browser_host, check_port_free, run_server


def curl_line(host: str, port: int, image: str = "image.png") -> str:
    """A shell line (bash, zsh; GNU or macOS base64) that posts ``image`` and prints the
    answer: {"dataframe_records": [{"image": "<the file in base64>"}]} in double quotes, so
    that the shell fills in the $(...)."""
    encoded = f"$(base64 < {shlex.quote(image)} | tr -d '\\n')"
    payload = '{\\"dataframe_records\\": [{\\"image\\": \\"' + encoded + '\\"}]}'
    return (f"curl -s http://{browser_host(host)}:{port}/invocations "
            f"-H 'Content-Type: application/json' -d \"{payload}\"")


def serve_command(cell_run: CellRun, host: str, port: int) -> list[str]:
    # --env-manager local: the server runs in this Python, whose packages the model needs
    # (it creates no virtual environment and downloads nothing).
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", cell_run.model_uri,
            "--env-manager", "local", "-h", host, "-p", str(port)]


def serve_env(uri: str) -> dict[str, str]:
    """The server's environment: the store to resolve ``runs:/`` in, this interpreter's
    scripts first on PATH (MLflow starts ``uvicorn`` by name), no progress bars."""
    from alexnet.ui_server import server_env  # it turns telemetry off before mlflow loads

    env = server_env()
    env["MLFLOW_TRACKING_URI"] = uri
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return env


def serve_model(uri: str, cell_run: CellRun, host: str, port: int,
                echo: Callable[[str], None] = print) -> int:
    """Check the port and the model, say how to call it, and serve it until Ctrl-C.
    Returns the exit code."""
    check_port_free(host, port)
    if not has_mlflow_model(uri, cell_run):
        why = cell_run.model_error or "it ran with runtime.log_model=false"
        raise StoreError(f"run {cell_run.source_id} logged no MLflow model ({why}); rerun the "
                         f"cell with model logging on: ablate run {cell_run.ablation} --force")
    env = serve_env(uri)
    size = cell_run.run.data.params.get("data.image_size", "?")
    echo(f"Serving {cell_run.describe()} from {cell_run.model_uri}")
    echo(f"at http://{browser_host(host)}:{port}/invocations (Ctrl-C stops it); it takes "
         f"{size}×{size} images. Try, with image.png an image of that size:")
    echo(f"  {curl_line(host, port)}")
    sys.stdout.flush()
    return run_server(serve_command(cell_run, host, port), env)
