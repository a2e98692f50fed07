"""Where the stores are, and opening them safely.

The tracking store is MLflow's: ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else an
SQLite database in ``./mlruns`` with the artifacts beside it (one folder holds everything).
A new SQLite database (MLflow's, or Optuna's studies) is created and migrated in a temporary
file and then linked into place, so a process killed while creating a store never leaves a
half-migrated one behind; a store that is broken anyway is one line naming the file and what
to do, not a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from alexnet.errors import StoreError

# Seconds between heartbeats of a live run or trial, and of silence after which a process of
# another host counts as gone. An environment variable, so that tests can see a crashed
# process go stale quickly. tracking.py and Optuna's RDB storage share them.
HEARTBEAT_SECONDS = float(os.environ.get("ALEXNET_HEARTBEAT_SECONDS", "15"))
STALE_SECONDS = 4 * HEARTBEAT_SECONDS

DEFAULT_STORE = "mlruns"
DB_NAME = "mlflow.db"
# Loggers that announce table creation and migrations: their lines would interleave with
# the progress bars, and a new store is not news.
_MIGRATION_LOGGERS = ("alembic", "mlflow.store.db.utils", "mlflow.store.tracking.sqlalchemy_store")


def tracking_uri(uri: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db (SQLite)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return database_url(uri)
    return f"sqlite:///{(Path.cwd() / DEFAULT_STORE / DB_NAME).resolve()}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def local_store_dir(uri: str) -> Path | None:
    """The folder holding a SQLite store (its artifacts and Optuna's studies live beside it)."""
    db = sqlite_path(uri)
    return db.parent if db is not None else None


def is_default_store(folder: Path) -> bool:
    """./mlruns, the one store folder that is created when missing."""
    return folder.resolve() == (Path.cwd() / DEFAULT_STORE).resolve()


def artifact_root(uri: str, experiment: str) -> str | None:
    """Artifacts beside a local SQLite database, so the store is one folder; a server
    decides for itself (None)."""
    store = local_store_dir(uri)
    return (store / "artifacts" / experiment).resolve().as_uri() if store else None


def check_store(uri: str, *, create: bool = True) -> None:
    """Fail fast, with one line, when the store cannot be reached. Touches nothing."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
                if resp.status >= 400:
                    raise StoreError(f"tracking URI {uri} answered HTTP {resp.status}")
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise StoreError(f"tracking URI {uri} cannot be reached ({reason}); start the server "
                             "or pass another --tracking-uri") from None
        return
    store = local_store_dir(uri)
    if store is not None:
        if not store.is_dir() and not (create and is_default_store(store)):
            raise StoreError(f"tracking URI {uri}: folder {store} does not exist; create it or "
                             "pass another --tracking-uri")
        return
    if parsed.scheme in ("", "file"):
        raise StoreError(f"tracking URI {uri}: use a database URI such as sqlite:///path/mlflow.db "
                         "or an http(s):// tracking server")
    driver_check(uri, "--tracking-uri")


# The drivers SQLAlchemy is told to use. psycopg (3) is installed with the project; a plain
# postgresql:// URL would make SQLAlchemy look for psycopg2, so it is spelled out.
_DRIVERS = {"postgresql": "psycopg", "mysql": "pymysql"}


def database_url(url: str) -> str:
    """``url`` with the installed PostgreSQL driver named (``postgresql+psycopg://``)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def driver_check(url: str, option: str) -> None:
    """A database URL whose driver is missing is one line saying what to install."""
    base, _, driver = urlparse(database_url(url)).scheme.partition("+")
    module = driver or _DRIVERS.get(base)
    if module is None or base == "sqlite":
        return
    try:
        __import__(module)
    except ImportError:
        raise StoreError(f"{option} {redact(url)}: its database driver ({module}) is not "
                         f"installed; pip install {module}") from None


def redact(url: str) -> str:
    """A URL with its password masked: it goes to the console and to MLflow tags."""
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@", 1)
    return url


# --- creating SQLite stores atomically ------------------------------------------------------


@contextlib.contextmanager
def quiet_migrations() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _MIGRATION_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def create_sqlite_atomically(db: Path, initialize: Callable[[str], None]) -> None:
    """Create ``db`` by running ``initialize(url)`` on a temporary file in the same folder,
    then linking it into place: readers see no database or a complete one. When another
    process links first, its database is kept and ours is dropped."""
    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.with_name(f".{db.name}.{os.getpid()}.creating")
    tmp.unlink(missing_ok=True)
    try:
        with quiet_migrations():
            initialize(f"sqlite:///{tmp}")
        with contextlib.suppress(FileExistsError):
            os.link(tmp, db)  # fails if db exists: create-if-absent, atomically
    finally:
        tmp.unlink(missing_ok=True)


def broken_store(db: Path, err: BaseException) -> StoreError:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return StoreError(f"{db} is not a usable store ({text[:200]}); move it aside "
                      f"(mv {db} {db}.broken) to start a new one, or pass another store")


def client(uri: str, *, create: bool = True) -> Any:
    """An MlflowClient on ``uri``. A missing local database is created atomically (unless
    ``create`` is False: then a StoreError says there are no runs); a broken one is a
    StoreError of one line."""
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is None:
        return MlflowClient(tracking_uri=uri)
    if not db.exists():
        if not create:
            raise StoreError(f"no store at {db}; run an ablation first (ablate run NAME --quick)")

        def initialize(url: str) -> None:
            MlflowClient(tracking_uri=url).search_experiments(max_results=1)

        try:
            create_sqlite_atomically(db, initialize)
        except OSError as err:
            raise StoreError(f"cannot create the store {db} ({err.strerror or err}); pass "
                             "another --tracking-uri") from None
    try:
        with quiet_migrations():
            c = MlflowClient(tracking_uri=uri)
            c.search_experiments(max_results=1)  # opens, checks the schema
    except Exception as err:  # sqlite3/sqlalchemy/alembic errors of a damaged file
        raise broken_store(db, err) from None
    return c


# --- Optuna's studies -------------------------------------------------------------------

OPTUNA_DB = "optuna.db"


def storage_spec(storage: str | None, uri: str) -> str:
    """``--storage`` as given, else ``optuna.db`` beside a local MLflow store (or in
    ./mlruns when the tracking URI is a server)."""
    if storage:
        return database_url(storage) if "://" in storage else str(Path(storage).resolve())
    folder = local_store_dir(uri) or Path.cwd() / DEFAULT_STORE
    return f"sqlite:///{(folder / OPTUNA_DB).resolve()}"


def open_storage(spec: str, *, create: bool = True) -> Any:
    """Optuna's storage for ``spec`` (an RDB URL, or a journal file path); None when it does
    not exist and ``create`` is False. Anything wrong with it is one StoreError line."""
    import optuna

    quiet_optuna()
    if "://" not in spec:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(spec)
        if not path.exists() and not create:
            return None
        if not path.parent.is_dir():
            raise StoreError(f"--storage {spec}: folder {path.parent} does not exist; create it "
                             "or pass another --storage")
        try:
            return JournalStorage(JournalFileBackend(spec))
        except Exception as err:
            raise broken_store(path, err) from None
    db = sqlite_path(spec)
    if spec.startswith("sqlite:") and db is None:
        raise StoreError(f"--storage {spec}: give a file, e.g. sqlite:///mlruns/optuna.db; "
                         "an in-memory database is not shared between processes")
    driver_check(spec, "--storage")
    kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if db else {
        "connect_args": {"connect_timeout": 5}, "pool_pre_ping": True}

    def rdb(url: str) -> Any:
        return optuna.storages.RDBStorage(
            url, engine_kwargs=kwargs, heartbeat_interval=max(1, round(HEARTBEAT_SECONDS)),
            grace_period=max(2, round(STALE_SECONDS)),
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(2))

    if db is not None and not db.exists():
        if not create:
            return None
        if not (db.parent.is_dir() or is_default_store(db.parent)):
            raise StoreError(f"--storage {spec}: folder {db.parent} does not exist; create "
                             "it or pass another --storage")
        create_sqlite_atomically(db, rdb)
    try:
        return rdb(spec)
    except Exception as err:  # sqlalchemy's OperationalError, a damaged file, ...
        if db is not None:
            raise broken_store(db, err) from None
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StoreError(f"--storage {redact(spec)} cannot be reached: {reason[:300]}"
                         ) from None


def quiet_optuna() -> None:
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial instead
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
