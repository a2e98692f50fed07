"""`ablate ui`: MLflow's server over the store, quiet, and MLflow's telemetry switch.

What the pages show (experiment tags, grid views, the URLs printed here) is in ``ui``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from alexnet.errors import AblateError
from alexnet.tracking import CLAIMS_EXPERIMENT
from alexnet.ui import experiment_url, newest_view

TELEMETRY_SWITCH = "MLFLOW_DISABLE_TELEMETRY"
QUIET_SWITCHES = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
                  "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def quiet_mlflow() -> None:
    """Turn MLflow's usage telemetry off for this process and the ones it starts, unless the
    user set MLFLOW_DISABLE_TELEMETRY themselves (``false`` keeps it on).

    MLflow reads the switch when it is first imported, so call this before that: at the CLI's
    start. Called later, it also drops the telemetry client MLflow already made.
    """
    # Lines through a grid's progress bars: a tracking server's client prints a "View run at"
    # link for every run it ends (`ablate ui` prints the URLs worth having), and every artifact
    # downloaded (a checkpoint to resume, an ensemble's weights) draws a progress bar.
    for name, value in QUIET_SWITCHES.items():
        os.environ.setdefault(name, value)
    if TELEMETRY_SWITCH in os.environ:
        return
    os.environ[TELEMETRY_SWITCH] = "true"
    if "mlflow" in sys.modules:
        from mlflow.telemetry import set_telemetry_client

        set_telemetry_client()  # re-reads the switch: no client


def check_port_free(host: str, port: int) -> None:
    """Fail with one line when the server could not listen on ``host:port``, before
    starting it: MLflow's server finds out only after its slow start, and exits 0."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise AblateError(_bad_host(host)) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As the server will: a port left in TIME_WAIT by a previous server is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise AblateError(f"port {port} on {host} is in use; pass --port with a free "
                                  f"one (e.g. --port {port + 1}) or stop what listens there"
                                  ) from None
            if err.errno == errno.EACCES:
                raise AblateError(f"port {port} on {host} needs more privileges than this "
                                  "user has; pass --port 1024 or above") from None
            raise AblateError(_bad_host(host)) from None


def _bad_host(host: str) -> str:
    return (f"--host {host} is not an address of this machine; pass 127.0.0.1 (this machine "
            "only) or 0.0.0.0 (every network interface)")


def server_command(uri: str, host: str, port: int) -> list[str]:
    """``mlflow server`` over the store, without uvicorn's line per request; warnings and
    errors still print. Artifacts of a local store are served from beside its database."""
    from alexnet import store

    args = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
            "--registry-store-uri", uri, "--host", host, "--port", str(port),
            # One worker is plenty for one person's browser, and starts 4x fewer processes.
            "--workers", "1", "--uvicorn-opts", "--no-access-log --log-level warning"]
    folder = store.local_store_dir(uri)
    if folder is not None:
        args += ["--artifacts-destination", (folder / "artifacts").resolve().as_uri()]
    return args


def server_env() -> dict[str, str]:
    """The server's environment: ours (telemetry off unless asked for, see quiet_mlflow),
    with what the user set left as it is."""
    quiet_mlflow()
    env = dict(os.environ)
    # MLflow's INFO lines (job executor discovery, ...) are not for the user of a local UI.
    env.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # The job runner serves GenAI features (judges, issue detection) that training runs do not
    # use; by default it starts seven more Python processes of about 250 MB each.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # MLflow imports a Starlette module that warns of its own deprecation at every start.
    quiet = "ignore:starlette.middleware.wsgi is deprecated"
    env["PYTHONWARNINGS"] = ",".join(filter(None, [env.get("PYTHONWARNINGS"), quiet]))
    return env


def experiment_links(uri: str, base_url: str) -> list[tuple[str, str]]:
    """(experiment name, URL of its training runs) for each experiment in the store, through
    the newest grid view where it has one."""
    from mlflow.tracking import MlflowClient

    links = []
    for exp in MlflowClient(tracking_uri=uri).search_experiments():
        if (exp.name == "Default" and exp.experiment_id == "0") or exp.name == CLAIMS_EXPERIMENT:
            continue  # MLflow's own, unused by ablate; ablate's bookkeeping
        links.append((exp.name, experiment_url(base_url, exp.experiment_id,
                                               newest_view(exp.tags))))
    return sorted(links)


def browser_host(host: str) -> str:
    """The host a browser on this machine uses to reach a server bound to ``host``."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def serve_ui(uri: str, host: str, port: int, echo: Callable[[str], None] = print) -> int:
    """`ablate ui`: check the port and the store, print where each experiment's training
    runs are, and run ``mlflow server`` until Ctrl-C. Returns the exit code."""
    from alexnet import store

    check_port_free(host, port)
    store.check_store(uri, create=False)
    folder = store.local_store_dir(uri)
    if folder is not None and not (folder / store.DB_NAME).exists():
        raise AblateError(f"no store at {folder}; run an ablation first (ablate run NAME --quick)")
    env = server_env()  # before mlflow is imported below
    base_url = f"http://{browser_host(host)}:{port}"
    links = experiment_links(uri, base_url)
    echo(f"MLflow UI for {uri} at {base_url}  (Ctrl-C stops it)")
    if links:
        echo("Each experiment's training runs, cells grouped by arm:")
        width = max(len(name) for name, _ in links)
        for name, url in links:
            echo(f"  {name:<{width}}  {url}")
    sys.stdout.flush()
    return run_server(server_command(uri, host, port), env)


def run_server(args: list[str], env: dict[str, str], what: str = "the MLflow server") -> int:
    """Run the server until it stops; Ctrl-C (or SIGTERM, SIGHUP) asks it to stop.

    It runs in a session of its own so that a terminal's Ctrl-C reaches it once, through us:
    ``mlflow server`` forwards the signal to uvicorn, and uvicorn reached twice (by the
    terminal and by the forward) aborts its shutdown with a traceback.
    """
    server = subprocess.Popen(args, env=env, start_new_session=True)
    asked: list[int] = []

    def stop(signum: int, _frame: Any) -> None:
        asked.append(signum)  # a second Ctrl-C makes uvicorn stop without waiting
        with contextlib.suppress(ProcessLookupError):
            server.send_signal(signal.SIGINT)

    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, stop) for s in stops}
    try:
        code = server.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if asked:
        return 0
    print(f"error: {what} stopped by itself (exit code {code}); its messages are above",
          file=sys.stderr)
    return code or 1
