"""`ablate report` on a store with known numbers, logged through the project's own
tracking code (no training). One SQLite store is shared by the module: creating an MLflow
database runs its migrations, which costs seconds."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from alexnet import store as store_mod
from alexnet import tracking
from alexnet.ablation import Cell
from alexnet.claims import CLAIMS
from alexnet.config import build_config
from alexnet.errors import StoreError
from alexnet.report import figures, write_report
from alexnet.report.claims_md import claim_sentence
from alexnet.report.compare import ClaimResult, evaluate_claim
from alexnet.report.grids import grid_keys, select
from alexnet.report.load import ENSEMBLE_COLUMNS, GRID_COLUMNS
from alexnet.report.markdown import problem_lines
from alexnet.report.stats import (
    Interval,
    problem_runs,
    ratio_interval,
    t_interval,
    verdict,
    with_crossings,
)

EPOCHS = 4
# Config keys that make each arm a different run config (axes without one share it).
ARM_KEYS = {"activation": "model.activation", "norm": "model.norm", "pool": "model.pool",
            "dropout": None, "pca_lighting": "data.pca_lighting", "towers": None,
            "augmentation": "data.flip", "depth": None}

# ablation -> (claims, axis, {arm: {seed: (final val error, final train error, epoch at
# which training error first drops to or below 25%, or None)}}); one grid each
STORE = {
    # 2 arms x 3 seeds x 4 epochs; tanh seed 2 never reaches 25% (censored)
    "relu_vs_tanh": (["relu_speed"], "activation", {
        "relu": {0: (0.40, 0.10, 1), 1: (0.42, 0.12, 2), 2: (0.41, 0.11, 1)},
        "tanh": {0: (0.45, 0.20, 4), 1: (0.47, 0.22, 4), 2: (0.46, 0.30, None)}}),
    # lrn lower than none in every seed: reproduced
    "normalization": (["lrn"], "norm", {
        "lrn": {0: (0.30, 0.10, 2), 1: (0.32, 0.11, 2), 2: (0.31, 0.10, 2)},
        "bn": {0: (0.28, 0.08, 1)},
        "none": {0: (0.33, 0.12, 2), 1: (0.36, 0.12, 2), 2: (0.34, 0.11, 2)}}),
    # overlap higher than nonoverlap in both seeds: contradicted
    "pooling": (["overlap_pool"], "pool", {
        "overlap": {0: (0.400, 0.1, 2), 1: (0.410, 0.1, 2)},
        "nonoverlap": {0: (0.380, 0.1, 2), 1: (0.389, 0.1, 2)}}),
    # differences of both signs: inconclusive
    "pca_lighting": (["pca_lighting"], "pca_lighting", {
        "on": {0: (0.30, 0.1, 2), 1: (0.35, 0.1, 2)},
        "off": {0: (0.31, 0.1, 2), 1: (0.33, 0.1, 2)}}),
    # one seed per arm
    "dropout": (["dropout"], "dropout", {
        "on": {0: (0.35, 0.20, 2)}, "off": {0: (0.40, 0.05, 1)}}),
    # the baseline arm was never run
    "towers": (["two_towers"], "towers", {"two": {0: (0.30, 0.1, 2), 1: (0.31, 0.1, 2)}}),
    # Section 7: the full net against the mean of the three nets that each lack a layer
    "depth": (["depth"], "depth", {
        "full": {0: (0.30, 0.1, 2), 1: (0.31, 0.1, 2)},
        "no_conv2": {0: (0.32, 0.1, 2), 1: (0.335, 0.1, 2)},
        "no_conv3": {0: (0.325, 0.1, 2), 1: (0.33, 0.1, 2)},
        "no_conv4": {0: (0.31, 0.1, 2), 1: (0.325, 0.1, 2)}}),
}
TUNED_LR = {"relu": 0.05, "tanh": 0.02, "lrn": 0.03, "none": 0.02}
# Three seeds with a held-out test split whose sign disagrees with validation's, and an
# ensemble per arm: lrn on the test split, none on the validation split.
SPLIT_VAL = {"lrn": [0.310, 0.320, 0.300], "none": [0.300, 0.312, 0.291]}
SPLIT_TEST = {"lrn": [0.280, 0.290, 0.275], "none": [0.300, 0.312, 0.292]}
ENSEMBLE = {"lrn": ("test", 0.258, 0.070), "none": ("val", 0.280, 0.090)}
# tuned_mix: an untuned 3-seed grid, then a tuned grid planned for 3 seeds with only seed 0
UNTUNED_LRN = [0.30, 0.31, 0.32]
UNTUNED_GAP = [0.020, 0.021, 0.018]  # none − lrn per seed
TUNED_SEED0 = {"lrn": 0.40, "none": 0.35}
# two_scales: a full-size grid (2 seeds), then a quicker one (1 seed) at another scale
FULL = {"lrn": [0.20, 0.21], "none": [0.23, 0.245]}
QUICK = {"lrn": [0.40], "none": [0.41]}


def _train_curve(final_train: float, ett: int | None) -> list[float]:
    """0.6 − 0.05·epoch until epoch ``ett``, then ``final_train`` (≤ 25%) from there on."""
    if ett is None:
        return list(np.linspace(0.6, final_train, EPOCHS))
    return [0.6 - 0.05 * e if e < ett else final_train for e in range(1, EPOCHS + 1)]


def _crossing(final_train: float, ett: int) -> float:
    """Where the curve above crosses 25%: on the straight line from epoch ett−1 to ett."""
    before = 0.6 - 0.05 * (ett - 1)
    return (ett - 1) + (before - 0.25) / (before - final_train)


def _history(final_val: float, final_train: float, ett: int | None) -> list:
    from alexnet.results import EpochMetrics

    train = _train_curve(final_train, ett)
    val = np.linspace(0.7, final_val, EPOCHS)
    return [EpochMetrics(e, 1.0, float(train[e - 1]), 1.0, float(val[e - 1]),
                         float(val[e - 1]) / 3, 0.01, 2.0 + 0.1 * e, 100.0)
            for e in range(1, EPOCHS + 1)]


def _cell(ablation: str, axis: str, arm: str, seed: int, claims: list[str], *,
          tuned: bool = False, scale: dict | None = None) -> Cell:
    # the store's data size is pinned here, so the header test does not follow the profile
    overrides: dict[str, object] = {"seed": seed, "data.synthetic.train_size": 1024,
                                    "data.synthetic.val_size": 512, **(scale or {})}
    key = ARM_KEYS.get(axis)
    if key:
        overrides[key] = {"on": True, "off": False}.get(arm, arm)
    chosen = {"optim.lr": TUNED_LR[arm], "optim.weight_decay": 0.0} if tuned else {}
    overrides.update(chosen)
    cfg = build_config("quick", overrides)
    return Cell(ablation, {axis: arm}, seed, cfg, tuple(claims), chosen,
                varied=(key,) if key else ())


def _log(c, exp_id: str, cell: Cell, final: tuple | None, status: str = "finished", *,
         parent: str | None = None, test: tuple[float, float] | None = None) -> str:
    from alexnet.results import RunResult

    run_id = tracking.start_cell_run(c, exp_id, cell, parent_run_id=parent)
    if status == "running":
        return run_id
    if status == "diverged":
        hist = _history(0.9, 0.9, None)[:2]
        tracking.log_epoch(c, run_id, hist[0])
        tracking.end_cell_run(c, run_id, RunResult("diverged", hist[:1], "loss is nan at "
                                                   "epoch 2", train_seconds=3.0))
        return run_id
    val, train, ett = final
    hist = _history(val, train, ett)
    for m in hist:
        tracking.log_epoch(c, run_id, m)
    if test is not None:  # a held-out test split, scored once at the end
        tracking.log_metrics(c, run_id, {"test_error": test[0], "test_error_top5": test[1]})
    tracking.end_cell_run(c, run_id, RunResult("finished", hist, epochs_to_target=ett,
                                               train_seconds=10.0))
    return run_id


def _grid(c, exp_id: str, cells: list[tuple[Cell, tuple, tuple | None]],
          planned: int | None = None) -> tuple[str, list[str]]:
    """A grid run (as the runner logs it) and its finished cells."""
    first = cells[0][0]
    parent = c.create_run(exp_id, tags={"ablate.kind": "grid", "ablation": first.ablation,
                                        "ablate.grid_key": first.grid_key}).info.run_id
    tracking.log_params(c, parent, {"cells": planned or len(cells)})
    ids = [_log(c, exp_id, cell, final, parent=parent, test=test) for cell, final, test in cells]
    c.set_terminated(parent)
    time.sleep(0.01)  # the next grid starts and ends strictly later
    return parent, ids


def _log_ensemble(c, exp_id: str, cell: Cell, members: dict[int, str], split: str,
                  top1: float, top5: float) -> str:
    """What the runner logs at the end of a grid: an arm's seeds' softmax averaged."""
    from mlflow.entities import Metric

    tags = {"ablate.kind": "ensemble", "ablation": cell.ablation, "arm": cell.arm_label,
            "ablate.grid_key": cell.grid_key, "members": ",".join(members.values()),
            "seeds": ",".join(map(str, members)), "split": split,
            **{f"axis.{a}": v for a, v in cell.arms.items()}}
    run_id = c.create_run(exp_id, tags=tags).info.run_id
    now = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric("ensemble_error", top1, now, 0),
                                 Metric("ensemble_error_top5", top5, now, 0)])
    c.set_terminated(run_id)
    return run_id


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder for the module's store: on a RAM disk where there is one, since every
    logged batch is an SQLite commit and a store thrown away after the tests needs no
    durability (this makes the set-up several times faster)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        with tempfile.TemporaryDirectory(dir=shm, prefix="report-test-") as folder:
            yield Path(folder)
    else:
        yield tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def store(store_root: Path) -> dict:
    root = store_root
    (root / "mlruns").mkdir()
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    c = store_mod.client(uri)
    ids: dict[object, object] = {}
    exp_ids: dict[str, str] = {}

    def exp(name: str) -> str:
        exp_ids[name] = tracking.get_experiment_id(c, uri, name)
        return exp_ids[name]

    for ablation, (claims, axis, arms) in STORE.items():
        tuned = ablation == "relu_vs_tanh"
        cells = [(_cell(ablation, axis, arm, seed, claims, tuned=tuned), final, None)
                 for arm, seeds in arms.items() for seed, final in seeds.items()]
        parent, run_ids = _grid(c, exp(ablation), cells)
        ids[(ablation, "grid")] = parent
        ids.update({(ablation, cell.arm_label, cell.seed): r
                    for (cell, _, _), r in zip(cells, run_ids, strict=True)})
    relu = exp_ids["relu_vs_tanh"]
    ids["failed"] = _log(c, relu, _cell("relu_vs_tanh", "activation", "tanh", 3, ["relu_speed"],
                                        tuned=True), None, "diverged")
    ids["running"] = _log(c, relu, _cell("relu_vs_tanh", "activation", "relu", 3,
                                         ["relu_speed"], tuned=True), None, "running")
    # an ablation whose only run is still going
    _log(c, exp("augmentation"), _cell("augmentation", "augmentation", "on", 0,
                                       ["augmentation"]), None, "running")

    split = exp("test_split")
    cells = [(_cell("test_split", "norm", arm, s, ["lrn"]), (SPLIT_VAL[arm][s], 0.1, 2),
              (SPLIT_TEST[arm][s], SPLIT_TEST[arm][s] / 3)) for arm in ("lrn", "none")
             for s in range(3)]
    _, run_ids = _grid(c, split, cells)
    for arm, (which, top1, top5) in ENSEMBLE.items():
        members = {cell.seed: r for (cell, _, _), r in zip(cells, run_ids, strict=True)
                   if cell.arms["norm"] == arm}
        ids[("ensemble", arm)] = _log_ensemble(c, split, _cell("test_split", "norm", arm, 0, []),
                                               members, which, top1, top5)

    mix = exp("tuned_mix")
    untuned = [(_cell("tuned_mix", "norm", arm, s, ["lrn"]),
                (UNTUNED_LRN[s] + (UNTUNED_GAP[s] if arm == "none" else 0), 0.1, 2), None)
               for arm in ("lrn", "none") for s in range(3)]
    ids[("tuned_mix", "untuned")], ids[("tuned_mix", "untuned runs")] = _grid(c, mix, untuned)
    tuned = [(_cell("tuned_mix", "norm", arm, 0, ["lrn"], tuned=True),
              (TUNED_SEED0[arm], 0.1, 2), None) for arm in ("lrn", "none")]
    ids[("tuned_mix", "tuned")], ids[("tuned_mix", "tuned runs")] = _grid(c, mix, tuned, 6)

    scales = exp("two_scales")
    full = {"data.synthetic.train_size": 2048, "model.width": 0.25}
    ids[("two_scales", "full")], ids[("two_scales", "full runs")] = _grid(c, scales, [
        (_cell("two_scales", "norm", arm, s, ["lrn"], scale=full), (FULL[arm][s], 0.1, 2), None)
        for arm in ("lrn", "none") for s in range(2)])
    ids[("two_scales", "quick")], ids[("two_scales", "quick runs")] = _grid(c, scales, [
        (_cell("two_scales", "norm", arm, s, ["lrn"]), (QUICK[arm][s], 0.1, 2), None)
        for arm in ("lrn", "none") for s in range(1)])

    out = root / "reports"
    started = time.perf_counter()
    relu_report = write_report("relu_vs_tanh", uri, out)
    seconds = time.perf_counter() - started
    return {"uri": uri, "ids": ids, "exp_ids": exp_ids, "out": out, "relu": relu_report,
            "seconds": seconds, "paper": write_report("paper", uri, out)}


def _section(text: str, heading: str) -> str:
    """From ``heading`` to the next heading of any level."""
    return re.split(r"\n#{1,3} ", text.split(heading, 1)[1], maxsplit=1)[0]


def _table_row(text: str, first_cell: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starting with {first_cell!r}")


def _row(text: str, heading: str, first_cell: str) -> dict[str, str]:
    section = _section(text, heading)
    first = next(line for line in section.splitlines() if line.startswith("|"))
    header = [c.strip() for c in first.strip().strip("|").split("|")]
    return dict(zip(header, _table_row(section, first_cell), strict=True))


def _pp(v: float) -> str:
    return f"{v:+.2f}".replace("-", "−")


def _interval(diffs: list[float] | np.ndarray) -> tuple[float, float, float]:
    d = np.asarray(diffs, dtype=float)
    lo, hi = sps.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=sps.sem(d))
    return float(d.mean()), float(lo), float(hi)


# --- the statistics on their own ------------------------------------------------------------


def test_t_interval_matches_scipy() -> None:
    diffs = np.array([-3.0, -4.0, -2.5, -3.5])
    iv = t_interval(diffs)
    est, lo, hi = _interval(diffs)
    assert (iv.estimate, iv.n) == (pytest.approx(est), 4)
    assert (iv.low, iv.high) == (pytest.approx(lo), pytest.approx(hi))
    one = t_interval([1.5])
    assert one.n == 1 and not one.has_interval and math.isnan(one.low)
    same = t_interval([2.0, 2.0, 2.0])  # no spread: a point, and flagged as such
    assert (same.low, same.high, same.zero_width) == (2.0, 2.0, True)


def test_ratio_interval_is_a_t_interval_on_log_ratios() -> None:
    tanh, relu = np.array([12.0, 10.0, 15.0]), np.array([3.0, 4.0, 3.0])
    est, lo, hi = _interval(np.log(tanh / relu))
    iv = ratio_interval(tanh, relu)
    assert iv.estimate == pytest.approx(math.exp(est))
    assert (iv.low, iv.high) == (pytest.approx(math.exp(lo)), pytest.approx(math.exp(hi)))
    assert verdict(iv, "higher", null=1.0) == "reproduced"


@pytest.mark.parametrize(("iv", "direction", "expected"), [
    (Interval(-2.0, -3.0, -1.0, 3), "lower", "reproduced"),
    (Interval(2.0, 1.0, 3.0, 3), "lower", "contradicted"),
    (Interval(2.0, 1.0, 3.0, 3), "higher", "reproduced"),
    (Interval(-0.5, -2.0, 1.0, 3), "lower", "inconclusive"),
    (Interval(-0.5, math.nan, math.nan, 1), "lower", "inconclusive (one seed)"),
    (Interval(math.nan, math.nan, math.nan, 0), "lower", "not measured"),
])
def test_verdict(iv: Interval, direction: str, expected: str) -> None:
    assert verdict(iv, direction) == expected


def _frame(rows: list[dict]) -> pd.DataFrame:
    base = {"experiment": "x", "status": "FINISHED", "tuned": False, "diverged": False,
            "start_time": pd.Timestamp("2024-01-01", tz="UTC"), "final_train_error": 0.1,
            "parent_run_id": None}
    df = pd.DataFrame([{**base, **r} for r in rows])
    df["run_id"] = [f"r{i}" for i in range(len(df))]
    df["start_time"] = df["start_time"] + pd.to_timedelta(range(len(df)), unit="s")
    df["end_time"] = df["start_time"] + pd.Timedelta("1s")
    return df


def test_claim_with_two_axes_holds_the_other_at_its_reference() -> None:
    rows = []
    for norm, shift in (("lrn", 0.0), ("none", 0.10)):  # norm=none would add +10 pp
        for act, err in (("relu", 0.30), ("tanh", 0.34)):
            for seed, noise in enumerate((0.0, 0.01, -0.005)):
                rows.append({"arm": f"activation={act},norm={norm}", "seed": seed,
                             "axis.activation": act, "axis.norm": norm,
                             "final_val_error": err + shift * (act == "relu") + noise})
    df = _frame(rows)
    claim = dataclasses.replace(CLAIMS["lrn"], axis="activation", arm="relu", baseline="tanh")
    r = evaluate_claim(claim, df, df, {"activation": "relu", "norm": "lrn"})
    assert r.held == {"norm": "lrn"}
    assert r.interval.estimate == pytest.approx(-4.0)  # not the +6 pp of norm=none
    assert r.verdict == "reproduced" and r.split == "val"


def test_ratio_with_a_censored_baseline_is_a_lower_bound() -> None:
    rows = [{"arm": f"activation={a}", "seed": s, "axis.activation": a,
             "final_val_error": 0.3, "epochs_completed": 10.0,
             "epochs_to_target": e, "params.train.target_train_error": "0.25"}
            for a, eps in (("relu", (2.0, 2.0, 3.0)), ("tanh", (8.0, math.nan, 9.0)))
            for s, e in enumerate(eps)]
    df = _frame(rows)
    r = evaluate_claim(CLAIMS["relu_speed"], df, df, {"activation": "relu"})
    assert r.bound == "lower" and r.verdict == "reproduced"
    assert r.interval.estimate == pytest.approx(math.exp(np.log([4.0, 5.0, 3.0]).mean()))
    assert any("never reached 25%" in n for n in r.notes)
    assert any("resolution of one epoch" in n for n in r.notes)  # no per-epoch history here
    # censored in the arm instead: the estimate is an upper bound and cannot reproduce
    flipped = df.assign(**{"axis.activation": df["axis.activation"].map(
        {"relu": "tanh", "tanh": "relu"})})
    r2 = evaluate_claim(CLAIMS["relu_speed"], flipped, flipped, {"activation": "relu"})
    assert r2.bound == "upper" and r2.verdict in ("contradicted", "inconclusive (censored)")


def test_whole_epochs_give_a_zero_width_interval_and_say_why() -> None:
    rows = [{"arm": f"activation={a}", "seed": s, "axis.activation": a, "epochs_to_target": e,
             "epochs_completed": 10.0, "final_val_error": 0.3}
            for a, e in (("relu", 2.0), ("tanh", 2.0)) for s in range(3)]
    df = _frame(rows)
    r = evaluate_claim(CLAIMS["relu_speed"], df, df, {"activation": "relu"})
    assert (r.interval.low, r.interval.high) == (1.0, 1.0) and r.verdict == "inconclusive"
    assert any("no width" in n and "resolution" in n for n in r.notes)


def test_crossing_is_interpolated_between_epochs() -> None:
    used = _frame([{"arm": "a", "seed": s, "epochs_to_target": e, "final_val_error": 0.3}
                   for s, e in enumerate((3.0, 1.0, math.nan, 2.0))])
    curves = {"r0": [0.50, 0.30, 0.20], "r1": [0.20, 0.10], "r2": [0.50, 0.40]}
    history = pd.DataFrame([(r, "train_error", e + 1, v) for r, vs in curves.items()
                            for e, v in enumerate(vs)],
                           columns=["run_id", "key", "epoch", "value"])
    out = with_crossings(used, history).set_index("run_id")
    assert out.loc["r0", "crossing_epoch"] == pytest.approx(2.5)  # 30% at 2, 20% at 3
    assert not out.loc["r0", "crossing_first"]
    # below the line after the first epoch: nothing before epoch 1, so at most 1 (a bound)
    assert out.loc["r1", "crossing_epoch"] == 1.0 and out.loc["r1", "crossing_first"]
    assert math.isnan(out.loc["r2", "crossing_epoch"])  # never reached
    # no per-epoch history: the whole-epoch count, flagged as not interpolated
    assert out.loc["r3", "crossing_epoch"] == 2.0 and not out.loc["r3", "crossing_interpolated"]


def test_a_ratio_in_the_papers_direction_is_not_called_a_disagreement() -> None:
    r = ClaimResult(CLAIMS["relu_speed"], "relu_vs_tanh", "ratio",
                    Interval(1.32, 0.91, 1.91, 3), "inconclusive", seeds=[0, 1, 2],
                    arm_text="activation=relu", baseline_text="activation=tanh", split="train")
    text = claim_sentence(r)
    assert "1.32× [0.91, 1.91] faster" in text
    assert "disagrees" not in text
    assert "The paper's 6× lies outside the interval; the estimate points the same way, but " \
           "the interval also holds no effect" in text
    slower = dataclasses.replace(r, interval=Interval(0.8, 0.6, 0.95, 3))
    assert "The paper's 6× disagrees: the interval lies on the other side of no effect" in \
        claim_sentence(slower)


def test_mixed_splits_fall_back_to_validation_and_say_so() -> None:
    df = _frame([{"arm": f"norm={a}", "seed": s, "axis.norm": a, "final_val_error": v,
                  "test_error": t}
                 for a, v, ts in (("lrn", 0.30, (0.2, 0.21)), ("none", 0.33, (0.25, math.nan)))
                 for s, t in enumerate(ts)])
    r = evaluate_claim(CLAIMS["lrn"], df, df, {"norm": "lrn"})
    assert r.split == "val" and r.interval.estimate == pytest.approx(-3.0)
    assert "validation errors compared: 1 of 4 runs in this comparison lack a test error" \
        in r.notes


def test_untagged_runs_of_other_scales_or_tuning_form_separate_grids() -> None:
    base = {"params.data.source": "synthetic", "params.train.epochs": "4",
            "final_val_error": 0.3}
    rows = [{**base, "arm": f"norm={a}", "seed": s, "axis.norm": a, "params.model.norm": a,
             "params.model.width": w, "tuned": t}
            for w, t in (("0.125", False), ("0.25", False), ("0.125", True))
            for a in ("lrn", "none") for s in (0, 1)]
    keys = grid_keys(_frame(rows))
    assert keys.nunique() == 3  # width and tuned split them; the arm's own param does not
    sel = select("x", _frame(rows), pd.DataFrame(columns=GRID_COLUMNS),
                 pd.DataFrame(columns=ENSEMBLE_COLUMNS))
    assert len(sel.used) == 4 and sel.used["tuned"].all() and len(sel.others) == 2


def test_the_per_seed_interval_never_goes_below_zero() -> None:
    used = _frame([{"arm": "a", "seed": s, "final_val_error": v}
                   for s, v in enumerate((0.01, 0.02, 0.40))])
    fig = figures.seed_points(used, order=["a"])
    ax = fig.axes[0]
    bars = [seg for coll in ax.collections if hasattr(coll, "get_segments")
            for seg in coll.get_segments()]
    assert bars and min(x for seg in bars for x, _ in seg) >= 0.0
    mean, sd = np.mean([1.0, 2.0, 40.0]), np.std([1.0, 2.0, 40.0], ddof=1)
    assert mean - sd < 0  # unclipped, the bar would reach below 0%
    assert max(x for seg in bars for x, _ in seg) == pytest.approx(mean + sd)
    assert ax.get_xlim()[0] >= 0.0


def test_a_failure_fixed_by_a_rerun_says_so() -> None:
    df = _frame([{"arm": "a", "seed": 0, "status": "FAILED", "final_val_error": math.nan,
                  "failure_reason": "out of memory"},
                 {"arm": "a", "seed": 0, "final_val_error": 0.4}])
    (line,) = problem_lines(problem_runs(df))
    assert "failed (FAILED, run `r0`): out of memory (a later run" in line


# --- the report from a store ---------------------------------------------------------------


def test_missing_experiment_is_one_line_store_error(store: dict, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"no runs of ablation nope in .*ablate run nope"):
        write_report("nope", store["uri"], tmp_path)
    with pytest.raises(StoreError) as err:
        write_report("paper", f"sqlite:///{tmp_path}/absent/mlflow.db", tmp_path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "absent").exists()  # nothing created while looking


def test_report_is_fast_and_leaves_the_global_uri_alone(store: dict) -> None:
    import mlflow

    assert store["seconds"] < 10
    assert mlflow.get_tracking_uri() != store["uri"]


def test_per_arm_table_values(store: dict) -> None:
    text = store["relu"].read_text()
    relu = _row(text, "## Results per arm", "activation=relu (tuned)")
    finals = STORE["relu_vs_tanh"][2]["relu"]
    vals = [100 * v for v, _, _ in finals.values()]
    assert relu["top-1 val error (%)"] == f"{np.mean(vals):.1f} ± {np.std(vals, ddof=1):.1f}"
    train = [100 * t for _, t, _ in finals.values()]
    assert relu["train error (%)"] == f"{np.mean(train):.1f} ± {np.std(train, ddof=1):.1f}"
    gap = np.subtract(vals, train)
    assert relu["val − train gap (pp)"] == f"{gap.mean():.1f} ± {gap.std(ddof=1):.1f}"
    # seeds 0 and 2 are below 25% after epoch 1 (counted as 1), seed 1 crosses within epoch 2
    epochs = [1.0, _crossing(0.12, 2), 1.0]
    assert relu["epochs to 25% train error"] == (
        f"{np.mean(epochs):.1f} ± {np.std(epochs, ddof=1):.1f} (2 within epoch 1)")
    assert relu["seeds"] == "3" and relu["lr"] == "0.05" and relu["weight decay"] == "0"
    assert relu["time/epoch (s)"] == "2.25 ± 0.00"  # every run: mean of 2.1 .. 2.4
    assert relu["in progress"] == "1" and relu["failed"] == "0"
    assert "top-1 test error (%)" not in relu  # these runs have no test split
    tanh = _row(text, "## Results per arm", "activation=tanh (tuned)")
    epochs = [_crossing(0.20, 4), _crossing(0.22, 4)]
    assert tanh["epochs to 25% train error"] == (
        f"{np.mean(epochs):.1f} ± {np.std(epochs, ddof=1):.1f} (2 of 3; 1 never)")
    assert tanh["failed"] == "1 (1 diverged)" and tanh["lr"] == "0.02"


def test_failed_and_running_runs_are_counted_and_named(store: dict) -> None:
    text = store["relu"].read_text()
    left_out = _section(text, "### Runs left out of the numbers")
    assert f"activation=tanh, seed 3: diverged (FAILED, run `{store['ids']['failed']}`): " \
           "loss is nan at epoch 2" in left_out
    assert f"activation=relu, seed 3: in progress (RUNNING, run `{store['ids']['running']}`)" \
           in left_out
    assert "1 running" in text and "1 failed" in text


def test_header_says_what_was_run(store: dict) -> None:
    text = store["relu"].read_text()
    head = _section(text, "## What was run")
    for expected in ("synthetic images (1024 training, 512 validation), 32 px",
                     "alexnet_cifar, width 0.125", "0, 1, 2 (also started, none finished: 3)",
                     "cpu", "| tuned ", "yes: lr and weight decay chosen per arm",
                     f"(id {store['exp_ids']['relu_vs_tanh']})",
                     store["ids"][("relu_vs_tanh", "grid")], store["uri"],
                     "the most recent grid; none is complete; 6 of 8 cells finished",
                     "63.0 s"):  # 6 x 10 s + 3 s of the diverged run + 0 of the running one
        assert expected in head, expected
    commit = tracking.git_commit()
    if commit:
        assert commit in head
    assert "> **Scale.** These runs: synthetic images" in text
    assert "Other runs in the store" not in text  # one grid only


def test_relu_speed_ratio_is_interpolated(store: dict) -> None:
    # tanh ÷ relu per seed, on crossings interpolated between epochs: relu seeds 0 and 2
    # are below 25% after epoch 1 (at most 1 epoch), tanh seed 2 never got there in 4
    ratios = np.array([_crossing(0.20, 4) / 1, _crossing(0.22, 4) / _crossing(0.12, 2), 4 / 1])
    est, lo, hi = (math.exp(v) for v in _interval(np.log(ratios)))
    text = store["relu"].read_text()
    row = _table_row(text, "relu_speed")
    assert f"≥ {est:.2f}×" in row and f"[{lo:.2f}, {hi:.2f}]" in row
    assert "reproduced" in row and "6×" in row
    assert re.search(rf"\*\*Claim relu_speed\*\* .*: reproduced at this scale \(activation="
                     rf"relu reached 25% training error at least {est:.2f}× "
                     rf"\[{lo:.2f}, {hi:.2f}\] faster than activation=tanh", text)
    assert "activation=tanh never reached 25% training error in 1 of 3 seed(s)" in text
    assert "activation=relu was at or below 25% after its first epoch in 2 of 3 seed(s)" in text
    assert "interpolated linearly between the last epoch above the line" in text
    assert "nothing is assumed before epoch 1" in text


def test_figure1_is_the_papers_figure(store: dict) -> None:
    from alexnet.report import load
    from alexnet.report.stats import with_crossings

    text = store["relu"].read_text()
    assert "![training error against epochs, relu solid and tanh dashed, as in the paper's " \
           "Figure 1](relu_vs_tanh/figure1.png)" in text
    assert "relu_vs_tanh/train_error.png" not in text  # Figure 1 replaces the plain curves
    runs = load.load_runs("relu_vs_tanh", store["uri"])
    used = runs.cells[(runs.cells["status"] == "FINISHED")]
    history = load.metric_histories(store["uri"], used["run_id"], ("train_error",))
    fig = figures.figure1(history, with_crossings(used, history), axis="activation",
                          arm="relu", baseline="tanh", target_pct=25.0)
    lines = fig.axes[0].get_lines()
    styles = {line.get_label(): line.get_linestyle() for line in lines}
    assert styles["activation=relu (3 seeds)"] == "-"
    assert styles["activation=tanh (3 seeds)"] == "--"
    assert any(line.get_label() == "25% target" and set(line.get_ydata()) == {25.0}
               for line in lines)


def test_paired_delta_and_verdicts_in_the_paper_table(store: dict) -> None:
    text = store["paper"].read_text()
    rows = {c: _row(text, "## Error deltas against the paper", c) for c in CLAIMS}
    lrn, none = STORE["normalization"][2]["lrn"], STORE["normalization"][2]["none"]
    est, lo, hi = _interval([100 * (lrn[s][0] - none[s][0]) for s in (0, 1, 2)])
    assert rows["lrn"]["measured"] == f"{_pp(est)} pp"
    assert rows["lrn"]["95% interval"] == f"[{_pp(lo)}, {_pp(hi)}]"
    assert rows["lrn"]["verdict"] == "reproduced" and rows["lrn"]["n"] == "3"
    assert rows["lrn"]["paper"] == "−1.4 pp" and rows["lrn"]["Mishkin et al. 2016"] == "+0.1 pp"
    assert rows["lrn"]["ablation"] == "`normalization`"
    assert rows["overlap_pool"]["verdict"] == "contradicted"
    assert rows["pca_lighting"]["verdict"] == "inconclusive"
    assert rows["relu_speed"]["verdict"] == "reproduced"
    assert rows["dropout"]["verdict"] == "inconclusive (one seed)"
    assert rows["dropout"]["95% interval"] == "none (one seed)"
    assert rows["two_towers"]["verdict"] == "not measured: arm towers=one missing: never run"
    assert rows["depth"]["ablation"] == "`depth`"
    store_table = _section(text, "## Ablations in the store")
    for name in (*STORE, "test_split", "tuned_mix", "two_scales"):
        assert f"`{name}`" in store_table
    assert "**Claim dropout** (§4.2): inconclusive (one seed) at this scale" in text
    assert "one of the paired seeds, so no interval" in text
    # the paper summary applies the grid rule per experiment too
    assert "### `two_scales`: Other runs in the store, not used" in text
    assert "### `tuned_mix`: Other runs in the store, not used" in text


def test_depth_row_compares_full_with_the_mean_of_the_shallower_arms(store: dict,
                                                                     tmp_path: Path) -> None:
    arms, seeds = STORE["depth"][2], (0, 1)
    diffs = [100 * (arms["full"][s][0] - np.mean([arms[a][s][0] for a in
                                                 ("no_conv2", "no_conv3", "no_conv4")]))
             for s in seeds]
    est, lo, hi = _interval(diffs)
    text = write_report("depth", store["uri"], tmp_path).read_text()
    row = _row(text, "## Error deltas against the paper", "depth")
    assert row["measured"] == f"{_pp(est)} pp" and row["95% interval"] == f"[{_pp(lo)}, {_pp(hi)}]"
    assert row["verdict"] == "reproduced" and row["n"] == "2" and row["paper"] == "−2.0 pp"
    assert row["agrees with"] == "paper (size)"
    assert "depth=full − the mean of depth=no_conv2, depth=no_conv3, depth=no_conv4" in text
    one = _interval([100 * (arms["full"][s][0] - arms["no_conv3"][s][0]) for s in seeds])
    assert f"depth=full − depth=no_conv3: {_pp(one[0])} pp [{_pp(one[1])}, {_pp(one[2])}]" \
        in text


@pytest.fixture(scope="module")
def split_report(store: dict) -> str:
    return write_report("test_split", store["uri"], store["out"]).read_text()


def test_verdicts_use_the_test_split_and_say_so(store: dict, split_report: str) -> None:
    text = split_report
    test = [100 * (a - b) for a, b in zip(SPLIT_TEST["lrn"], SPLIT_TEST["none"], strict=True)]
    val = [100 * (a - b) for a, b in zip(SPLIT_VAL["lrn"], SPLIT_VAL["none"], strict=True)]
    assert np.mean(val) > 0 > np.mean(test)  # the splits disagree: the verdict shows which
    est, lo, hi = _interval(test)
    row = _row(text, "## Error deltas against the paper", "lrn")
    assert row["measured as"] == "top-1 test error (pp)"
    assert row["measured"] == f"{_pp(est)} pp" and row["verdict"] == "reproduced"
    assert "Errors compared: the held-out test split, scored once at the end of each run" \
        in text
    assert "top-1 test error, norm=lrn − norm=none" in text
    arm = _row(text, "## Results per arm", "norm=lrn")
    t = [100 * v for v in SPLIT_TEST["lrn"]]
    assert arm["top-1 test error (%)"] == f"{np.mean(t):.1f} ± {np.std(t, ddof=1):.1f}"
    assert "test − train gap (pp)" in arm
    # the summary mixes ablations with and without a test split: each row says which
    paper = store["paper"].read_text()
    assert "the held-out test split where every run of a comparison has it, else the " \
           "validation split" in paper
    assert _row(paper, "## Error deltas against the paper", "overlap_pool")["measured as"] == \
        "top-1 val error (pp)"


def test_ensemble_row(store: dict, split_report: str) -> None:
    text = split_report
    which, top1, top5 = ENSEMBLE["lrn"]
    diffs = [100 * (top1 - t) for t in SPLIT_TEST["lrn"]]  # ensemble − each single model
    est, lo, hi = _interval(diffs)
    row = _row(text, "## Error deltas against the paper", "ensemble")
    assert row["measured as"] == "top-1 test error (pp)" and row["n"] == "3"
    assert row["measured"] == f"{_pp(est)} pp" and row["95% interval"] == f"[{_pp(lo)}, {_pp(hi)}]"
    assert row["verdict"] == "reproduced" and row["paper"] == "−2.6 pp"
    est5 = np.mean([100 * (top5 - t / 3) for t in SPLIT_TEST["lrn"]])
    assert f"top-5 {_pp(est5)} pp" in text
    assert f"3 models averaged (the paper averaged 5); ensemble run " \
           f"`{store['ids'][('ensemble', 'lrn')]}`" in text
    # each arm's ensemble in its own table, the none arm's on the validation split
    ens = _row(text, "## Ensembles (Section 6, Table 2)", "norm=none")
    singles = [100 * v for v in SPLIT_VAL["none"]]
    assert ens["split"] == "validation" and ens["models"] == "3"
    assert ens["single models, top-1 error (%)"] == \
        f"{np.mean(singles):.1f} ± {np.std(singles, ddof=1):.1f}"
    assert ens["ensemble − single, top-1 (pp)"].startswith(
        f"{_pp(100 * ENSEMBLE['none'][1] - np.mean(singles))} [")
    assert _row(store["paper"].read_text(), "## Error deltas against the paper",
                "ensemble")["ablation"] == "`test_split`"


def test_tuned_and_untuned_runs_are_never_pooled(store: dict, tmp_path: Path) -> None:
    ids = store["ids"]
    # the tuned grid is newer but incomplete (1 of 3 seeds): the complete untuned one is used
    text = write_report("tuned_mix", store["uri"], tmp_path).read_text()
    est, lo, hi = _interval([-100 * g for g in UNTUNED_GAP])
    row = _row(text, "## Error deltas against the paper", "lrn")
    assert row["measured"] == f"{_pp(est)} pp" and row["n"] == "3"
    runs = _section(text, "## Runs")
    assert all(r in runs for r in ids[("tuned_mix", "untuned runs")])
    assert not any(r in runs for r in ids[("tuned_mix", "tuned runs")])
    other = _row(text, "### Other runs in the store, not used",
                 f"`{_grid_key(store, 'tuned_mix', 'tuned')}`")
    assert other["tuned"] == "yes"
    assert other["complete"] == "no (2 of 6 cells)" and other["seeds"] == "0"
    tuned = ids[("tuned_mix", "tuned")]
    assert other["report it with"] == f"`ablate report tuned_mix --grid {tuned}`"
    assert "| tuned " in text and "| no " in _section(text, "## What was run")
    # named with --grid: the tuned runs alone, never completed by untuned seeds 1 and 2
    text = write_report("tuned_mix", store["uri"], tmp_path,
                        grids=[ids[("tuned_mix", "tuned")]]).read_text()
    row = _row(text, "## Error deltas against the paper", "lrn")
    assert row["measured"] == f"{_pp(100 * (TUNED_SEED0['lrn'] - TUNED_SEED0['none']))} pp"
    assert row["verdict"] == "inconclusive (one seed)" and row["n"] == "1"
    head = _section(text, "## What was run")
    assert "named with --grid" in head and "also started" not in head


def test_runs_at_two_scales_are_never_pooled(store: dict, tmp_path: Path) -> None:
    ids = store["ids"]
    text = write_report("two_scales", store["uri"], tmp_path).read_text()  # the newer: quick
    row = _row(text, "## Error deltas against the paper", "lrn")
    assert row["measured"] == f"{_pp(100 * (QUICK['lrn'][0] - QUICK['none'][0]))} pp"
    assert row["n"] == "1"
    head = _section(text, "## What was run")
    seeds = _table_row(head, "seeds")[1]
    assert seeds == "0"  # seed 1 finished, but at the other scale: not "also started"
    assert "1024 training" in head and "2048" not in head
    assert "the most recent complete grid" in head
    other = _row(text, "### Other runs in the store, not used",
                 f"`{_grid_key(store, 'two_scales', 'full')}`")
    assert "2048 training" in other["scale"] and "width 0.25" in other["scale"]
    assert other["cell runs"] == "4 finished" and other["complete"] == "yes"
    assert not any(r in _section(text, "## Runs") for r in ids[("two_scales", "full runs")])
    text = write_report("two_scales", store["uri"], tmp_path,
                        grids=[ids[("two_scales", "full")]]).read_text()
    est, lo, hi = _interval([100 * (a - b) for a, b in zip(FULL["lrn"], FULL["none"],
                                                          strict=True)])
    row = _row(text, "## Error deltas against the paper", "lrn")
    assert row["measured"] == f"{_pp(est)} pp" and row["n"] == "2"
    assert "1024 training" in _section(text, "### Other runs in the store, not used")


def _grid_key(store: dict, experiment: str, which: str) -> str:
    from mlflow.tracking import MlflowClient

    run = MlflowClient(store["uri"]).get_run(store["ids"][(experiment, which)])
    return run.data.tags["ablate.grid_key"]


def test_grid_option_rejects_a_run_that_is_no_grid_of_it(store: dict, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from alexnet.cli import app

    ids = store["ids"]
    cli = CliRunner()
    args = ["report", "two_scales", "--out", str(tmp_path), "--tracking-uri", store["uri"]]
    for bad in (ids[("two_scales", "quick runs")][0], ids[("tuned_mix", "tuned")]):
        result = cli.invoke(app, [*args, "--grid", bad])
        assert result.exit_code == 2
        assert len(result.output.strip().splitlines()) == 1 and "--grid" in result.output
        assert not (tmp_path / "two_scales.md").exists()  # nothing half-written
    result = cli.invoke(app, [*args, "--grid", ids[("two_scales", "full")]])
    assert result.exit_code == 0 and (tmp_path / "two_scales.md").is_file()


def test_figures_exist_and_are_linked(store: dict) -> None:
    out = store["out"]
    for report, expected in ((store["relu"], 4), (store["paper"], 1)):
        links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())
        assert len(links) == expected
        for link in links:
            png = out / link
            assert not Path(link).is_absolute() and png.suffix == ".png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nothing_finished_yet(store: dict, tmp_path: Path) -> None:
    text = write_report("augmentation", store["uri"], tmp_path).read_text()
    missing = ("not measured: arm augmentation=on missing: no finished run (1 running); "
               "arm augmentation=off missing: never run")
    assert missing in text
    assert "augmentation=on, seed 0: in progress (RUNNING" in text
    assert "last heartbeat" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["augmentation/deltas.png"] and (tmp_path / links[0]).is_file()
    assert missing in store["paper"].read_text()


# --- the models at work: held-out predictions logged by each cell ---------------------------

CLASSES = ["cat", "dog", "ship"]
LABELS = np.repeat([0, 1, 2], 4)  # twelve held-out images, four per class
# (arm, seed) -> the class predicted for each image, and its probability
PREDICTED = {("on", 0): [0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2],
             ("on", 1): [0, 0, 0, 0, 1, 0, 1, 1, 2, 2, 2, 2],
             ("off", 0): [0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 2, 2],
             ("off", 1): [0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2]}
OFF_SEED0_CONFIDENCE = {5: 0.6, 6: 0.9, 7: 0.7, 8: 0.8}
# dropout on: final train / val error 20% / 30% per seed; off: 5% / 40% (the gap opens)
DROPOUT_FINAL = {"on": (0.30, 0.20, 2), "off": (0.40, 0.05, 1)}


def _at_work(text: str) -> str:
    """The "models at work" section, its sub-sections included."""
    return text.split("## The models at work", 1)[1].split("\n## ", 1)[0]


def _heldout_file(folder: Path, arm: str, seed: int) -> Path:
    """What ``serving.record`` logs: every image's prediction, and the wrong ones' pixels
    (image i is filled with the grey level 20·i, so a gallery shows which it took)."""
    predicted = np.array(PREDICTED[(arm, seed)], dtype=np.int32)
    confidence = np.full(len(LABELS), 0.5, np.float32)
    if (arm, seed) == ("off", 0):
        for i, p in OFF_SEED0_CONFIDENCE.items():
            confidence[i] = p
    wrong = np.flatnonzero(predicted != LABELS).astype(np.int32)
    images = np.stack([np.full((8, 8, 3), 20 * i, np.uint8) for i in wrong]) if len(wrong) \
        else np.zeros((0, 8, 8, 3), np.uint8)
    path = folder / f"{arm}{seed}" / "predictions.npz"
    path.parent.mkdir(parents=True)
    np.savez_compressed(path, split=np.array("test"), classes=np.array(CLASSES),
                        index=np.arange(len(LABELS), dtype=np.int32),
                        label=LABELS.astype(np.int32), predicted=predicted,
                        confidence=confidence, pool_size=np.array(len(LABELS)),
                        pool_index=wrong, pool_images=images)
    return path


@pytest.fixture(scope="module")
def at_work(store_root: Path) -> dict:
    """A dropout grid (on = reference, off; seeds 0 and 1) whose cells logged held-out
    predictions; dropout on, seed 1 is a reuse of a run in another experiment."""
    root = store_root / "at_work"
    (root / "mlruns").mkdir(parents=True)
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    c = store_mod.client(uri)
    exp_id = tracking.get_experiment_id(c, uri, "dropout")
    cells = [(_cell("dropout", "dropout", arm, seed, ["dropout"]), DROPOUT_FINAL[arm], None)
             for arm in ("on", "off") for seed in (0, 1)]
    _, run_ids = _grid(c, exp_id, cells)
    elsewhere = c.create_run(tracking.get_experiment_id(c, uri, "elsewhere")).info.run_id
    for (cell, _, _), run_id in zip(cells, run_ids, strict=True):
        arm, seed = cell.arms["dropout"], cell.seed
        holder = elsewhere if (arm, seed) == ("on", 1) else run_id
        c.log_artifact(holder, str(_heldout_file(root, arm, seed)), "heldout")
        if holder != run_id:
            tracking.set_tags(c, run_id, {"ablate.reused_from": elsewhere})
    out = root / "reports"
    return {"uri": uri, "out": out, "report": write_report("dropout", uri, out).read_text()}


def test_each_arm_is_compared_with_its_reference_on_the_logged_predictions(at_work):
    from alexnet.report import heldout, select_all
    from alexnet.report.load import load_runs

    runs = load_runs("dropout", at_work["uri"])
    used = select_all(runs)["dropout"].used
    held = heldout.load(at_work["uri"], used)
    assert len(held) == 4  # the reused run's predictions come from the run it reuses
    [c], notes = heldout.comparisons(used, runs.reference["dropout"], held, [])
    assert notes == [] and (c.reference, c.arm, c.seeds) == ("dropout=on", "dropout=off", [0, 1])
    np.testing.assert_array_equal(c.confusion_reference, [[8, 0, 0], [2, 6, 0], [0, 0, 8]])
    np.testing.assert_array_equal(c.confusion_arm, [[8, 0, 0], [6, 2, 0], [0, 1, 7]])
    assert c.error("reference") == pytest.approx(100 * 2 / 24)
    assert c.error("arm") == pytest.approx(100 * 7 / 24)
    assert c.disagree == pytest.approx(5 / 24)
    per = c.per_class().set_index("class")
    assert per.loc["dog"].tolist() == pytest.approx([25.0, 75.0, 50.0])  # (25+25)/2, (100+50)/2
    assert per.loc["ship"].tolist() == pytest.approx([0.0, 12.5, 12.5])
    assert per.loc["cat", "delta"] == 0
    # The gallery: seed 0, where only dropout off is wrong, its most confident mistake first,
    # each image from the run that kept it.
    assert [d.index for d in c.gallery] == [6, 8, 7, 5]
    assert [int(d.image[0, 0, 0]) for d in c.gallery] == [120, 160, 140, 100]
    assert (c.gallery[1].label, c.gallery[1].reference, c.gallery[1].arm) == (
        "ship", ("ship", 0.5), ("dog", pytest.approx(0.8)))


def test_the_report_shows_the_models_at_work(at_work):
    text, out = at_work["report"], at_work["out"]
    section = _at_work(text)
    assert ("On the 12 held-out test images, over seed(s) 0, 1: 29.2% error for dropout=off "
            "against 8.3% for dropout=on (the reference); the two label 20.8% of the images "
            "differently.") in section
    row = _table_row(section, "dog")
    assert row[1:] == ["25.0", "75.0", "+50.00"]
    assert section.index("| dog") < section.index("| ship") < section.index("| cat")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    stem = "dropout/dropout-off_vs_dropout-on"
    mine = [f"{stem}_confusion.png", f"{stem}_class_delta.png", f"{stem}_disagreements.png",
            "dropout/dropout_train_vs_val.png"]
    assert [link for link in links if link in mine] == mine
    for link in mine:
        assert (out / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Training against validation error" in text
    assert text.index("## The models at work") < text.index("## Figures")


def test_model_figures_draw_what_was_measured(at_work):
    from alexnet.report import heldout, model_figures, select_all
    from alexnet.report.load import HISTORY_KEYS, load_runs, metric_histories

    runs = load_runs("dropout", at_work["uri"])
    used = select_all(runs)["dropout"].used
    [c], _ = heldout.comparisons(used, runs.reference["dropout"],
                                 heldout.load(at_work["uri"], used), [])
    fig = model_figures.confusion_pair(c)
    left, right = fig.axes[:2]
    np.testing.assert_allclose(np.asarray(left.collections[0].get_array()).reshape(3, 3),
                               [[100, 0, 0], [25, 75, 0], [0, 0, 100]])
    np.testing.assert_allclose(np.asarray(right.collections[0].get_array()).reshape(3, 3),
                               [[100, 0, 0], [75, 25, 0], [0, 12.5, 87.5]])
    assert (left.get_xlabel(), left.get_ylabel()) == ("predicted class", "true class")
    assert [t.get_text() for t in left.get_yticklabels()] == CLASSES
    assert left.get_title() == "dropout=on (reference)\n8.3% error"
    bars = model_figures.class_delta(c).axes[0]
    assert [t.get_text() for t in bars.get_yticklabels()] == ["dog", "ship", "cat"]
    assert [p.get_width() for p in bars.patches] == pytest.approx([50, 12.5, 0])
    assert "percentage points" in bars.get_xlabel() and bars.get_ylabel() == "true class"
    gallery = model_figures.gallery(c)
    shown = [ax for ax in gallery.axes if ax.images]
    assert [ax.get_title() for ax in shown] == ["#6 true: dog", "#8 true: ship",
                                                "#7 true: dog", "#5 true: dog"]
    assert [t.get_text() for t in shown[1].texts] == ["on: ship 50%", "off: dog 80%"]
    history = metric_histories(at_work["uri"], used["run_id"], HISTORY_KEYS)
    curves = model_figures.overfitting(history, used, axis="dropout", arms=["on", "off"])
    on, off = curves.axes[:2]
    assert on.get_title() == "dropout=on: final gap 10.0 pp"
    assert off.get_title() == "dropout=off: final gap 35.0 pp"
    train, val = (line.get_ydata() for line in off.get_lines()[:2])
    assert train[-1] == pytest.approx(5.0) and val[-1] == pytest.approx(40.0)
    assert off.get_xlabel() == "epoch" and on.get_ylabel() == "top-1 error (%)"


def test_runs_without_logged_predictions_say_so_and_draw_nothing(store: dict) -> None:
    section = _at_work(store["relu"].read_text())
    assert "activation=tanh against activation=relu: no seed has held-out predictions" \
        in section
    assert "![" not in section
