"""`ablate sweep`: a study per arm, trials as MLflow runs nested under sweep runs, pruning,
continuing a study, two processes on one storage, --tuned, and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import typer
from optuna.trial import TrialState
from typer.testing import CliRunner

from alexnet import tracking
from alexnet.ablation import load_ablation
from alexnet.config import parse_set
from alexnet.errors import ConfigError
from alexnet.sweep import (
    SweepOptions,
    apply_tuned,
    best_of,
    claim_target,
    list_studies,
    resolve_store,
    run_sweep,
    select_arms,
    study_name,
)
from alexnet.sweep_cli import sweep

# Tiny trials: 256 training images, 2 epochs, about a second each on a CPU.
SHRINK = ["--set", "data.synthetic.train_size=256", "--set", "data.synthetic.val_size=128",
          "--set", "train.epochs=2"]
OVERRIDES = parse_set(SHRINK[1::2])


def _command() -> tuple[typer.Typer, list[str]]:
    """`ablate sweep` once cli.py registers it; until then the command on an app of its own."""
    from alexnet import cli

    if any((c.name or c.callback.__name__) == "sweep" for c in cli.app.registered_commands):
        return cli.app, ["sweep"]
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(sweep)
    return app, []


def invoke(*args: str):
    app, prefix = _command()
    return CliRunner().invoke(app, [*prefix, *args])


def studies(cwd: Path) -> dict[str, optuna.Study]:
    store = resolve_store(None, tracking.tracking_uri())
    assert Path(store.spec) == cwd / "mlruns" / "optuna.journal"
    storage = store.open(create=False)
    return {n: optuna.load_study(study_name=n, storage=storage)
            for n in optuna.get_all_study_names(storage)}


def states(study: optuna.Study) -> list[TrialState]:
    return [t.state for t in study.get_trials()]


def mlflow_runs(cwd: Path, experiment: str = "relu_vs_tanh"):
    c = tracking.client(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    exp = c.get_experiment_by_name(experiment)
    return c, c.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # ./mlruns (MLflow and the journal) is this test's own
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
    for s in found.values():  # the best values are kept on the study
        best = best_of(s)
        assert (s.user_attrs["best_lr"], s.user_attrs["best_weight_decay"],
                s.user_attrs["best_val_error"]) == (best.lr, best.weight_decay, best.val_error)

    c, runs = mlflow_runs(here)
    parents = {r.info.run_id: r for r in runs if r.data.tags.get("ablate.kind") == "sweep"}
    trials = [r for r in runs if r.data.tags.get("ablate.kind") == "trial"]
    assert len(parents) == 2 and len(trials) == 4 and len(runs) == 6
    assert {p.data.tags["study"] for p in parents.values()} == names
    for p in parents.values():
        assert p.info.status == "FINISHED"
        assert float(p.data.tags["best_lr"]) == found[p.data.tags["study"]].user_attrs["best_lr"]
    for r in trials:  # never mistaken for a grid's cell
        tags = r.data.tags
        assert tags["mlflow.parentRunId"] in parents and "cell_key" not in tags
        assert tags["study"] == parents[tags["mlflow.parentRunId"]].data.tags["study"]
        assert tags["state"] == "complete" and r.info.status == "FINISHED"
        assert float(r.data.params["optim.lr"]) == float(r.data.params["trial.lr"])
        assert r.data.params["model.activation"] == tags["axis.activation"]
        assert [m.step for m in c.get_metric_history(r.info.run_id, "val_error")] == [1, 2]
    assert not tracking.cell_runs(c, trials[0].info.experiment_id)

    again = invoke("relu_vs_tanh", "--quick", *SHRINK, "--trials", "2", "--pruner", "none")
    assert again.exit_code == 0, again.output
    found = studies(here)
    assert all(len(s.get_trials()) == 4 for s in found.values())  # exactly 2 more per arm
    assert len(mlflow_runs(here)[1]) == 10  # the same two sweep runs, 4 more trials

    shown = invoke("relu_vs_tanh", "--quick", *SHRINK, "--show")
    assert shown.exit_code == 0, shown.output
    assert "sweeps in" in shown.stdout and "* = the study these options sweep" in shown.stdout
    listed = list_studies(resolve_store(None, tracking.tracking_uri()), ["relu_vs_tanh"])
    assert {(s.study, s.complete, s.pruned) for s in listed} == {(n, 4, 0) for n in names}

    tuned = apply_tuned(cells, tracking.tracking_uri())
    for before, after in zip(cells, tuned, strict=True):
        best = best_of(found[study_name(before)])
        assert after.tuned == {"lr": best.lr, "weight_decay": best.weight_decay}
        assert (after.config.optim.lr, after.config.optim.weight_decay) == (
            best.lr, best.weight_decay)
        assert after.key != before.key and after.seed == before.seed
    other = load_ablation("relu_vs_tanh").cells(quick=True)  # other options: no sweep
    with pytest.raises(ConfigError, match=r"no sweep for arm activation=relu of relu_vs_tanh "
                                          r"\(study relu_vs_tanh/activation=relu/\w{10}.*--quick"):
        apply_tuned(other, tracking.tracking_uri())


def test_pruned_trials_show_as_pruned_in_optuna_and_mlflow(here):
    ab = load_ablation("relu_vs_tanh")
    arms = select_arms(ab.cells(quick=True, seeds=[0], overrides=OVERRIDES), ["tanh"])
    uri = tracking.tracking_uri()
    always = optuna.pruners.ThresholdPruner(upper=0.0)  # any error above 0 is pruned
    result = run_sweep(arms, uri, resolve_store(None, uri),
                       SweepOptions(trials=2, pruner=always), echo=lambda _: None)
    assert not result.failed_arms
    [summary] = result.summaries
    assert (summary.complete, summary.pruned, summary.best) == (0, 2, None)
    study = studies(here)[study_name(arms[0])]
    assert states(study) == [TrialState.PRUNED] * 2
    assert all(list(t.intermediate_values) == [1] for t in study.get_trials())

    c, runs = mlflow_runs(here)
    trials = [r for r in runs if r.data.tags.get("ablate.kind") == "trial"]
    assert len(trials) == 2
    for r in trials:  # KILLED, tagged, with the epoch it reached
        assert r.info.status == "KILLED" and r.data.tags["state"] == "pruned"
        assert [m.step for m in c.get_metric_history(r.info.run_id, "val_error")] == [1]
    with pytest.raises(ConfigError, match="has no finished trial"):
        apply_tuned(ab.cells(quick=True, overrides=OVERRIDES)[-1:], uri)


def test_a_sweep_started_with_another_joins_its_target_and_a_later_one_adds_its_own():
    study = optuna.create_study()
    t0 = time.time()
    assert claim_target(study, 4, started=t0) == 4  # the first process: 0 done + 4
    assert claim_target(study, 4, started=t0) == 4  # started together: the same 4
    for _ in range(4):
        study.tell(study.ask(), 0.5)
    assert claim_target(study, 4, started=t0) == 4  # started before the 4 ended: done
    assert claim_target(study, 2, started=time.time() + 1) == 6  # a later sweep: 2 more
    study.set_user_attr("sweep.heartbeat", 0)  # ... interrupted after none of them
    assert claim_target(study, 3, started=time.time() + 1) == 7  # the next: 4 done + 3


@pytest.mark.parametrize(("args", "message"), [
    (["relu_vs_tanh", "--arm", "sigmoid"],
     "--arm 'sigmoid': no such arm in relu_vs_tanh; allowed: activation=relu, activation=tanh"),
    (["relu_vs_tanh", "--lr-range", "0.1,0.001"], "--lr-range 0.1,0.001: LOW must be below HIGH"),
    (["relu_vs_tanh", "--wd-range", "0,1e-2"], "--wd-range 0,0.01: a log-uniform range needs"),
    (["relu_vs_tanh", "--lr-range", "fast"], "--lr-range 'fast': expected LOW,HIGH"),
    (["relu_vs_tanh", "--lr-range", "off"], "--lr-range 'off': expected LOW,HIGH, e.g."),
    (["relu_vs_tanh", "--pruner", "sometimes"], "--pruner 'sometimes': choose one of median"),
    (["relu_vs_tanh", "--storage", "postgresql://nohost/db"], "--storage postgresql://nohost/db"),
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


def _ablate_sweep(cwd: Path, *args: str) -> subprocess.Popen:
    app, prefix = _command()
    exe = ([str(Path(sys.executable).parent / "ablate"), "sweep"] if prefix
           else [sys.executable, "-m", "alexnet.sweep_cli"])
    return subprocess.Popen([*exe, *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"})


def test_an_rdb_storage_holds_the_studies_and_tuned_values_are_read_from_it(here):
    """--wd-range off: the learning rate alone, as relu_vs_tanh's no-regularization claim
    wants; the config's weight decay (0) is kept."""
    url = f"sqlite:///{here / 'optuna.db'}"
    result = invoke("relu_vs_tanh", "--quick", *SHRINK, "--arm", "activation=relu",
                    "--trials", "2", "--storage", url, "--wd-range", "off", "--pruner", "none")
    assert result.exit_code == 0, result.output
    assert not (here / "mlruns" / "optuna.journal").exists()
    [summary] = list_studies(resolve_store(url, tracking.tracking_uri()), ["relu_vs_tanh"])
    assert (summary.arm, summary.complete, summary.best.weight_decay) == ("activation=relu", 2, 0)
    study = optuna.load_study(study_name=summary.study, storage=url)
    assert all(set(t.params) == {"lr"} for t in study.get_trials())
    cells = load_ablation("relu_vs_tanh").cells(quick=True, overrides=OVERRIDES)
    relu = [c for c in cells if c.arms["activation"] == "relu"]
    [tuned] = {tuple(c.tuned.items()) for c in apply_tuned(relu, tracking.tracking_uri(), url)}
    assert dict(tuned) == {"lr": summary.best.lr, "weight_decay": 0.0}


def _ablate_sweep(cwd: Path, *args: str) -> subprocess.Popen:
    _, prefix = _command()
    exe = ([str(Path(sys.executable).parent / "ablate"), "sweep"] if prefix
           else [sys.executable, "-m", "alexnet.sweep_cli"])
    return subprocess.Popen([*exe, *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_two_processes_on_one_storage_complete_the_requested_total_between_them(here):
    """One with two worker processes (--jobs 2), one with one: three workers, one study."""
    args = ["relu_vs_tanh", "--quick", *SHRINK, "--arm", "tanh", "--trials", "6",
            "--pruner", "none"]
    procs = [_ablate_sweep(here, *args, "--jobs", "2"), _ablate_sweep(here, *args)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out + err
        for bad in ("Traceback", "OperationalError", "database is locked", "rror"):
            assert bad not in err, err
    [study] = studies(here).values()
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(6))  # no more, no duplicates
    assert all(t.state == TrialState.COMPLETE for t in trials)
    _, runs = mlflow_runs(here)
    kinds = [r.data.tags.get("ablate.kind") for r in runs]
    assert kinds.count("sweep") == 1 and kinds.count("trial") == 6
    numbers = sorted(int(r.data.tags["trial_number"]) for r in runs
                     if r.data.tags.get("ablate.kind") == "trial")
    assert numbers == list(range(6))
