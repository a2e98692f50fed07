"""Real parts of a cluster on this machine for the `cluster` tests: a throwaway PostgreSQL
server, an MLflow tracking server on it (`ablate server`), and a Ray cluster of two nodes.

Every process is started in a session of its own and ended by that session's id (or, for
PostgreSQL, by its data folder), so nothing else running on the machine is touched.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HEARTBEAT = "1"  # seconds: a cell of a dead process is seen as gone within 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def ray_token() -> Path:
    """The Ray clusters' token (Ray asks every node and driver for the same one), in a file of
    this test session rather than the user's ~/.ray."""
    path = Path(tempfile.mkdtemp(prefix="ablate-raytoken-")) / "auth_token"
    path.write_text(secrets.token_hex(32))
    atexit.register(shutil.rmtree, path.parent, True)
    return path


def cluster_env(**extra: str) -> dict[str, str]:
    """What the processes of these tests run with: this checkout's code first on the path,
    quick heartbeats, the session's Ray token."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "ALEXNET_HEARTBEAT_SECONDS": HEARTBEAT,
            "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ray_token()),
            "COLUMNS": "200", **extra}


def wait_for(check, timeout: float, what: str, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


# --- processes in sessions of their own ----------------------------------------------------


def in_session(sid: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
            if os.getsid(p.pid) == sid:
                found.append(p)
    return found


def end_session(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 20) -> None:
    """Ask the session's leader to stop, then kill whatever of its session is left."""
    sid = proc.pid
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    for p in in_session(sid):
        with contextlib.suppress(psutil.Error):
            p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def start_session(args: list[str], log: Path, env: dict[str, str],
                  cwd: Path | None = None) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)


# --- PostgreSQL ----------------------------------------------------------------------------


def postgres_bin() -> Path | None:
    """Debian's server binaries (apt-get install postgresql), or ones on the PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


@dataclass
class Postgres:
    url: str  # postgresql://postgres@127.0.0.1:PORT, no database

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"{self.url}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"{self.url}/{name}"


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    """A throwaway cluster in a temporary folder, trusting local connections, on 127.0.0.1.
    PostgreSQL refuses to run as root: as root it runs as the `postgres` user."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL's server is not installed (apt-get install postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="ablate-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()
    subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U",
                    "postgres", "--no-sync"], check=True, capture_output=True)
    options = f"-k {folder} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg_ctl = [*run_as, str(bindir / "pg_ctl"), "-D", str(data)]
    subprocess.run([*pg_ctl, "-o", options, "-l", str(folder / "log"), "-w", "start"],
                   check=True, capture_output=True)
    try:
        yield Postgres(f"postgresql://postgres@127.0.0.1:{port}")
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


# --- the MLflow tracking server --------------------------------------------------------------


@dataclass
class TrackingServer:
    uri: str  # http://127.0.0.1:PORT
    artifacts: Path
    proc: subprocess.Popen


@contextlib.contextmanager
def tracking_server(backend: str, folder: Path) -> Iterator[TrackingServer]:
    """`ablate server` on ``backend``, its artifacts in ``folder``/artifacts."""
    port = free_port()
    artifacts = folder / "artifacts"
    proc = start_session([str(BIN / "ablate"), "server", "--backend-store-uri", backend,
                          "--artifacts-destination", str(artifacts), "--port", str(port),
                          "--workers", "2"], folder / "server.log", cluster_env(), cwd=folder)
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"ablate server exited: {(folder / 'server.log').read_text()}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{uri}/health",
                                                                   timeout=2) as resp:
            return resp.status == 200
        return False

    try:
        wait_for(healthy, 180, "the MLflow server")
        yield TrackingServer(uri, artifacts, proc)
    finally:
        end_session(proc, signal.SIGINT)


# --- a Ray cluster of two nodes ------------------------------------------------------------


@dataclass
class RayCluster:
    folder: Path
    address: str = ""
    head: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)

    def start_head(self) -> None:
        # A short temporary folder: Ray's socket paths must fit in 107 characters.
        self.head = start_session([
            str(BIN / "ray"), "start", "--head", "--block", "--port", str(free_port()),
            "--num-cpus", "1", "--num-gpus", "0", "--include-dashboard", "false",
            "--disable-usage-stats", "--temp-dir", str(self.folder)],
            self.folder / "head.log", cluster_env())
        current = self.folder / "ray_current_cluster"
        self.address = wait_for(lambda: current.exists() and current.read_text().strip(),
                                120, "the Ray head node")

    def add_worker(self) -> subprocess.Popen:
        """A second node: its own raylet, object store and CPU, on this machine."""
        log = self.folder / f"worker{len(self.workers)}.log"
        worker = start_session([
            str(BIN / "ray"), "start", "--block", "--address", self.address, "--num-cpus", "1",
            "--num-gpus", "0", "--disable-usage-stats", "--resources", '{"worker_node": 1}'],
            log, cluster_env())
        self.workers.append(worker)
        wait_for(lambda: "Ray runtime started" in log.read_text(errors="replace"), 120,
                 "the Ray worker node")
        return worker

    def raylet_of(self, worker: subprocess.Popen) -> psutil.Process:
        return next(p for p in in_session(worker.pid) if p.name() == "raylet")

    def stop(self) -> None:
        for proc in [*self.workers, *([self.head] if self.head else [])]:
            end_session(proc, grace=5)  # a test cluster: what is still up then is killed


@contextlib.contextmanager
def ray_cluster() -> Iterator[RayCluster]:
    folder = Path(tempfile.mkdtemp(prefix="ablray-", dir="/tmp"))
    cluster = RayCluster(folder)
    try:
        cluster.start_head()
        cluster.add_worker()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)
