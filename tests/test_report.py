"""`ablate report` on a store with known numbers, logged through the project's own
tracking code (no training). One SQLite store is shared by the module: creating an MLflow
database runs its migrations, which costs seconds."""

from __future__ import annotations

import dataclasses
import math
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from alexnet import tracking
from alexnet.ablation import Cell
from alexnet.claims import CLAIMS
from alexnet.config import build_config
from alexnet.errors import StoreError
from alexnet.report import write_report
from alexnet.report.markdown import problem_lines
from alexnet.report.stats import (
    Interval,
    arm_table,
    evaluate_claim,
    pick_runs,
    problem_runs,
    ratio_interval,
    t_interval,
    verdict,
)

EPOCHS = 4
# Config keys that make each arm a different run config (axes without one share it).
ARM_KEYS = {"activation": "model.activation", "norm": "model.norm", "pool": "model.pool",
            "dropout": None, "pca_lighting": "data.pca_lighting", "towers": None,
            "augmentation": "data.flip"}

# ablation -> (claims, {arm: {seed: (final val error, final train error, epochs to 25%)}})
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
}
TUNED_LR = {"relu": 0.05, "tanh": 0.02}  # relu_vs_tanh runs are tuned


def _history(final_val: float, final_train: float, ett: int | None) -> list:
    from alexnet.results import EpochMetrics

    if ett is None:
        train = np.linspace(0.6, final_train, EPOCHS)
    else:  # above 25% before epoch ett, at or below it from then on
        train = [0.6 - 0.05 * e if e < ett else 0.25 - (0.25 - final_train) * (e - ett) /
                 max(1, EPOCHS - ett) for e in range(1, EPOCHS + 1)]
    val = np.linspace(0.7, final_val, EPOCHS)
    return [EpochMetrics(e, 1.0, float(train[e - 1]), 1.0, float(val[e - 1]),
                         float(val[e - 1]) / 3, 0.01, 2.0 + 0.1 * e, 100.0)
            for e in range(1, EPOCHS + 1)]


def _cell(ablation: str, axis: str, arm: str, seed: int, claims: list[str]) -> Cell:
    # the store's data size is pinned here, so the header test does not follow the profile
    overrides: dict[str, object] = {"seed": seed, "data.synthetic.train_size": 1024}
    key = ARM_KEYS.get(axis)
    if key:
        overrides[key] = {"on": True, "off": False}.get(arm, arm)
    tuned = {}
    if ablation == "relu_vs_tanh":
        tuned = {"optim.lr": TUNED_LR[arm], "optim.weight_decay": 0.0}
        overrides.update(tuned)
    cfg = build_config("quick", overrides)
    return Cell(ablation, {axis: arm}, seed, cfg, tuple(claims), tuned)


def _log(c, exp_id: str, cell: Cell, final: tuple | None, status: str = "finished") -> str:
    from alexnet.results import RunResult

    run_id = tracking.start_cell_run(c, exp_id, cell, parent_run_id=None)
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
    tracking.end_cell_run(c, run_id, RunResult("finished", hist, epochs_to_target=ett,
                                               train_seconds=10.0))
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("store")
    (root / "mlruns").mkdir()
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    c = tracking.client(uri)
    ids: dict[object, str] = {}
    exp_ids: dict[str, str] = {}
    for ablation, (claims, axis, arms) in STORE.items():
        exp_id = exp_ids[ablation] = tracking.get_experiment_id(c, uri, ablation)
        parent = c.create_run(exp_id, tags={"ablate.kind": "grid", "ablation": ablation})
        for arm, seeds in arms.items():
            for seed, final in seeds.items():
                cell = _cell(ablation, axis, arm, seed, claims)
                ids[(ablation, arm, seed)] = _log(c, exp_id, cell, final)
        c.set_terminated(parent.info.run_id)
        ids[(ablation, "grid")] = parent.info.run_id
    exp_id = exp_ids["relu_vs_tanh"]
    ids["failed"] = _log(c, exp_id, _cell("relu_vs_tanh", "activation", "tanh", 3,
                                          ["relu_speed"]), None, "diverged")
    ids["running"] = _log(c, exp_id, _cell("relu_vs_tanh", "activation", "relu", 3,
                                           ["relu_speed"]), None, "running")
    # an ablation whose only run is still going
    exp_ids["augmentation"] = tracking.get_experiment_id(c, uri, "augmentation")
    _log(c, exp_ids["augmentation"], _cell("augmentation", "augmentation", "on", 0,
                                           ["augmentation"]), None, "running")
    out = root / "reports"
    started = time.perf_counter()
    relu = write_report("relu_vs_tanh", uri, out)
    seconds = time.perf_counter() - started
    return {"uri": uri, "ids": ids, "exp_ids": exp_ids, "out": out, "relu": relu,
            "seconds": seconds, "paper": write_report("paper", uri, out)}


def _section(text: str, heading: str) -> str:
    return text.split(heading, 1)[1].split("\n## ", 1)[0]


def _table_row(text: str, first_cell: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starting with {first_cell!r}")


def _header(text: str, heading: str) -> list[str]:
    section = _section(text, heading)
    first = next(line for line in section.splitlines() if line.startswith("|"))
    return [c.strip() for c in first.strip().strip("|").split("|")]


# --- the statistics on their own ------------------------------------------------------------


def test_t_interval_matches_scipy() -> None:
    diffs = np.array([-3.0, -4.0, -2.5, -3.5])
    iv = t_interval(diffs)
    lo, hi = sps.t.interval(0.95, len(diffs) - 1, loc=diffs.mean(), scale=sps.sem(diffs))
    assert (iv.estimate, iv.n) == (pytest.approx(-3.25), 4)
    assert (iv.low, iv.high) == (pytest.approx(lo), pytest.approx(hi))
    one = t_interval([1.5])
    assert one.n == 1 and not one.has_interval and math.isnan(one.low)


def test_ratio_interval_is_a_t_interval_on_log_ratios() -> None:
    tanh, relu = np.array([12.0, 10.0, 15.0]), np.array([3.0, 4.0, 3.0])
    logs = np.log(tanh / relu)
    lo, hi = sps.t.interval(0.95, 2, loc=logs.mean(), scale=sps.sem(logs))
    iv = ratio_interval(tanh, relu)
    assert iv.estimate == pytest.approx(math.exp(logs.mean()))
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
            "start_time": pd.Timestamp("2024-01-01"), "final_train_error": 0.1}
    df = pd.DataFrame([{**base, **r} for r in rows])
    df["run_id"] = [f"r{i}" for i in range(len(df))]
    df["start_time"] = df["start_time"] + pd.to_timedelta(range(len(df)), unit="s")
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
    used, _ = pick_runs(df)
    claim = dataclasses.replace(CLAIMS["lrn"], axis="activation", arm="relu", baseline="tanh")
    r = evaluate_claim(claim, used, df, {"activation": "relu", "norm": "lrn"})
    assert r.held == {"norm": "lrn"}
    assert r.interval.estimate == pytest.approx(-4.0)  # not the +6 pp of norm=none
    assert r.verdict == "reproduced"


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
    # censored in the arm instead: the estimate is an upper bound and cannot reproduce
    flipped = df.assign(**{"axis.activation": df["axis.activation"].map(
        {"relu": "tanh", "tanh": "relu"})})
    r2 = evaluate_claim(CLAIMS["relu_speed"], flipped, flipped, {"activation": "relu"})
    assert r2.bound == "upper" and r2.verdict in ("contradicted", "inconclusive (censored)")


def test_pick_runs_prefers_tuned_then_latest_and_says_so() -> None:
    df = _frame([
        {"arm": "a", "seed": 0, "final_val_error": 0.5},
        {"arm": "a", "seed": 0, "final_val_error": 0.4, "tuned": True},
        {"arm": "a", "seed": 0, "final_val_error": 0.6},  # later, but untuned
        {"arm": "a", "seed": 1, "final_val_error": 0.3, "status": "FAILED"},
    ])
    used, notes = pick_runs(df)
    assert used["final_val_error"].tolist() == [0.4]
    assert notes and "superseded" in notes[0]
    table = arm_table(used, df)
    assert table.loc[0, "failed"] == 1 and bool(table.loc[0, "tuned"])


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
    section = _section(text, "## Results per arm")
    header = _header(text, "## Results per arm")
    relu = dict(zip(header, _table_row(section, "activation=relu (tuned)"), strict=True))
    vals = [100 * v for v, _, _ in STORE["relu_vs_tanh"][2]["relu"].values()]
    assert relu["top-1 error (%)"] == f"{np.mean(vals):.1f} ± {np.std(vals, ddof=1):.1f}"
    train = [100 * t for _, t, _ in STORE["relu_vs_tanh"][2]["relu"].values()]
    assert relu["train error (%)"] == f"{np.mean(train):.1f} ± {np.std(train, ddof=1):.1f}"
    gap = np.subtract(vals, train)
    assert relu["val − train gap (pp)"] == f"{gap.mean():.1f} ± {gap.std(ddof=1):.1f}"
    assert relu["epochs to 25% train error"] == f"{np.mean([1, 2, 1]):.1f} ± " \
                                                f"{np.std([1, 2, 1], ddof=1):.1f}"
    assert relu["seeds"] == "3" and relu["lr"] == "0.05" and relu["weight decay"] == "0"
    assert relu["time/epoch (s)"] == "2.25 ± 0.00"  # every run: mean of 2.1 .. 2.4
    assert relu["in progress"] == "1" and relu["failed"] == "0"
    tanh = dict(zip(header, _table_row(section, "activation=tanh (tuned)"), strict=True))
    assert tanh["epochs to 25% train error"] == "4.0 ± 0.0 (2 of 3; 1 never)"
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
                     "cpu",
                     f"(id {store['exp_ids']['relu_vs_tanh']})",
                     store["ids"][("relu_vs_tanh", "grid")], store["uri"],
                     "63.0 s"):  # 6 x 10 s + 3 s of the diverged run + 0 of the running one
        assert expected in head, expected
    commit = tracking.git_commit()
    if commit:
        assert commit in head
    assert "> **Scale.** These runs: synthetic images" in text


def test_relu_speed_ratio_by_hand(store: dict) -> None:
    # tanh seed 2 never reached 25% in 4 epochs: its pair enters as 4 / 1, a lower bound
    ratios = np.array([4 / 1, 4 / 2, 4 / 1])
    logs = np.log(ratios)
    lo, hi = np.exp(sps.t.interval(0.95, 2, loc=logs.mean(), scale=sps.sem(logs)))
    est = math.exp(logs.mean())
    row = _table_row(store["relu"].read_text(), "relu_speed")
    assert f"≥ {est:.2f}×" in row and f"[{lo:.2f}, {hi:.2f}]" in row
    assert "reproduced" in row and "6×" in row
    text = store["relu"].read_text()
    assert re.search(rf"\*\*Claim relu_speed\*\* .*: reproduced at this scale \(activation="
                     rf"relu reached 25% training error at least {est:.2f}× "
                     rf"\[{lo:.2f}, {hi:.2f}\] faster", text)
    assert "activation=tanh never reached 25% training error in 1 of 3 seed(s)" in text


def test_paired_delta_and_verdicts_in_the_paper_table(store: dict) -> None:
    text = store["paper"].read_text()
    header = _header(text, "## Error deltas against the paper")
    rows = {c: dict(zip(header, _table_row(text, c), strict=True)) for c in CLAIMS}

    lrn, none = STORE["normalization"][2]["lrn"], STORE["normalization"][2]["none"]
    diffs = np.array([100 * (lrn[s][0] - none[s][0]) for s in (0, 1, 2)])
    lo, hi = sps.t.interval(0.95, 2, loc=diffs.mean(), scale=sps.sem(diffs))
    fmt = lambda v: f"{v:+.2f}".replace("-", "−")  # noqa: E731
    assert rows["lrn"]["measured"] == f"{fmt(diffs.mean())} pp"
    assert rows["lrn"]["95% interval"] == f"[{fmt(lo)}, {fmt(hi)}]"
    assert rows["lrn"]["verdict"] == "reproduced" and rows["lrn"]["paired seeds"] == "3"
    assert rows["lrn"]["paper"] == "−1.4 pp" and rows["lrn"]["Mishkin et al. 2016"] == "+0.1 pp"
    assert rows["overlap_pool"]["verdict"] == "contradicted"
    assert rows["pca_lighting"]["verdict"] == "inconclusive"
    assert rows["relu_speed"]["verdict"] == "reproduced"
    assert rows["dropout"]["verdict"] == "inconclusive (one seed)"
    assert rows["dropout"]["95% interval"] == "none (one seed)"
    assert rows["two_towers"]["verdict"] == "not measured: arm towers=one missing: never run"
    assert rows["ensemble"]["verdict"].startswith("not measured: no ablation in the store")
    assert rows["lrn"]["ablation"] == "`normalization`"
    # one summary across experiments: each ablation listed once, with its claims
    store_table = _section(text, "## Ablations in the store")
    for name in STORE:
        assert f"`{name}`" in store_table
    assert "**Claim dropout** (§4.2): inconclusive (one seed) at this scale" in text
    assert "one seed, so no interval" in text


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


def test_a_failure_fixed_by_a_rerun_says_so() -> None:
    df = _frame([{"arm": "a", "seed": 0, "status": "FAILED", "final_val_error": math.nan,
                  "failure_reason": "out of memory"},
                 {"arm": "a", "seed": 0, "final_val_error": 0.4}])
    (line,) = problem_lines(problem_runs(df))
    assert "failed (FAILED, run `r0`): out of memory (a later run" in line
