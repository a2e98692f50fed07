"""What sweeps found: each arm's best trial, a study's summary, and ``--tuned``, which
trains every arm at its study's best values (Section 3.1: learning rates chosen separately
for each net)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from alexnet import store
from alexnet.ablation import Cell
from alexnet.config import with_values
from alexnet.errors import ConfigError

DIVERGED_ERROR = 1.0  # the objective of a trial whose run diverged: worse than chance


def study_name(cell: Cell) -> str:
    """``<ablation>/<arm>/<key[:10]>``: the key of the arm's untuned config at seed 0, so
    that another --quick/--set/--epochs is another study, and --tuned finds it again."""
    key = cell.config.model_copy(update={"seed": 0}).key()
    return f"{cell.ablation}/{cell.arm_label}/{key[:10]}"


@dataclass(frozen=True)
class Best:
    lr: float
    weight_decay: float
    val_error: float
    trial: int


@dataclass(frozen=True)
class StudySummary:
    study: str
    ablation: str
    arm: str
    complete: int
    pruned: int
    failed: int
    running: int
    best: Best | None


def best_of(study: optuna.Study) -> Best | None:
    """Optuna's best trial, unless it diverged (as every trial then did)."""
    try:
        t = study.best_trial
    except ValueError:  # no complete trial
        return None
    if t.value >= DIVERGED_ERROR:
        return None
    return Best(t.params["lr"], t.user_attrs["weight_decay"], t.value, t.number)


def summarize(study: optuna.Study) -> StudySummary:
    states = [t.state for t in study.get_trials(deepcopy=False)]
    ablation, arm, _ = study.study_name.split("/")
    return StudySummary(study.study_name, ablation, arm, *(states.count(s) for s in (
        TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)),
        best_of(study))


def list_studies(spec: str, ablations: list[str]) -> list[StudySummary]:
    """Every study of these ablations in the storage (none if it does not exist)."""
    storage = store.open_storage(spec, create=False)
    names = optuna.get_all_study_names(storage) if storage is not None else []
    return [summarize(optuna.load_study(study_name=n, storage=storage)) for n in sorted(names)
            if n.partition("/")[0] in ablations]


def apply_tuned(cells: list[Cell], spec: str) -> list[Cell]:
    """Each cell at its arm's best lr and weight decay (Section 3.1); the cell key changes
    with them, and ``tuned`` records them. A missing sweep is a ConfigError saying which."""
    storage = store.open_storage(spec, create=False)
    names = set(optuna.get_all_study_names(storage)) if storage is not None else set()
    out = []
    for cell in cells:
        name = study_name(cell)
        best = best_of(optuna.load_study(study_name=name, storage=storage)) \
            if name in names else None
        if best is None:
            command = f"ablate sweep {cell.ablation}{' --quick' if cell.quick else ''}"
            why = (f"has no finished trial that did not diverge; run `{command} --trials 10`"
                   if name in names else f"does not exist in {store.redact(spec)}; run "
                   f"`{command}` first, with the same --quick/--set/--epochs as this run")
            raise ConfigError(f"no sweep for arm {cell.arm_label} of {cell.ablation}: study "
                              f"{name} {why}")
        tuned = {"lr": best.lr, "weight_decay": best.weight_decay}
        cfg = with_values(cell.config, {f"optim.{k}": v for k, v in tuned.items()},
                          where=f"--tuned {cell.arm_label} (study {name})")
        out.append(dataclasses.replace(cell, config=cfg, tuned=tuned))
    return out


def apply_tuned_where_swept(cells: list[Cell], spec: str) -> tuple[list[Cell], list[str]]:
    """``--tuned`` for a grid of several ablations (``paper``), where only some were swept
    (relu_vs_tanh, whose claim is about learning rates chosen per arm): an ablation with a
    study for any of its arms is tuned, every arm of it (``apply_tuned``: a missing arm is an
    error, as a half-tuned comparison is none); an ablation with no study at all keeps its
    configured values and is named in the list returned. With no study for any of them it
    is ``apply_tuned``'s error."""
    storage = store.open_storage(spec, create=False)
    names = set(optuna.get_all_study_names(storage)) if storage is not None else set()
    by_ablation: dict[str, list[Cell]] = {}
    for cell in cells:
        by_ablation.setdefault(cell.ablation, []).append(cell)
    swept = {a for a, mine in by_ablation.items() if any(study_name(c) in names for c in mine)}
    if not swept:
        return apply_tuned(cells, spec), []  # raises: nothing to tune
    tuned = {id(c): t for a in swept for c, t in zip(
        by_ablation[a], apply_tuned(by_ablation[a], spec), strict=True)}
    return [tuned.get(id(c), c) for c in cells], [a for a in by_ablation if a not in swept]
