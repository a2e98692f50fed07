"""Which runs a report may pool: one grid per experiment, never a mixture.

A grid is every cell run that shares a grid key (``ablate.grid_key``, see
``Cell.grid_key``): the same resolved config apart from what the arms and the seed vary,
and tuned or not. Runs of different grid keys differ in scale (data, subset, width,
epochs, model) or recipe (tuned lr and weight decay or not), so they are never averaged
or paired together. A grid is identified by its key, not by its parent run: a cell
finished by an earlier invocation keeps that older parent.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from alexnet.errors import StoreError

# Runs logged before cells carried a grid key are grouped by these (and tuned or not).
LEGACY_SCALE = ("dataset_fingerprint", "params.data.source", "params.data.max_train",
                "params.data.image_size", "params.data.crop_size",
                "params.data.synthetic.train_size", "params.model.name", "params.model.width",
                "params.train.epochs")
LEGACY_PREFIX = "untagged-"


@dataclass
class Grid:
    """Every cell run of one grid key in one experiment, and the grid runs that ran it."""

    experiment: str
    key: str
    runs: pd.DataFrame  # every cell run, every status
    parents: pd.DataFrame  # its grid runs, oldest first
    planned: int  # cells the grid asked for: the most a grid run planned, or seen

    @property
    def done(self) -> int:
        """(arm, seed) pairs with a finished run."""
        fin = self.runs[self.runs["status"] == "FINISHED"]
        return len(fin.drop_duplicates(["arm", "seed"]))

    @property
    def complete(self) -> bool:
        return self.planned > 0 and self.done >= self.planned

    @property
    def tuned(self) -> bool:
        return bool(self.runs["tuned"].all())

    @property
    def recency(self) -> tuple[pd.Timestamp, pd.Timestamp]:
        """Latest finished run (its end), then latest started run: "most recent" means."""
        fin = self.runs.loc[self.runs["status"] == "FINISHED", "end_time"].dropna()
        never = pd.Timestamp.min.tz_localize("UTC")
        return (fin.max() if not fin.empty else never,
                self.runs["start_time"].dropna().max() if self.runs["start_time"].notna().any()
                else never)


@dataclass
class Selection:
    """One experiment's runs as a report uses them."""

    experiment: str
    grid: Grid
    used: pd.DataFrame  # finished runs of the grid, one per (arm, seed): the latest
    others: list[Grid]  # the experiment's other grids: listed, never pooled
    ensembles: pd.DataFrame  # the grid's finished ensemble runs, the latest per arm
    all_cells: pd.DataFrame  # every cell run of the experiment (an ensemble's members)
    notes: list[str] = field(default_factory=list)
    named: bool = False  # chosen with --grid

    @property
    def cells(self) -> pd.DataFrame:
        return self.grid.runs


def grid_keys(cells: pd.DataFrame) -> pd.Series:
    """Each run's grid key; runs logged before grids had one get a stand-in from their
    scale params and tuned flag (per experiment), so that they never pool across scales."""
    keys = cells["grid_key"] if "grid_key" in cells else pd.Series(None, index=cells.index)
    keys = keys.astype(object).where(keys.notna() & (keys.astype(str) != ""), None)
    missing = keys.isna()
    if not missing.any():
        return keys
    out = keys.copy()
    for _, runs in cells[missing].groupby("experiment", sort=False):
        scale = [p for p in LEGACY_SCALE if p in runs and not _set_by_arm(runs, p)]
        sig = runs[scale].astype(str).agg("|".join, axis=1) if scale else \
            pd.Series("", index=runs.index)
        sig = sig + "|tuned=" + runs["tuned"].astype(str)
        out[runs.index] = sig.map(lambda s: LEGACY_PREFIX + hashlib.sha256(
            s.encode()).hexdigest()[:8])
    return out


def _set_by_arm(runs: pd.DataFrame, param: str) -> bool:
    """True when ``param`` is a design choice of the ablation (one value per arm, differing
    between arms), so that it must not count as a difference of scale."""
    per_arm = runs.groupby("arm")[param].nunique(dropna=False)
    return bool((per_arm == 1).all() and runs[param].nunique(dropna=False) > 1)


def grids_of(experiment: str, cells: pd.DataFrame, parents: pd.DataFrame) -> list[Grid]:
    """The grids of one experiment, most recent first."""
    mine = cells[cells["experiment"] == experiment]
    mine = mine.assign(grid_key=grid_keys(mine))
    ps = parents[parents["experiment"] == experiment].sort_values("start_time")
    ps = ps.assign(grid_key=[_parent_key(p, mine) for p in ps.itertuples()])
    out = []
    for key, runs in mine.groupby("grid_key", sort=False):
        own = ps[ps["grid_key"] == key]
        seen = len(runs.drop_duplicates(["arm", "seed"]))
        asked = int(own["cells"].max()) if own["cells"].notna().any() else 0
        out.append(Grid(experiment, str(key), runs, own, max(seen, asked)))
    return sorted(out, key=lambda g: g.recency, reverse=True)


def _parent_key(parent: Any, cells: pd.DataFrame) -> str | None:
    """A grid run's key: its tag, else the most common key of the cells it started."""
    key = getattr(parent, "grid_key", None)
    if isinstance(key, str) and key:
        return key
    children = cells.loc[cells["parent_run_id"] == parent.run_id, "grid_key"]
    return str(children.mode().iloc[0]) if not children.empty else None


def choose(grids: list[Grid], named: str | None = None) -> tuple[Grid, list[Grid], bool]:
    """The grid a report uses, the others, and whether it was named.

    ``named`` (a grid run id) picks its grid; otherwise the most recent complete grid (every
    arm and seed finished), else the most recent one.
    """
    if named:
        for g in grids:
            if named in set(g.parents["run_id"]):
                return g, [o for o in grids if o is not g], True
        raise StoreError(f"--grid {named} is not a grid run of the experiment "
                         f"{grids[0].experiment if grids else '?'} with cell runs; grid runs "
                         "are listed in the report's \"grid runs\" rows or `ablate ui`")
    complete = [g for g in grids if g.complete]
    chosen = max(complete or grids, key=lambda g: g.recency)
    return chosen, [g for g in grids if g is not chosen], False


def select(experiment: str, cells: pd.DataFrame, parents: pd.DataFrame,
           ensembles: pd.DataFrame, named: str | None = None) -> Selection:
    """The chosen grid of ``experiment`` and the runs of it a report averages."""
    grid, others, was_named = choose(grids_of(experiment, cells, parents), named)
    done = grid.runs[grid.runs["status"] == "FINISHED"].sort_values("start_time")
    used = done.drop_duplicates(["arm", "seed"], keep="last").reset_index(drop=True)
    notes = []
    if len(done) > len(used):
        notes.append(f"{len(done) - len(used)} earlier finished run(s) of an arm and seed "
                     "superseded by a later run of the same cell")
    ens = ensembles[(ensembles["experiment"] == experiment)
                    & (ensembles["grid_key"] == grid.key)
                    & (ensembles["status"] == "FINISHED")].sort_values("start_time")
    latest = ens.drop_duplicates("arm", keep="last").reset_index(drop=True)
    if len(ens) > len(latest):
        notes.append(f"{len(ens) - len(latest)} earlier ensemble run(s) superseded by a later "
                     "one of the same arm")
    mine = cells[cells["experiment"] == experiment]
    return Selection(experiment, grid, used, others, latest, mine, notes, was_named)


def named_experiment(parents: pd.DataFrame, run_id: str) -> str:
    """The experiment a --grid run id belongs to; a one-line error when it is no grid run."""
    hit = parents.loc[parents["run_id"] == run_id, "experiment"]
    if hit.empty:
        raise StoreError(f"--grid {run_id} is not a grid run (tag ablate.kind=grid) in this "
                         "store; use the id of a grid run, as listed under \"grid runs\" in "
                         "a report")
    return str(hit.iloc[0])
