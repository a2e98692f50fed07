"""`ablate sweep`: a study per arm, trials as MLflow runs nested under sweep runs (each trial
one `execute_cell`, as a grid's cell), pruning, continuing a study, exact totals across
processes, a killed trial failed by Optuna's heartbeat and retried, --tuned, and one-line
errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from alexnet import store, tracking
from alexnet.ablation import load_ablation, select_arms
from alexnet.cli import app
from alexnet.config import parse_set
from alexnet.errors import ConfigError
from alexnet.executors import InProcess
from alexnet.sweep import SweepOptions, run_sweep, target_for
from alexnet.tuned import apply_tuned, best_of, list_studies, study_name

ABLATE = str(Path(sys.executable).parent / "ablate")
# Tiny trials: 256 training images, 2 epochs, about a second each on a CPU.
SHRINK = ["--set", "data.synthetic.train_size=256", "--set", "data.synthetic.val_size=128",
          "--set", "train.epochs=2"]
OVERRIDES = parse_set(SHRINK[1::2])


def invoke(*args: str):
    return CliRunner().invoke(app, ["sweep", *args])


def spec() -> str:
    return store.storage_spec(None, store.tracking_uri())


def studies(cwd: Path) -> dict[str, optuna.Study]:
    assert spec() == f"sqlite:///{cwd / 'mlruns' / 'optuna.db'}"
    storage = store.open_storage(spec(), create=False)
    return {n: optuna.load_study(study_name=n, storage=storage)
            for n in optuna.get_all_study_names(storage)}


def states(study: optuna.Study) -> list[TrialState]:
    return [t.state for t in study.get_trials()]


def mlflow_runs(cwd: Path, experiment: str = "relu_vs_tanh"):
    c = store.client(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    exp = c.get_experiment_by_name(experiment)
    return c, c.search_runs([exp.experiment_id], max_results=1000)


def kinds(runs, kind):
    return [r for r in runs if r.data.tags.get("ablate.kind") == kind]


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # ./mlruns (MLflow and the studies) is this test's own
    return tmp_path


def test_sweep_tunes_each_arm_in_its_own_study_logs_nested_trials_and_continues(here):
    first = invoke("relu_vs_tanh", "--quick", *SHRINK, "--trials", "2", "--pruner", "none")
    assert first.exit_code == 0, first.output
    cells = load_ablation("relu_vs_tanh").cells(quick=True, overrides=OVERRIDES)
    names = {study_name(c) for c in cells}
    seed0 = {c.arm_label: c.config.key()[:10] for c in cells if c.seed == 0}
    assert names == {f"relu_vs_tanh/{arm}/{key}" for arm, key in seed0.items()}
    found = studies(here)
    assert set(found) == names
    assert all(states(s) == [TrialState.COMPLETE] * 2 for s in found.values())

    c, runs = mlflow_runs(here)
    parents = {r.info.run_id: r for r in kinds(runs, "sweep")}
    trials = kinds(runs, "trial")
    assert len(parents) == 2 and len(trials) == 4 and len(runs) == 6
    assert {p.data.tags["study"] for p in parents.values()} == names
    assert all(p.info.status == "FINISHED" for p in parents.values())
    for r in trials:  # a cell's run in all but its kind: never mistaken for a grid's cell
        tags = r.data.tags
        assert tags["mlflow.parentRunId"] in parents and "cell_key" not in tags
        assert tags["study"] == parents[tags["mlflow.parentRunId"]].data.tags["study"]
        assert r.info.status == "FINISHED"
        study = found[tags["study"]]
        [trial] = [t for t in study.get_trials() if t.number == int(tags["trial_number"])]
        assert float(r.data.params["optim.lr"]) == trial.params["lr"]
        assert r.data.params["model.activation"] == tags["axis.activation"]
        assert [m.step for m in c.get_metric_history(r.info.run_id, "val_error")] == [1, 2]
        assert r.data.metrics["final_val_error"] == trial.value
        assert "test_error" not in r.data.metrics  # sweeps never see a test split
    assert not tracking.cell_runs(c, [trials[0].info.experiment_id])

    again = invoke("relu_vs_tanh", "--quick", *SHRINK, "--trials", "2", "--pruner", "none")
    assert again.exit_code == 0, again.output
    found = studies(here)
    assert all(len(s.get_trials()) == 4 for s in found.values())  # exactly 2 more per arm
    assert len(mlflow_runs(here)[1]) == 10  # the same two sweep runs, 4 more trials

    shown = invoke("relu_vs_tanh", "--quick", *SHRINK, "--show")
    assert shown.exit_code == 0, shown.output
    assert "sweeps in" in shown.stdout and "* = the study these options sweep" in shown.stdout
    listed = list_studies(spec(), ["relu_vs_tanh"])
    assert {(s.study, s.complete, s.pruned) for s in listed} == {(n, 4, 0) for n in names}

    tuned = apply_tuned(cells, spec())
    for before, after in zip(cells, tuned, strict=True):
        best = best_of(found[study_name(before)])
        assert best.trial == found[study_name(before)].best_trial.number
        assert after.tuned == {"lr": best.lr, "weight_decay": best.weight_decay}
        assert (after.config.optim.lr, after.config.optim.weight_decay) == (
            best.lr, best.weight_decay)
        assert after.key != before.key and after.seed == before.seed
    other = load_ablation("relu_vs_tanh").cells(quick=True)  # other options: no sweep
    with pytest.raises(ConfigError, match=r"no sweep for arm activation=relu of relu_vs_tanh: "
                                          r"study relu_vs_tanh/activation=relu/\w{10} does not "
                                          r"exist.*`ablate sweep relu_vs_tanh --quick`"):
        apply_tuned(other, spec())


def test_pruned_trials_show_as_pruned_in_optuna_and_mlflow(here):
    ab = load_ablation("relu_vs_tanh")
    arms = select_arms(ab.cells(quick=True, seeds=[0], overrides=OVERRIDES), ["tanh"])
    uri = store.tracking_uri()
    always = optuna.pruners.ThresholdPruner(upper=0.0)  # any error above 0 is pruned
    summaries, short = run_sweep(arms, uri, spec(), SweepOptions(trials=2, pruner=always),
                                 InProcess(), started=time.time(), tags={},
                                 on_event=lambda e: None)
    assert not short
    [summary] = summaries
    assert (summary.complete, summary.pruned, summary.best) == (0, 2, None)
    study = studies(here)[study_name(arms[0])]
    assert states(study) == [TrialState.PRUNED] * 2
    assert all(list(t.intermediate_values) == [1] for t in study.get_trials())

    c, runs = mlflow_runs(here)
    trials = kinds(runs, "trial")
    assert len(trials) == 2
    for r in trials:  # KILLED, with why, and the epoch it reached
        assert r.info.status == "KILLED"
        assert r.data.tags["failure_reason"].startswith("pruned at epoch 1")
        assert [m.step for m in c.get_metric_history(r.info.run_id, "val_error")] == [1]
    with pytest.raises(ConfigError, match="has no finished trial"):
        apply_tuned(ab.cells(quick=True, overrides=OVERRIDES)[-1:], spec())


def test_a_sweep_started_with_another_joins_its_target_and_a_later_one_adds_its_own():
    study = optuna.create_study()
    t0 = time.time()
    assert target_for(study, 4, started=t0) == 4  # the first process: 0 done + 4
    running = study.ask()
    assert target_for(study, 4, started=t0) == 4  # one in progress: join it
    study.tell(running, 0.5)
    for _ in range(3):
        study.tell(study.ask(), 0.5)
    assert target_for(study, 4, started=t0) == 4  # started before the 4 ended: done
    assert target_for(study, 2, started=time.time() + 1) == 6  # a later sweep: 2 more


@pytest.mark.parametrize(("args", "message"), [
    (["relu_vs_tanh", "--arm", "sigmoid"],
     "--arm 'sigmoid': no such arm in relu_vs_tanh; allowed: activation=relu, activation=tanh"),
    (["relu_vs_tanh", "--lr-range", "0.1,0.001"], "--lr-range 0.1,0.001: LOW must be below HIGH"),
    (["relu_vs_tanh", "--wd-range", "0,1e-2"], "--wd-range 0,0.01: a log-uniform range needs"),
    (["relu_vs_tanh", "--lr-range", "fast"], "--lr-range 'fast': expected LOW,HIGH"),
    (["relu_vs_tanh", "--lr-range", "off"], "--lr-range 'off': expected LOW,HIGH, e.g."),
    (["relu_vs_tanh", "--pruner", "sometimes"], "--pruner 'sometimes': choose one of median"),
    (["relu_vs_tanh", "--storage", "postgresql://nohost/db"], "--storage postgresql"),
    (["relu_vs_tanh", "--storage", "mysql://nohost/db"], "driver (pymysql) is not installed"),
    (["relu_vs_tanh", "--storage", "sqlite:///no/such/folder/optuna.db"],
     "folder no/such/folder does not exist"),
    (["relu_vs_tanh", "--storage", "no/such/folder/optuna.journal"], "does not exist"),
    (["relu_vs_tanh", "--trials", "0"], "--trials 0: give at least 1"),
    (["relu_vs_tnah"], "unknown ablation 'relu_vs_tnah'; did you mean 'relu_vs_tanh'?"),
])
def test_bad_input_is_one_line_and_exit_2_with_nothing_logged(here, args, message):
    result = invoke(*args, "--quick", *SHRINK)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.output
    assert not (here / "mlruns").exists()


def test_a_corrupt_journal_is_one_line(here):
    journal = here / "studies.journal"
    journal.write_bytes(b"\x00\xffnot a journal\n{{{\n")
    result = invoke("relu_vs_tanh", "--quick", "--storage", str(journal), "--show")
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert str(journal) in line and "move it aside" in line


def test_an_rdb_storage_holds_the_studies_and_tuned_values_are_read_from_it(here):
    """--wd-range off: the learning rate alone, as relu_vs_tanh's no-regularization claim
    wants; the config's weight decay (0) is kept."""
    url = f"sqlite:///{here / 'elsewhere.db'}"
    result = invoke("relu_vs_tanh", "--quick", *SHRINK, "--arm", "activation=relu",
                    "--trials", "2", "--storage", url, "--wd-range", "off", "--pruner", "none")
    assert result.exit_code == 0, result.output
    assert not (here / "mlruns" / "optuna.db").exists()
    [summary] = list_studies(url, ["relu_vs_tanh"])
    assert (summary.arm, summary.complete, summary.best.weight_decay) == ("activation=relu", 2, 0)
    study = optuna.load_study(study_name=summary.study, storage=url)
    assert all(set(t.params) == {"lr"} for t in study.get_trials())
    cells = load_ablation("relu_vs_tanh").cells(quick=True, overrides=OVERRIDES)
    relu = [c for c in cells if c.arms["activation"] == "relu"]
    [tuned] = {tuple(c.tuned.items()) for c in apply_tuned(relu, url)}
    assert dict(tuned) == {"lr": summary.best.lr, "weight_decay": 0.0}


def _ablate_sweep(cwd: Path, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([ABLATE, "sweep", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1", **env})


@pytest.mark.slow
def test_two_processes_on_one_storage_complete_the_requested_total_between_them(here):
    """One with two worker processes (--jobs 2), one with one: three workers, one study."""
    args = ["relu_vs_tanh", "--quick", *SHRINK, "--arm", "tanh", "--trials", "6",
            "--pruner", "none"]
    procs = [_ablate_sweep(here, *args, "--jobs", "2"), _ablate_sweep(here, *args)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out + err
        for bad in ("Traceback", "OperationalError", "database is locked", "rror"):
            assert bad not in err, err
    [study] = studies(here).values()
    trials = study.get_trials()
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.number for t in done) == sorted({t.number for t in done})  # no duplicates
    assert len(done) == 6  # no more, no fewer
    # A trial numbered past the target (two workers asking at one instant) is never run.
    assert all(t.user_attrs.get("surplus") for t in trials if t not in done)
    _, runs = mlflow_runs(here)
    assert len(kinds(runs, "sweep")) == 1 and len(kinds(runs, "trial")) == 6


@pytest.mark.slow
def test_a_killed_trial_is_failed_by_the_heartbeat_and_retried(here):
    """SIGKILL the sweep mid-trial: that trial stays RUNNING until Optuna's heartbeat says
    its process is gone; the next sweep fails it, retries it, and adds exactly N."""
    fast = {"ALEXNET_HEARTBEAT_SECONDS": "1"}  # stale after 4 s
    args = ["relu_vs_tanh", "--quick", "--set", "data.synthetic.train_size=1024",
            "--set", "train.epochs=6", "--arm", "tanh", "--pruner", "none"]
    proc = _ablate_sweep(here, *args, "--trials", "3", **fast)
    deadline = time.time() + 180
    while time.time() < deadline:
        if (here / "mlruns" / "optuna.db").exists():
            found = studies(here)
            if found and any(t.state == TrialState.RUNNING and t.intermediate_values
                             for t in next(iter(found.values())).get_trials()):
                break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    [study] = studies(here).values()
    killed = [t.number for t in study.get_trials() if t.state == TrialState.RUNNING]
    assert len(killed) == 1
    before = len([t for t in study.get_trials() if t.state == TrialState.COMPLETE])
    time.sleep(5)  # the killed trial's heartbeat goes stale
    again = _ablate_sweep(here, *args, "--trials", "1", **fast)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, out + err
    [study] = studies(here).values()
    by_number = {t.number: t for t in study.get_trials()}
    assert by_number[killed[0]].state == TrialState.FAIL
    retries = [t for t in by_number.values() if t.system_attrs.get("failed_trial") == killed[0]]
    assert [t.state for t in retries] == [TrialState.COMPLETE]  # retried with its params
    assert retries[0].params == by_number[killed[0]].params
    done = [t for t in by_number.values() if t.state == TrialState.COMPLETE]
    assert len(done) == before + 1  # exactly N more: the retry was the one trial asked for
    _, runs = mlflow_runs(here)
    assert not [r for r in runs if r.info.status == "RUNNING"]  # the killed one closed
