"""Read an ablation's runs out of MLflow into pandas: the report's only input.

Everything here talks to the store, through MLflow's public client only; nothing here
computes a statistic. The frames it returns have plain column names (``arm``, ``seed``,
``grid_key``, ``final_val_error``, ``axis.norm``, ``params.optim.lr``) so that the
statistics can be tested on hand-made frames.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
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
ENSEMBLE_FILTER = "tags.`ablate.kind` = 'ensemble'"
PAGE = 50_000  # MLflow's largest page of search results
# tag -> column; tags not listed keep their own name
_TAGS = {"ablation": "ablation", "arm": "arm", "seed": "seed", "cell_key": "cell_key",
         "ablate.grid_key": "grid_key", "mlflow.parentRunId": "parent_run_id",
         "claims": "claims", "git_commit": "git_commit",
         "dataset_fingerprint": "dataset_fingerprint", "device": "device", "tuned": "tuned",
         "failure_reason": "failure_reason", "diverged": "diverged",
         "ablate.heartbeat_ms": "ablate.heartbeat_ms", "command": "command",
         "members": "members", "seeds": "seeds", "split": "split",
         "ablate.reused_from": "reused_from"}
GRID_COLUMNS = ["run_id", "experiment", "status", "start_time", "command", "grid_key",
                "cells"]
ENSEMBLE_COLUMNS = ["run_id", "experiment", "status", "start_time", "arm", "grid_key",
                    "members", "seeds", "split", "ensemble_error", "ensemble_error_top5"]


@dataclass
class Runs:
    """The runs of one or more experiments (every status), and what goes with them."""

    uri: str
    experiments: dict[str, str]  # name -> experiment id
    cells: pd.DataFrame  # one row per cell run, every status
    grids: pd.DataFrame  # the grids' parent runs: GRID_COLUMNS
    ensembles: pd.DataFrame  # averaged-softmax runs (Section 6): ENSEMBLE_COLUMNS + axis.*
    claims: dict[str, list[str]]  # experiment -> the claim ids it tests
    reference: dict[str, dict[str, str]]  # experiment -> axis -> reference arm
    arm_order: dict[str, list[str]] = field(default_factory=dict)  # experiment -> arm labels
    titles: dict[str, str] = field(default_factory=dict)  # experiment -> the ablation's title


def load_runs(name: str, uri: str) -> Runs:
    """Every run of the ablation ``name`` (its experiment has the same name)."""
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
    exps = {e.name: e.experiment_id for e in _experiments(c)}
    runs = _load(c, uri, exps)
    if runs.cells.empty:
        raise StoreError(f"no runs of ablation {name} in {uri}; run `ablate run {name}` first")
    keep = sorted(runs.cells["experiment"].unique())
    runs.experiments = {n: exps[n] for n in keep}
    return runs


def _experiments(c: Any) -> list[Any]:
    """Every active experiment, page by page."""
    found, token = [], None
    while True:
        page = c.search_experiments(max_results=PAGE, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


def _check_exists(name: str, uri: str) -> None:
    """A local store that does not exist has no runs: say so rather than let MLflow create
    an empty database (seconds of migrations) just to find nothing in it."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise StoreError(f"no runs of ablation {name} in {uri}; run `ablate run {name}` first")


def search(c: Any, experiment_ids: list[str], filter_string: str) -> pd.DataFrame:
    """``MlflowClient.search_runs`` page by page, as a frame shaped like
    ``mlflow.search_runs``' (``tags.X``, ``params.X``, ``metrics.X``), built here so that
    the client's own tracking URI is used and no global state is touched."""
    rows: list[dict[str, Any]] = []
    token = None
    while True:
        page = c.search_runs(experiment_ids, filter_string, max_results=PAGE, page_token=token)
        rows.extend(_flat(r) for r in page)
        token = page.token
        if not token:
            return pd.DataFrame.from_records(rows)


def _flat(run: Any) -> dict[str, Any]:
    info, data = run.info, run.data
    row: dict[str, Any] = {"run_id": info.run_id, "experiment_id": info.experiment_id,
                           "status": info.status, "start_time": _time(info.start_time),
                           "end_time": _time(info.end_time)}
    row.update({f"tags.{k}": v for k, v in data.tags.items()})
    row.update({f"params.{k}": v for k, v in data.params.items()})
    row.update({f"metrics.{k}": v for k, v in data.metrics.items()})
    return row


def _time(ms: int | None) -> pd.Timestamp:
    return pd.to_datetime(ms, unit="ms", utc=True) if ms else pd.NaT


def _load(c: Any, uri: str, experiments: dict[str, str]) -> Runs:
    ids = list(experiments.values())
    by_id = {v: k for k, v in experiments.items()}
    # One search per run kind over all experiments, in parallel: the report costs a
    # handful of calls whatever the size of the grid.
    with ThreadPoolExecutor(max_workers=3) as pool:
        found = list(pool.map(lambda f: search(c, ids, f),
                              (CELL_FILTER, GRID_FILTER, ENSEMBLE_FILTER)))
    cells, grids, ensembles = (normalise(df, by_id) for df in found)
    grids = grids.assign(cells=pd.to_numeric(grids.get("params.cells"), errors="coerce")) \
        .reindex(columns=GRID_COLUMNS)
    ensembles = ensembles.reindex(columns=[*ENSEMBLE_COLUMNS, *(
        col for col in ensembles.columns if col.startswith("axis."))])
    present = sorted(cells["experiment"].unique()) if not cells.empty else []
    claims, reference, order, titles = {}, {}, {}, {}
    for exp in present:
        mine = cells[cells["experiment"] == exp]
        claims[exp], reference[exp], order[exp], title = _ablation_facts(exp, mine)
        if title:
            titles[exp] = title
    return Runs(uri, experiments, cells, grids, ensembles, claims, reference, order, titles)


def normalise(df: pd.DataFrame, exp_names: dict[str, str]) -> pd.DataFrame:
    """A search frame → plain columns: tags by name, metrics without prefix, params kept."""
    base = ["run_id", "experiment", "status", "start_time", "end_time", *_TAGS.values()]
    if df.empty:
        return pd.DataFrame(columns=base)
    out = pd.DataFrame({"run_id": df["run_id"], "status": df["status"],
                        "start_time": df["start_time"], "end_time": df["end_time"],
                        "experiment": df["experiment_id"].map(exp_names)})
    for tag, col in _TAGS.items():
        out[col] = df.get(f"tags.{tag}")
    out["seed"] = pd.to_numeric(out["seed"], errors="coerce").astype("Int64")
    for flag in ("tuned", "diverged"):
        out[flag] = out[flag].fillna("false").astype(str).str.lower().eq("true")
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


def metric_histories(uri: str, run_ids: Iterable[str], keys: Iterable[str]) -> pd.DataFrame:
    """Per-epoch values of ``keys`` for ``run_ids``: run_id, key, epoch, value.

    MLflow's public client reads one run's metric at a time; the requests go out
    concurrently (a tracking server answers them in parallel, SQLite serves reads).
    """
    pairs = [(r, k) for r in dict.fromkeys(run_ids) for k in keys]
    rows: list[tuple[str, str, int, float, int]] = []
    if pairs:
        c = store.client(uri, create=False)
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
