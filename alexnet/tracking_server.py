"""`ablate server`: an MLflow tracking server on a database, the store that machines share.

Runs, metrics and claims go to the database (PostgreSQL for a lab; SQLite works for one
machine); artifacts (weights, the checkpoints a cell resumes from) go through the server to
``--artifacts-destination`` (a folder of the server's machine, shared storage, or an object
store such as s3://...), so the machines running cells need nothing but the server's URL.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Annotated
from urllib.parse import urlparse

import typer

from alexnet.cli_common import console, user_errors
from alexnet.errors import StoreError

DATABASES = ("postgresql", "mysql", "sqlite", "mssql")


def check_backend(url: str) -> str:
    """The backend URL with its driver named, once the database answers; else one line."""
    from alexnet import store

    given, url = store.redact(url), store.database_url(url)
    scheme = urlparse(url).scheme.partition("+")[0]
    if scheme not in DATABASES:
        raise StoreError(f"--backend-store-uri {given}: give a database URL, e.g. "
                         "postgresql://USER:PASSWORD@HOST:5432/mlflow (or sqlite:///PATH.db)")
    store.driver_check(url, "--backend-store-uri")
    db = store.sqlite_path(url)
    if db is not None:
        if not db.parent.is_dir():
            raise StoreError(f"--backend-store-uri {given}: folder {db.parent} does not exist; "
                             "create it")
        return url
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 5}
                                      if scheme == "postgresql" else {})
    try:
        with engine.connect():
            pass
    except Exception as err:  # the driver's own errors: refused, no such database, password
        reason = str(getattr(err, "orig", err)).strip().splitlines()
        raise StoreError(f"--backend-store-uri {given} cannot be reached: "
                         f"{(reason or [type(err).__name__])[0][:300]} (is the database server "
                         "running there, and the database created: createdb mlflow?)") from None
    finally:
        engine.dispose()
    return url


def artifacts_uri(destination: str) -> str:
    """A folder (created) as a file:// URI; an object store's URI as given."""
    if "://" in destination:
        return destination
    folder = Path(destination).expanduser().resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(f"--artifacts-destination {folder}: cannot create it "
                         f"({err.strerror or err}); pass a writable folder") from None
    return folder.as_uri()


def server_args(backend: str, artifacts: str, host: str, port: int, workers: int,
                allowed_hosts: str | None) -> list[str]:
    args = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
            "--registry-store-uri", backend, "--artifacts-destination", artifacts,
            "--serve-artifacts", "--host", host, "--port", str(port), "--workers", str(workers),
            "--uvicorn-opts", "--no-access-log --log-level warning"]
    return args + (["--allowed-hosts", allowed_hosts] if allowed_hosts else [])


@user_errors
def server(
    backend_store_uri: Annotated[str, typer.Option(
        "--backend-store-uri",
        help="The database: postgresql://USER:PASSWORD@HOST:5432/mlflow (created beforehand; "
             "MLflow makes its tables at the first start).")],
    artifacts_destination: Annotated[str, typer.Option(
        "--artifacts-destination",
        help="Where artifacts go: a folder of this machine (or shared storage), or s3://..., "
             "gs://...")] = "mlartifacts",
    host: Annotated[str, typer.Option(
        help="Bind address: 127.0.0.1 is this machine only; 0.0.0.0 lets a cluster's nodes "
             "in.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 5000,
    workers: Annotated[int, typer.Option(min=1, help="Server processes.")] = 4,
    allowed_hosts: Annotated[str | None, typer.Option(
        "--allowed-hosts", help="Host names the nodes use to reach it, comma-separated (MLflow "
                                "lets in localhost and private IPs by default).")] = None,
) -> None:
    """An MLflow tracking server on a database, for grids and sweeps run by several machines
    (--tracking-uri http://HOST:PORT on each). Ctrl-C stops it."""
    from alexnet import store
    from alexnet.ui_server import browser_host, check_port_free, run_server, server_env

    check_port_free(host, port)
    backend = check_backend(backend_store_uri)
    artifacts = artifacts_uri(artifacts_destination)
    env = server_env()
    here = browser_host(host) if host not in ("0.0.0.0", "::", "") else socket.getfqdn()
    lines = [f"MLflow tracking server on {store.redact(backend_store_uri)}, artifacts in "
             f"{artifacts}",
             f"  --tracking-uri http://{here}:{port}   (Ctrl-C stops it)"]
    if host in ("127.0.0.1", "localhost", "::1"):
        lines.append("  bound to this machine only; --host 0.0.0.0 lets other machines in")
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    sys.stdout.flush()
    raise typer.Exit(run_server(server_args(backend, artifacts, host, port, workers,
                                            allowed_hosts), env))
