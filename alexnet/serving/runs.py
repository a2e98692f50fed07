"""Which finished cell run an ablation, arm and seed (or a run id) name, and its classifier.

An arm is named as the runs' ``arm`` tag has it (``activation=relu``), or by its values
alone (``relu``; ``lrn,overlap`` for a cell of two axes). Where a store holds several grids
of an ablation (quick and real, tuned or not), the arm's most recently finished grid is
used; without ``--seed``, its lowest seed.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from typing import Any

from alexnet import store
from alexnet.errors import StoreError
from alexnet.serving.artifacts import (
    CONFIG_ARTIFACT,
    MODEL_ERROR_TAG,
    MODEL_NAME,
    PREPROCESS_ARTIFACT,
    fetch,
)
from alexnet.serving.classifier import Classifier, load_classifier

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class CellRun:
    """A finished cell run, and the run holding its artifacts (the original of a reuse)."""

    run: Any
    source_id: str

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def ablation(self) -> str:
        return self.run.data.tags.get("ablation", "?")

    @property
    def arm(self) -> str:
        return self.run.data.tags.get("arm", "?")

    @property
    def seed(self) -> str:
        return self.run.data.tags.get("seed", "?")

    def describe(self) -> str:
        return f"{self.ablation} {self.arm} seed {self.seed} (run {self.run_id})"

    @property
    def model_error(self) -> str | None:
        """Why its MLflow model could not be logged, where that failed (``record``)."""
        return self.run.data.tags.get(MODEL_ERROR_TAG)

    @property
    def model_uri(self) -> str:
        return f"runs:/{self.source_id}/{MODEL_NAME}"


def resolve(uri: str, target: str, arm: str | None, seed: int | None) -> CellRun:
    """The finished cell run that ``target`` (an ablation name, with ``arm``, or a run id)
    names; a StoreError or ConfigError of one line when there is none."""
    from alexnet.errors import ConfigError

    c = open_client(uri, target)
    if RUN_ID.match(target) and c.get_experiment_by_name(target) is None:
        if arm is not None or seed is not None:
            raise ConfigError(f"{target} is a run id: --arm and --seed name a cell of an "
                              "ablation; pass the ablation's name instead, or neither option")
        return by_run_id(c, uri, target)
    if arm is None:
        raise ConfigError(f"--arm is needed with an ablation: which arm of {target}? "
                          "(e.g. --arm relu; `ablate show " + target + "` lists them)")
    return find_cell_run(c, uri, target, arm, seed)


def open_client(uri: str, name: str) -> Any:
    """A client on an existing store; ``name`` (what the user asked for) is in its error."""
    db = store.sqlite_path(uri)
    if db is not None and not db.exists():
        raise StoreError(f"no runs in {uri}; run an ablation first (ablate run {name} --quick)"
                         if not RUN_ID.match(name) else f"no run {name}: no store at {uri}")
    store.check_store(uri, create=False)
    return store.client(uri, create=False)


def by_run_id(c: Any, uri: str, run_id: str) -> CellRun:
    from mlflow.exceptions import MlflowException

    try:
        run = c.get_run(run_id)
    except MlflowException:
        raise StoreError(f"no run {run_id} in {store.redact(uri)}; pass a cell run's id "
                         "(`ablate ui` shows them) or --tracking-uri of its store") from None
    if run.data.tags.get("ablate.kind") != "cell":
        raise StoreError(f"run {run_id} is no cell run (ablate.kind="
                         f"{run.data.tags.get('ablate.kind')}); pass the id of a cell's run")
    if run.info.status != "FINISHED":
        raise StoreError(f"run {run_id} is {run.info.status}, not finished: its cell has no "
                         "final model; finish it first (rerun its `ablate run`)")
    return _cell_run(run)


def _cell_run(run: Any) -> CellRun:
    return CellRun(run, run.data.tags.get("ablate.reused_from") or run.info.run_id)


def find_cell_run(c: Any, uri: str, ablation: str, arm: str, seed: int | None) -> CellRun:
    from alexnet import tracking

    exp = c.get_experiment_by_name(ablation)
    runs = tracking.cell_runs(c, [exp.experiment_id]) if exp is not None else []
    labels = sorted({r.data.tags.get("arm", "") for r in runs} | set(file_arms(ablation)))
    labels = [a for a in labels if a]
    if not runs:
        raise StoreError(f"no runs of ablation {ablation} in {store.redact(uri)}; run "
                         f"`ablate run {ablation} --quick` first (`ablate list` names them)")
    label = match_arm(arm, labels, ablation)
    mine = [r for r in runs if r.data.tags.get("arm") == label]
    finished = sorted((r for r in mine if r.info.status == "FINISHED"),
                      key=lambda r: r.info.end_time or 0, reverse=True)
    if finished:  # the newest grid of this arm, then the seed asked for or the lowest
        grid = finished[0].data.tags.get("ablate.grid_key")
        finished = [r for r in finished if r.data.tags.get("ablate.grid_key") == grid]
    seeds = sorted({int(r.data.tags["seed"]) for r in finished
                    if str(r.data.tags.get("seed", "")).isdigit()})
    pick = seed if seed is not None else (seeds[0] if seeds else None)
    chosen = [r for r in finished if r.data.tags.get("seed") == str(pick)]
    if not chosen:
        which = f"{ablation} {label}" + (f" seed {seed}" if seed is not None else "")
        states = sorted({r.info.status.lower() for r in mine
                         if seed is None or r.data.tags.get("seed") == str(seed)})
        found = f"its runs are {', '.join(states)}" if states else "it has no run yet"
        hint = f"; seeds with a finished run: {', '.join(map(str, seeds))}" if seeds else \
            f"; run `ablate run {ablation}` (--quick for the quick grid) to finish it"
        raise StoreError(f"{which} has no finished run in {store.redact(uri)} ({found}){hint}")
    return _cell_run(chosen[0])


def file_arms(ablation: str) -> list[str]:
    """The arm labels the ablation file names, where it can be found (else none)."""
    try:
        from alexnet.ablation import load_ablation

        return list(dict.fromkeys(cell.arm_label for cell in
                                  load_ablation(ablation).cells(seeds=[0])))
    except Exception:  # a renamed or deleted file: the store's arms still count
        return []


def match_arm(arm: str, labels: list[str], ablation: str) -> str:
    """The arm label that ``arm`` names: the label itself (``activation=relu``), or its
    values in order (``relu``; ``lrn,overlap``)."""
    from alexnet.errors import ConfigError

    wanted = arm.replace(" ", "")
    hits = [label for label in labels if wanted in (label, _values(label))]
    if len(hits) == 1:
        return hits[0]
    if not hits:  # one value of several axes: `--arm lrn` where the cells also vary pool
        parts = set(wanted.split(","))
        hits = [label for label in labels if parts <= set(_values(label).split(","))]
    choices = ", ".join(_values(label) for label in labels)
    if len(hits) > 1:
        raise ConfigError(f"--arm {arm} matches {len(hits)} arms of {ablation} "
                          f"({', '.join(hits)}); name one of: {choices}")
    if not hits:
        raise ConfigError(f"--arm {arm}: {ablation} has no such arm; choose one of: {choices}")
    return hits[0]


def _values(label: str) -> str:
    return ",".join(part.split("=", 1)[-1] for part in label.split(","))


# --- the classifier of a run -----------------------------------------------------------------


def load_run_classifier(uri: str, source_id: str, device: str = "auto") -> Classifier:
    """The classifier of the run ``source_id`` (a CellRun's) from its artifacts: the path
    the served model takes too."""
    from alexnet.runner import WEIGHTS_ARTIFACT

    c = store.client(uri, create=False)
    names = (CONFIG_ARTIFACT, WEIGHTS_ARTIFACT, PREPROCESS_ARTIFACT)
    with tempfile.TemporaryDirectory(prefix="ablate-predict-") as tmp:
        paths = [fetch(c, source_id, name, tmp) for name in names]
        missing = [n for p, n in zip(paths, names, strict=True) if p is None]
        if missing:
            raise StoreError(f"run {source_id} has no {', '.join(missing)} (logged before "
                             "models could be served, or its upload failed); rerun its cell "
                             "with `ablate run NAME --force`")
        return load_classifier(*paths, device=device)


def has_mlflow_model(uri: str, cell_run: CellRun) -> bool:
    """Whether the run logged its MLflow model (``runtime.log_model``)."""
    c = store.client(uri, create=False)
    source = c.get_run(cell_run.source_id)
    models = c.search_logged_models(
        experiment_ids=[source.info.experiment_id], max_results=1,
        filter_string=f"name = '{MODEL_NAME}' AND source_run_id = '{cell_run.source_id}'")
    return bool(models)
