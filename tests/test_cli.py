"""The `ablate` CLI end to end: grids into MLflow, resume, parallel jobs, the UI, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alexnet.cli import app

ABLATE = str(Path(sys.executable).parent / "ablate")

TINY = """\
name: tiny
title: a tiny grid for tests
claims: [relu_speed]
base:
  profile: quick
  set:
    model.name: convnet4
    data.synthetic.train_size: {train}
    data.synthetic.val_size: 128
    train.epochs: {epochs}
axes:
  activation:
    relu: {{model.activation: relu}}
    tanh: {{model.activation: tanh}}
reference: {{activation: relu}}
seeds: {seeds}
"""


def tiny(folder: Path, *, seeds=(0, 1), epochs: int = 2, train: int = 256) -> Path:
    path = folder / "ablations" / "tiny.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(TINY.format(seeds=list(seeds), epochs=epochs, train=train))
    return path


def ablate(cwd: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([ABLATE, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200",
                                                # sample often enough to see in short runs
                                                "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2"})


def store_runs(cwd: Path, experiment: str = "tiny"):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    exp = c.get_experiment_by_name(experiment)
    return c, c.search_runs([exp.experiment_id], max_results=1000)


def children(runs):
    return [r for r in runs if r.data.tags.get("ablate.kind") == "cell"]


def test_grid_logs_one_parent_and_a_finished_child_per_cell_then_skips_them(tmp_path):
    tiny(tmp_path)
    first = ablate(tmp_path, "run", "tiny")
    assert first.returncode == 0, first.stderr
    assert "summary" in first.stdout
    c, runs = store_runs(tmp_path)
    parents = [r for r in runs if r.data.tags.get("ablate.kind") == "grid"]
    cells = children(runs)
    assert len(parents) == 1 and len(cells) == 4
    assert all(r.info.status == "FINISHED" for r in runs)
    for r in cells:
        tags = r.data.tags
        assert tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert tags["ablation"] == "tiny" and tags["claims"] == "relu_speed"
        assert tags["arm"] in ("activation=relu", "activation=tanh")
        assert tags["axis.activation"] == tags["arm"].split("=")[1]
        assert tags["seed"] in ("0", "1") and len(tags["cell_key"]) == 16
        assert tags["dataset_fingerprint"]
        assert r.data.params["model.activation"] == tags["axis.activation"]
        history = c.get_metric_history(r.info.run_id, "val_error")
        assert [m.step for m in history] == [1, 2]
        for name in ("train_loss", "train_error", "val_loss", "val_error_top5", "lr",
                     "images_per_second"):
            assert len(c.get_metric_history(r.info.run_id, name)) == 2
        assert "final_val_error" in r.data.metrics
        assert "system/cpu_utilization_percentage" in r.data.metrics
        artifacts = {a.path for a in c.list_artifacts(r.info.run_id)}
        assert {"config.yaml", "learning_curves.png", "weights"} <= artifacts
        assert "resume" not in artifacts  # the resume checkpoint goes once the cell finishes
    assert sorted(os.listdir(tmp_path)) == ["ablations", "mlruns"]  # nothing else left behind

    again = ablate(tmp_path, "run", "tiny")  # its speed is measured by hand, not timed here
    assert again.returncode == 0, again.stderr
    assert "2 already finished" in again.stdout or "skipped" in again.stdout
    _, runs_after = store_runs(tmp_path)
    assert len(runs_after) == len(runs)  # trained nothing, logged nothing
    shown = ablate(tmp_path, "show", "tiny")
    assert shown.stdout.count("finished") == 4 and "new" not in shown.stdout


def test_sigkill_mid_cell_then_rerun_resumes_to_the_same_numbers(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    for d in (killed, clean):
        tiny(d, seeds=(0,), epochs=5, train=1024)
    proc = subprocess.Popen([ABLATE, "run", "tiny"], cwd=killed, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    artifacts = killed / "mlruns" / "artifacts"
    deadline = time.time() + 120
    while time.time() < deadline and not any(artifacts.rglob("resume/checkpoint.pt")):
        time.sleep(0.05)
    assert any(artifacts.rglob("resume/checkpoint.pt")), "no checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, runs = store_runs(killed)
    assert any(r.info.status == "RUNNING" for r in children(runs))  # left behind by the kill

    assert ablate(killed, "run", "tiny").returncode == 0
    assert ablate(clean, "run", "tiny").returncode == 0
    _, after = store_runs(killed)
    _, reference = store_runs(clean)
    finished = [r for r in children(after) if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["cell_key"] for r in finished) == sorted(
        r.data.tags["cell_key"] for r in children(reference))  # exactly one per cell
    assert not [r for r in children(after) if r.info.status == "RUNNING"]
    by_key = {r.data.tags["cell_key"]: r.data.metrics for r in children(reference)}
    for r in finished:
        for name in ("final_val_error", "final_train_loss", "final_val_loss"):
            assert r.data.metrics[name] == by_key[r.data.tags["cell_key"]][name]


def test_jobs_2_runs_8_cells_without_duplicates(tmp_path):
    tiny(tmp_path, seeds=(0, 1, 2, 3))
    result = ablate(tmp_path, "run", "tiny", "--jobs", "2")
    assert result.returncode == 0, result.stderr
    _, runs = store_runs(tmp_path)
    cells = children(runs)
    assert len(cells) == 8 and all(r.info.status == "FINISHED" for r in cells)
    assert len({r.data.tags["cell_key"] for r in cells}) == 8


def test_profile_saves_a_trace_of_a_few_steps(tmp_path):
    tiny(tmp_path, seeds=(0,))
    result = ablate(tmp_path, "run", "tiny", "--profile")
    assert result.returncode == 0, result.stderr
    c, runs = store_runs(tmp_path)
    for r in children(runs):
        traces = [a.path for a in c.list_artifacts(r.info.run_id, "profile")]
        assert traces == ["profile/trace.json"]
        local = c.download_artifacts(r.info.run_id, "profile/trace.json", str(tmp_path))
        events = json.loads(Path(local).read_text())["traceEvents"]
        assert any("ProfilerStep" in str(e.get("name", "")) for e in events)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_runs_through_the_rest_api(tmp_path):
    tiny(tmp_path, seeds=(0,))
    assert ablate(tmp_path, "run", "tiny").returncode == 0
    port = _free_port()
    server = subprocess.Popen([ABLATE, "ui", "--port", str(port)], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(
                        f"{base}/experiments/get-by-name?experiment_name=tiny", timeout=2) as r:
                    exp = json.load(r)["experiment"]
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        body = json.dumps({"experiment_ids": [exp["experiment_id"]],
                           "filter": "tags.`ablate.kind` = 'cell'"}).encode()
        req = urllib.request.Request(f"{base}/runs/search", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            found = json.load(r)["runs"]
        assert len(found) == 2
        assert {run["info"]["status"] for run in found} == {"FINISHED"}
        assert {t["value"] for run in found for t in run["data"]["tags"]
                if t["key"] == "arm"} == {"activation=relu", "activation=tanh"}
    finally:
        server.terminate()
        server.wait(timeout=20)


# --- bad input: one line, exit code 2, the store untouched ---------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def store_with_runs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("store")
    tiny(folder, seeds=(0,), epochs=1)
    assert ablate(folder, "run", "tiny").returncode == 0
    return folder


BROKEN = {
    "yaml": ("axes: {activation: {relu: {model.activation: relu}}\n", "YAML syntax error"),
    "unknown_key": ("seedz: [0]\n", "unknown key 'seedz'; did you mean 'seeds'?"),
    "arm_value": ("axes:\n  activation:\n    weird: {model.activation: sigmoidx}\n",
                  "'relu', 'tanh'"),
    "wrong_type": ("axes:\n  activation:\n    relu: {train.epochs: many}\n", "train.epochs"),
    "empty_axis": ("axes:\n  activation:\n", "axis 'activation' is empty"),
    "duplicate_arm": ("axes:\n  activation:\n    relu: {model.activation: relu}\n"
                      "    relu: {model.activation: tanh}\n", "duplicate key 'relu'"),
    "non_finite": ("axes:\n  activation:\n    relu: {optim.lr: .inf}\n",
                   "optim.lr: Input should be a finite number (got inf)"),
    "python_tag": ("description: !!python/object/apply:os.system [touch pwned]\n",
                   "tag '!!python/object/apply:os.system' is not allowed"),
    "list_for_number": ("axes:\n  activation:\n    relu: {train.epochs: [1, 2]}\n",
                        "train.epochs: Input should be a valid integer"),
    "absurd_epochs": ("axes:\n  activation:\n    relu: {train.epochs: 9000000}\n",
                      "train.epochs: Input should be less than or equal to 10000"),
    "seed_twice": ("axes:\n  activation:\n    relu: {}\nseeds: [1, 1]\n", "seed 1 is given twice"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_bad_ablation_file_is_one_line_exit_2_and_nothing_logged(store_with_runs, case):
    text, expected = BROKEN[case]
    path = store_with_runs / f"bad_{case}.yaml"
    path.write_text("name: bad\ntitle: bad\nbase: {profile: quick}\n" + text)
    before = snapshot(store_with_runs / "mlruns")
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert expected in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert snapshot(store_with_runs / "mlruns") == before


@pytest.mark.parametrize("args, expected", [
    (["run", "relu_vs_tahn"], "unknown ablation 'relu_vs_tahn'; did you mean 'relu_vs_tanh'?"),
    (["run", "tiny", "--set", "optim.lrr=0.1"], "did you mean 'optim.lr'?"),
    (["run", "tiny", "--data-root", "/no/such/folder"], "--data-root /no/such/folder"),
    (["run", "tiny", "--tracking-uri", "http://127.0.0.1:9/"], "cannot be reached"),
    (["run", "tiny", "--tracking-uri", "sqlite:////no/such/dir/mlflow.db"], "does not exist"),
    (["run", "tiny", "--seeds", "x"], "--seeds"),
    (["run", "tiny", "--device", "tpu"], "runtime.device"),
])
def test_bad_arguments_are_one_line_exit_2_and_nothing_logged(store_with_runs, monkeypatch,
                                                               args, expected):
    monkeypatch.chdir(store_with_runs)
    before = snapshot(store_with_runs / "mlruns")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    assert snapshot(store_with_runs / "mlruns") == before


def test_bad_input_creates_no_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny(tmp_path)
    result = CliRunner().invoke(app, ["run", "tiny", "--set", "model.nrom=none"])
    assert result.exit_code == 2
    assert not (tmp_path / "mlruns").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = ablate(tmp_path, "--debug", "run", "no_such_ablation")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_list_and_describe_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    listed = CliRunner().invoke(app, ["list"], env={"COLUMNS": "200"})
    assert listed.exit_code == 0
    for name in ("relu_vs_tanh", "normalization", "pooling", "towers", "paper"):
        assert name in listed.output
    described = CliRunner().invoke(app, ["describe-model", "alexnet", "--towers", "2"],
                                   env={"COLUMNS": "200"})
    assert described.exit_code == 0
    assert "60,965,224" in described.output or "60965224" in described.output
    bad = CliRunner().invoke(app, ["describe-model", "alexnet", "--norm", "layer"])
    assert bad.exit_code == 2 and "'lrn', 'bn' or 'none'" in bad.output


def test_dry_run_plans_without_a_store(tmp_path):
    tiny(tmp_path)
    result = ablate(tmp_path, "run", "tiny", "--dry-run")
    assert result.returncode == 0
    assert result.stdout.count("run") >= 4
    assert not (tmp_path / "mlruns").exists()



def _one_line_exit_2(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    return result.output


def test_alias_bomb_fails_in_under_2_s_with_one_short_line(store_with_runs):
    levels = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = store_with_runs / "bomb.yaml"  # 9**10 strings once expanded
    path.write_text("\n".join(levels) + "\nname: bomb\ntitle: t\nseeds: *l9\n")
    before = snapshot(store_with_runs / "mlruns")
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["run", str(path)])
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"took {elapsed:.1f} s"  # the failure mode is a hang; 2 s is generous
    output = _one_line_exit_2(result)
    assert "more than 10,000 values" in output and "lol" not in output and len(output) < 250
    assert snapshot(store_with_runs / "mlruns") == before


@pytest.mark.parametrize("data, expected", [
    ("name: caf\u00e9\ntitle: t\n".encode("latin-1"), "not UTF-8 text"),
    (bytes(range(256)) * 8, "not UTF-8 text"),
    (b"", "the file is empty"),
    (b"- relu\n- tanh\n", "the file is a list, not a mapping"),
    (b"name: x\ndescription: " + b"y" * 200_000 + b"\n", "larger than 65,536 bytes"),
])
def test_a_file_that_is_not_an_ablation_is_one_line_naming_it(store_with_runs, data, expected):
    path = store_with_runs / "not_an_ablation.yaml"
    path.write_bytes(data)
    before = snapshot(store_with_runs / "mlruns")
    output = _one_line_exit_2(CliRunner().invoke(app, ["run", str(path)]))
    assert expected in output and "not_an_ablation.yaml" in output
    assert snapshot(store_with_runs / "mlruns") == before


@pytest.mark.parametrize("sets, expected", [
    (["optim.lr=inf"], "optim.lr: Input should be a finite number (got 'inf')"),
    (["optim.lr=nan"], "finite number"),
    (["model.dropout=.nan"], "model.dropout: Input should be a finite number"),
    (["optim.weight_decay=-.inf"], "finite number"),
    (["optim.lr=[0.1, 0.2]"], "optim.lr: Input should be a valid number"),
    (["train.batch_size=100000000"], "train.batch_size: Input should be less than or equal to"),
    (["optim.lr=0.1", "optim.lr=0.2"], "--set optim.lr is given twice"),
    (["model.width=!!python/object/apply:os.system [ls]"], "is not allowed"),
])
def test_bad_set_values_create_no_store(tmp_path, monkeypatch, sets, expected):
    monkeypatch.chdir(tmp_path)
    tiny(tmp_path)
    args = ["run", "tiny"] + [a for s in sets for a in ("--set", s)]
    output = _one_line_exit_2(CliRunner().invoke(app, args))
    assert expected in output
    assert not (tmp_path / "mlruns").exists()
