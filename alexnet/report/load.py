"""Read an ablation's runs out of MLflow into pandas: the report's only input.

Everything here talks to the store; nothing here computes a statistic. The frames it
returns have plain column names (``arm``, ``seed``, ``final_val_error``, ``axis.norm``,
``params.optim.lr``) so that ``stats`` can be tested on hand-made frames.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from alexnet import store
from alexnet.claims import CLAIMS
from alexnet.errors import StoreError

HISTORY_KEYS = ("train_error", "val_error")  # what the learning-curve figures draw
CELL_FILTER = "tags.`ablate.kind` = 'cell'"
GRID_FILTER = "tags.`ablate.kind` = 'grid'"
_TAGS = ("ablation", "arm", "seed", "cell_key", "claims", "git_commit", "dataset_fingerprint",
         "device", "tuned", "failure_reason", "diverged", "ablate.heartbeat_ms")


@dataclass
class Runs:
    """The cell runs of one or more experiments (every status), and what goes with them."""

    uri: str
    experiments: dict[str, str]  # name -> experiment id
    cells: pd.DataFrame  # one row per cell run, every status
    grids: pd.DataFrame  # the grids' parent runs (run_id, experiment)
    history: pd.DataFrame  # run_id, key, epoch, value: per-epoch metrics of finished runs
    claims: dict[str, list[str]]  # experiment -> the claim ids it tests
    reference: dict[str, dict[str, str]]  # experiment -> axis -> reference arm
    arm_order: dict[str, list[str]] = field(default_factory=dict)  # experiment -> arm labels
    titles: dict[str, str] = field(default_factory=dict)  # experiment -> the ablation's title


def load_runs(name: str, uri: str) -> Runs:
    """Every cell run of the ablation ``name`` (its experiment has the same name)."""
    _check_exists(name, uri)
    c = store.client(uri, create=False)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        raise StoreError(f"no runs of ablation {name} in {uri}; run `ablate run {name}` first")
    runs = _load(c, uri, {name: exp.experiment_id})
    if runs.cells.empty:
        raise StoreError(f"no runs of ablation {name} in {uri}; run `ablate run {name}` first")
    return runs


def load_store(uri: str, name: str = "paper") -> Runs:
    """Every experiment in the store that holds cell runs (for the summary over claims)."""
    _check_exists(name, uri)
    c = store.client(uri, create=False)
    exps = {e.name: e.experiment_id for e in c.search_experiments(max_results=10000)}
    runs = _load(c, uri, exps, with_history=False)  # the summary draws no learning curves
    if runs.cells.empty:
        raise StoreError(f"no runs of ablation {name} in {uri}; run `ablate run {name}` first")
    keep = sorted(runs.cells["experiment"].unique())
    runs.experiments = {n: exps[n] for n in keep}
    return runs


def _check_exists(name: str, uri: str) -> None:
    """A local store that does not exist has no runs: say so rather than let MLflow create
    an empty database (seconds of migrations) just to find nothing in it."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise StoreError(f"no runs of ablation {name} in {uri}; run `ablate run {name}` first")


def _load(c: Any, uri: str, experiments: dict[str, str], with_history: bool = True) -> Runs:
    names = list(experiments)
    with _using_uri(uri):
        import mlflow

        # One search per run kind over all experiments: the report costs a handful of
        # calls whatever the size of the grid.
        cells = mlflow.search_runs(experiment_names=names, filter_string=CELL_FILTER,
                                   output_format="pandas", max_results=100000)
        grids = mlflow.search_runs(experiment_names=names, filter_string=GRID_FILTER,
                                   output_format="pandas", max_results=10000)
    by_id = {v: k for k, v in experiments.items()}
    cells = normalise(cells, by_id)
    grid_columns = ["run_id", "experiment", "status", "start_time", "command"]
    grids = grids.assign(experiment=grids["experiment_id"].map(by_id),
                         command=grids.get("tags.command"))[grid_columns] \
        if not grids.empty else pd.DataFrame(columns=grid_columns)
    finished = cells.loc[cells["status"] == "FINISHED", "run_id"].tolist() \
        if with_history and not cells.empty else []
    history = metric_histories(c, finished, HISTORY_KEYS)
    present = sorted(cells["experiment"].unique()) if not cells.empty else []
    claims, reference, order, titles = {}, {}, {}, {}
    for exp in present:
        mine = cells[cells["experiment"] == exp]
        claims[exp], reference[exp], order[exp], title = _ablation_facts(exp, mine)
        if title:
            titles[exp] = title
    return Runs(uri, experiments, cells, grids, history, claims, reference, order, titles)


def normalise(df: pd.DataFrame, exp_names: dict[str, str]) -> pd.DataFrame:
    """mlflow.search_runs' frame → plain columns: tags by name, metrics without prefix."""
    if df.empty:
        return pd.DataFrame(columns=["run_id", "experiment", "status", "arm", "seed"])
    out = pd.DataFrame({"run_id": df["run_id"], "status": df["status"],
                        "start_time": df["start_time"],
                        "experiment": df["experiment_id"].map(exp_names)})
    for tag in _TAGS:
        col = f"tags.{tag}"
        out[tag] = df.get(col)
    out["seed"] = pd.to_numeric(out["seed"], errors="coerce").astype("Int64")
    out["tuned"] = out["tuned"].fillna("false").astype(str).str.lower().eq("true")
    out["diverged"] = out["diverged"].fillna("false").astype(str).str.lower().eq("true")
    extra = {}
    for col in df.columns:
        if col.startswith("tags.axis."):
            extra[col[len("tags."):]] = df[col]
        elif col.startswith("metrics."):
            extra[col[len("metrics."):]] = pd.to_numeric(df[col], errors="coerce")
        elif col.startswith("params."):
            extra[col] = df[col]
    out = pd.concat([out, pd.DataFrame(extra, index=df.index)], axis=1)
    return out.reset_index(drop=True)


def metric_histories(c: Any, run_ids: list[str], keys: tuple[str, ...]) -> pd.DataFrame:
    """Per-epoch values of ``keys`` for ``run_ids``: run_id, key, epoch, value.

    A SQL store answers one query per metric for all runs (get_metric_history_bulk); a
    tracking server has no public bulk endpoint for full histories, so there it is one
    request per run and metric, issued concurrently.
    """
    rows: list[tuple[str, str, int, float, int]] = []
    store = getattr(getattr(c, "_tracking_client", None), "store", None)
    bulk = getattr(store, "get_metric_history_bulk", None)
    if run_ids and bulk is not None:
        for key in keys:
            for i in range(0, len(run_ids), 500):  # keep SQL's IN (...) list bounded
                for m in bulk(run_ids[i:i + 500], key, 10_000_000):
                    rows.append((m.run_id, key, m.step, m.value, m.timestamp))
    elif run_ids:
        pairs = [(r, k) for r in run_ids for k in keys]
        with ThreadPoolExecutor(max_workers=8) as pool:
            for (r, k), hist in zip(pairs, pool.map(lambda p: c.get_metric_history(*p), pairs),
                                    strict=True):
                rows.extend((r, k, m.step, m.value, m.timestamp) for m in hist)
    df = pd.DataFrame(rows, columns=["run_id", "key", "epoch", "value", "timestamp"])
    # A resumed run may have logged an epoch twice; the later value is the one that counts.
    df = df.sort_values("timestamp").drop_duplicates(["run_id", "key", "epoch"], keep="last")
    return df.drop(columns="timestamp").sort_values(["run_id", "key", "epoch"]).reset_index(
        drop=True)


def _ablation_facts(exp: str, cells: pd.DataFrame
                    ) -> tuple[list[str], dict[str, str], list[str], str | None]:
    """Claims, reference arms, arm order and title of one experiment.

    Claims come from the runs' ``claims`` tag. The reference arms are not logged, so they
    come from the ablation file where it can still be found; otherwise each axis's most
    common arm stands in (the report says which was used).
    """
    tagged = {c for text in cells["claims"].dropna() for c in str(text).split(",") if c}
    claims = [c for c in CLAIMS if c in tagged]
    axes = [c[len("axis."):] for c in cells.columns if c.startswith("axis.")]
    reference: dict[str, str] = {}
    order: list[str] = []
    try:
        from alexnet.ablation import load_ablation

        ablation = load_ablation(exp)
    except Exception:  # a renamed or deleted YAML must not stop a report built from MLflow
        ablation = None
    if ablation is not None and not ablation.include:
        claims = claims or [c for c in ablation.claims if c in CLAIMS]
        reference = {a: r for a, r in ablation.reference.items() if a in axes}
        order = list(dict.fromkeys(c.arm_label for c in ablation.cells(seeds=[0])))
    for axis in axes:
        if axis not in reference:
            counts = cells[f"axis.{axis}"].dropna().value_counts()
            if not counts.empty:
                reference[axis] = sorted(counts.index, key=lambda a: (-counts[a], a))[0]
    return claims, reference, order, ablation.title if ablation is not None else None


@contextmanager
def _using_uri(uri: str) -> Iterator[None]:
    """mlflow.search_runs reads the global tracking URI; set it for the call only and put
    back both the global and MLFLOW_TRACKING_URI (mlflow writes that variable too)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    old_global = utils._tracking_uri  # private, but the only way to see "unset"
    old_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_global)  # None unsets the variable; restored below
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env
