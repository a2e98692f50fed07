"""Past one machine: grids and sweeps on a Ray cluster, the runs in an MLflow tracking server
on PostgreSQL, the studies in the same PostgreSQL.

The `cluster` tests use real parts, all on this machine: a throwaway PostgreSQL server, `ablate
server` on it, and a Ray cluster of two nodes (`ray start --head` and a second `ray start
--address`). They take a few minutes: `pytest -m cluster` runs them (.ci/run does). The rest
check the options' bad input, which needs none of that.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from cluster_fixtures import (
    BIN,
    cluster_env,
    end_session,
    free_port,
    postgres_server,
    ray_cluster,
    tracking_server,
    wait_for,
)
from typer.testing import CliRunner

from alexnet import cluster
from alexnet.ablation import load_ablation
from alexnet.cli import app

ABLATE = str(BIN / "ablate")

# Longer cells than --quick's (which stop at 25% training error after two epochs), so that a
# node can be killed in the middle of one.
LONG = """\
name: {name}
title: cells long enough to kill a node in the middle of one
claims: [relu_speed]
base:
  profile: quick
  set:
    model.name: convnet4
    data.synthetic.train_size: 1024
    data.synthetic.val_size: 128
    train.epochs: {epochs}
axes:
  activation:
    relu: {{model.activation: relu}}
    tanh: {{model.activation: tanh}}
reference: {{activation: relu}}
seeds: [0, 1]
"""


def start(cwd: Path, *args: str) -> subprocess.Popen:
    """`ablate ARGS` in a session of its own (so that whatever it leaves running can be
    ended with it), its output in cwd/ablate-<pid>.log."""
    cwd.mkdir(parents=True, exist_ok=True)
    log = open(cwd / f"ablate-{time.monotonic_ns()}.log", "w+")  # noqa: SIM115 - read later
    proc = subprocess.Popen([ABLATE, *args], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                            env=cluster_env(), text=True, start_new_session=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    try:
        proc.wait(timeout)
    finally:
        end_session(proc, grace=5)  # the local Ray cluster a driver started, if any
    proc.log.seek(0)  # type: ignore[attr-defined]
    return proc.returncode, proc.log.read()  # type: ignore[attr-defined]


def ablate(cwd: Path, *args: str, timeout: float = 600) -> tuple[int, str]:
    return finish(start(cwd, *args), timeout)


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def runs_of(uri: str, experiment: str, kind: str = "cell") -> list:
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], max_results=1000,
                         filter_string=f"tags.`ablate.kind` = '{kind}'")


def assert_each_cell_finished_once(uri: str, experiment: str, cells: int) -> list:
    runs = runs_of(uri, experiment)
    per_cell = Counter(r.data.tags["cell_key"] for r in runs)
    assert len(per_cell) == cells and set(per_cell.values()) == {1}, per_cell
    assert {r.info.status for r in runs} == {"FINISHED"}
    grids = [r.info.status for r in runs_of(uri, experiment, kind="grid")]
    assert "FINISHED" in grids and "RUNNING" not in grids  # an interrupted one is KILLED
    return runs


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """PostgreSQL with a database for MLflow and one for Optuna, `ablate server` on the first,
    and a two-node Ray cluster; torn down after this module's tests."""
    folder = tmp_path_factory.mktemp("stack")
    with postgres_server() as pg:
        backend, optuna_url = pg.create_database("mlflow"), pg.create_database("optuna")
        with tracking_server(backend, folder) as server, ray_cluster() as ray:
            yield {"uri": server.uri, "artifacts": server.artifacts, "optuna": optuna_url,
                   "ray": ray}


# --- on the cluster --------------------------------------------------------------------------


@pytest.mark.cluster
def test_a_grid_on_two_nodes_trains_each_cell_once_with_a_second_shell_at_the_same_time(
        stack, tmp_path):
    uri, address = stack["uri"], stack["ray"].address
    args = ("run", "relu_vs_tanh", "--quick", "--executor", "ray", "--ray-address", address,
            "--tracking-uri", uri)
    shells = [start(tmp_path / "a", *args), start(tmp_path / "b", *args)]
    for shell in shells:
        code, out = finish(shell)
        assert code == 0, out[-3000:]
    cells = load_ablation("relu_vs_tanh").cells(quick=True)
    runs = assert_each_cell_finished_once(uri, "relu_vs_tanh", len(cells))
    # Artifacts went through the server to its destination, not to the submitting machine:
    # every cell's weights are there, no checkpoint to resume from is left, no ./mlruns.
    artifacts = stack["artifacts"]
    for run in runs:
        assert list(artifacts.rglob(f"{run.info.run_id}/artifacts/weights/model.pt"))
    assert not list(artifacts.rglob("resume/*"))
    assert not (tmp_path / "a" / "mlruns").exists() and not (tmp_path / "b" / "mlruns").exists()

    code, out = ablate(tmp_path, "report", "relu_vs_tanh", "--tracking-uri", uri, "--out",
                       str(tmp_path / "reports"))
    assert code == 0, out[-3000:]
    report = (tmp_path / "reports" / "relu_vs_tanh.md").read_text()
    assert f"at `{uri}`" in report and f"{len(cells)} ({len(cells)} finished)" in report


@pytest.mark.cluster
def test_a_sweep_on_the_cluster_keeps_its_studies_in_postgresql_with_exact_trial_totals(
        stack, tmp_path):
    import optuna
    from optuna.trial import TrialState

    from alexnet.store import database_url
    from alexnet.tuned import study_name

    uri, storage = stack["uri"], stack["optuna"]
    code, out = ablate(tmp_path, "sweep", "relu_vs_tanh", "--quick", "--trials", "2",
                       "--executor", "ray", "--ray-address", stack["ray"].address,
                       "--tracking-uri", uri, "--storage", storage)
    assert code == 0, out[-3000:]
    trials = runs_of(uri, "relu_vs_tanh", kind="trial")
    for arm in load_ablation("relu_vs_tanh").cells(quick=True, seeds=[0]):
        study = optuna.load_study(study_name=study_name(arm), storage=database_url(storage))
        done = [t for t in study.get_trials() if t.state in (TrialState.COMPLETE,
                                                             TrialState.PRUNED)]
        assert len(done) == 2  # exactly the requested total
        assert all(t.state != TrialState.RUNNING for t in study.get_trials())
        mine = [r for r in trials if r.data.tags.get("study") == study.study_name]
        assert sorted(int(r.data.tags["trial_number"]) for r in mine) == sorted(
            t.number for t in done)  # each trial one MLflow run
        assert all(r.info.status in ("FINISHED", "KILLED") for r in mine)


@pytest.mark.cluster
def test_a_worker_node_killed_in_the_middle_of_a_cell_leaves_every_cell_finished_once(
        stack, tmp_path):
    """The worker node's raylet is killed while it trains a cell: Ray runs the task again on
    the head node, the cell resumes from its checkpoint in the server, nothing is doubled."""
    ray = stack["ray"]
    worker = ray.add_worker()  # a third node, killed below: the cluster is left as it was
    uri, epochs, name = stack["uri"], 8, "fault"
    path = tmp_path / f"{name}.yaml"
    path.write_text(LONG.format(name=name, epochs=epochs))
    grid = start(tmp_path, "run", str(path), "--executor", "ray", "--ray-address", ray.address,
                 "--tracking-uri", uri)
    try:
        c = client(uri)

        def on_worker_past_epoch_2():
            exp = c.get_experiment_by_name(name)
            if exp is None:
                return None
            for run in c.search_runs([exp.experiment_id], filter_string=(
                    "tags.`ablate.kind` = 'cell' and attributes.status = 'RUNNING'")):
                pid = int(run.data.tags.get("ablate.pid", 0))
                on_worker = pid and _session_of(pid) == worker.pid
                if on_worker and run.data.metrics.get("val_error") is not None and \
                        len(c.get_metric_history(run.info.run_id, "val_error")) >= 2:
                    return run
            return None

        victim = wait_for(on_worker_past_epoch_2, 300, "a cell past epoch 2 on the worker")
        ray.raylet_of(worker).kill()
        code, out = finish(grid)
    finally:
        if grid.poll() is None:
            end_session(grid)
    assert code == 0, out[-3000:]
    runs = assert_each_cell_finished_once(uri, name, 4)
    resumed = next(r for r in runs if r.info.run_id == victim.info.run_id)  # the same run,
    assert resumed.data.tags["ablate.pid"] != victim.data.tags["ablate.pid"]  # another process
    history = client(uri).get_metric_history(resumed.info.run_id, "val_error")
    assert max(m.step for m in history) == epochs
    # From its checkpoint (at most the epoch in flight again), not from the start.
    assert len(history) <= epochs + 1


def _session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except ProcessLookupError:
        return None


@pytest.mark.cluster
def test_without_an_address_ray_runs_the_grid_on_this_machine_and_ctrl_c_leaves_it_resumable(
        tmp_path):
    """A Ray cluster of this machine, started by the command; Ctrl-C (to the whole process
    group, as a terminal sends it) cancels the cells, whose runs end KILLED; the same command
    then resumes them and trains the rest."""
    path = tmp_path / "long.yaml"
    path.write_text(LONG.format(name="long", epochs=6))
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    args = ("run", str(path), "--executor", "ray")
    grid = start(tmp_path, *args)
    try:
        wait_for(lambda: any(r.data.metrics.get("val_error") is not None
                             for r in _runs_or_none(uri, "long")), 300, "a first epoch")
        os.killpg(grid.pid, signal.SIGINT)
        code, out = finish(grid, timeout=120)
    finally:
        if grid.poll() is None:
            end_session(grid)
    assert code == 130, out[-3000:]
    interrupted = _runs_or_none(uri, "long")
    assert interrupted and "RUNNING" not in {r.info.status for r in interrupted}
    assert "KILLED" in {r.info.status for r in interrupted}
    code, out = ablate(tmp_path, *args)
    assert code == 0, out[-3000:]
    runs = assert_each_cell_finished_once(uri, "long", 4)
    killed = {r.info.run_id for r in interrupted if r.info.status == "KILLED"}
    assert killed <= {r.info.run_id for r in runs}  # resumed, not started again


def _runs_or_none(uri: str, experiment: str) -> list:
    if not Path(uri.removeprefix("sqlite:///")).exists():
        return []
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], filter_string="tags.`ablate.kind` = 'cell'") \
        if exp else []


# A process on another machine that claimed a cell, opened its run and went silent (its node
# died): what a Ray retry finds. Then the cell as a Ray task runs it (cluster.patiently).
DEAD_HOLDER = """
import json, sys
from alexnet import cluster, store, tracking
from alexnet.ablation import load_ablation
from alexnet.runner import CellTask, execute_cell

uri = sys.argv[1]
[cell] = load_ablation("relu_vs_tanh").cells(quick=True, seeds=[0], overrides={
    "train.epochs": 2, "data.synthetic.train_size": 256, "data.synthetic.val_size": 64})[:1]
c = store.client(uri)
exp = tracking.get_experiment_id(c, uri, cell.ablation)
claim = tracking.claim_cell(c, cell.key)
run_id = tracking.start_cell_run(c, exp, cell, parent_run_id=None)
tracking.bind_claim(c, claim, run_id)
last_beat = tracking.now_ms()
tracking.set_tags(c, run_id, {"ablate.host": "a-node-that-died", "ablate.heartbeat_ms":
                              last_beat})
task = CellTask(cell, uri, exp, None, tracking.now_ms())
plain = execute_cell(task)
outcome = cluster.patiently(execute_cell, task, lambda event: None)
claims = c.get_run(tracking.registry_run_id(c)).data.params
taken_over = int(claims[f"claim.{cell.key}.2"].rsplit(":", 3)[2])  # host:pid:ms:nonce
print(json.dumps({"plain": plain.state, "state": outcome.state, "same_run": outcome.run_id ==
                  run_id, "silent_ms": taken_over - last_beat, "stale": store.STALE_SECONDS}))
"""


@pytest.mark.cluster
def test_a_cell_whose_holder_on_another_machine_went_silent_is_taken_over_and_resumed(
        tmp_path):
    import json

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = subprocess.run([sys.executable, "-c", DEAD_HOLDER, uri], capture_output=True,
                         text=True, timeout=300, env={**cluster_env(),
                                                      "ALEXNET_HEARTBEAT_SECONDS": "0.5"})
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["plain"] == "running"  # what a retry alone would report: the cell unfinished
    assert seen["state"] == "finished" and seen["same_run"]  # resumed, not started again
    assert seen["silent_ms"] > 1000 * seen["stale"]  # taken over once the holder was stale


# --- options and bad input: no cluster needed ------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--executor", "slurm"], "--executor 'slurm': choose local or ray"),
    (["--ray-address", "auto"], "--ray-address goes with --executor ray"),
    (["--gpus-per-cell", "0.5"], "--gpus-per-cell goes with --executor ray"),
    (["--executor", "ray", "--gpus-per-cell", "1.5"], "--gpus-per-cell 1.5: give a fraction"),
    (["--executor", "ray", "--gpus-per-cell", "0"], "--gpus-per-cell 0: give a fraction"),
    (["--executor", "ray", "--cpus-per-cell", "0"], "--cpus-per-cell 0: give a positive"),
])
@pytest.mark.parametrize("command", ["run", "sweep"])
def test_bad_executor_options_are_one_line_and_exit_2_with_nothing_logged(
        tmp_path, monkeypatch, command, args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [command, "relu_vs_tanh", "--quick", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not list((tmp_path / "mlruns").glob("*/*"))  # no experiment, no study


def test_without_ray_installed_the_executor_names_the_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where it is absent
    result = CliRunner().invoke(app, ["run", "relu_vs_tanh", "--quick", "--executor", "ray"])
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: --executor ray needs Ray, which is not installed; {cluster.INSTALL_HINT}")


def test_a_cell_asks_for_a_gpu_share_that_fits_its_model_and_batch():
    quick = load_ablation("relu_vs_tanh").cells(quick=True)
    paper = load_ablation("towers").cells(overrides={"model.name": "alexnet",
                                                     "data.crop_size": 227,
                                                     "data.image_size": 256})
    small, large = cluster.estimate_gpus_per_cell(quick), cluster.estimate_gpus_per_cell(paper)
    assert small == round(1 / cluster.MAX_PER_GPU, 4)  # a tiny net: as many as allowed
    assert small < large <= 1
    assert cluster.cell_gpu_bytes(paper[0]) > cluster.cell_gpu_bytes(quick[0])
    assert cluster.check_gpus_per_cell(2) == 2  # whole GPUs above one


@pytest.mark.parametrize(("backend", "message"), [
    ("file:///tmp/x", "give a database URL"),
    ("sqlite:////no/such/folder/mlflow.db", "folder /no/such/folder does not exist"),
    ("postgresql://nobody@127.0.0.1:1/mlflow", "cannot be reached"),
])
def test_ablate_server_refuses_a_backend_it_cannot_use_in_one_line(tmp_path, monkeypatch,
                                                                  backend, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["server", "--backend-store-uri", backend, "--port",
                                      str(free_port())])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "mlartifacts").exists()
