"""The `ablate` CLI end to end: grids into MLflow, resume, parallel jobs, the UI, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import re
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
        assert {"config.yaml", "weights"} <= artifacts
        assert "resume" not in artifacts  # the resume checkpoint goes once the cell finishes
    assert sorted(os.listdir(tmp_path)) == ["ablations", "mlruns"]  # nothing else left behind

    again = ablate(tmp_path, "run", "tiny")  # its speed is measured by hand, not timed here
    assert again.returncode == 0, again.stderr
    assert "tiny: 0 cells to train, 4 already finished" in again.stdout
    _, runs_after = store_runs(tmp_path)
    assert len(runs_after) == len(runs)  # trained nothing, logged nothing
    shown = ablate(tmp_path, "show", "tiny")
    assert shown.stdout.count("finished") == 4 and "new" not in shown.stdout


@pytest.mark.slow
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


@pytest.mark.slow
def test_jobs_2_runs_8_cells_without_duplicates(tmp_path):
    tiny(tmp_path, seeds=(0, 1, 2, 3))
    result = ablate(tmp_path, "run", "tiny", "--jobs", "2")
    assert result.returncode == 0, result.stderr
    _, runs = store_runs(tmp_path)
    cells = children(runs)
    assert len(cells) == 8 and all(r.info.status == "FINISHED" for r in cells)
    assert len({r.data.tags["cell_key"] for r in cells}) == 8


def test_profile_saves_a_trace_of_a_few_steps(tmp_path):
    # 2 epochs of 4 steps: the run ends inside the profiler's 9-step schedule, whose trace
    # is written as it exits, with the steps it had.
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


@pytest.mark.slow
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


# --- what a user sees: -h, --version, config, cache, show, clean, large grids ----------------


def test_h_is_help_everywhere_and_version_says_which(tmp_path, monkeypatch):
    from alexnet import __version__

    monkeypatch.chdir(tmp_path)
    for args in (["-h"], ["run", "-h"], ["cache", "-h"]):
        result = CliRunner().invoke(app, args, prog_name="ablate", env={"COLUMNS": "100"})
        assert result.exit_code == 0 and "Usage: ablate" in result.output, args
    version = CliRunner().invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.strip() == f"ablate {__version__}"


def test_a_usage_error_is_clicks_message_not_a_traceback(tmp_path):
    result = ablate(tmp_path, "run")
    assert result.returncode == 2
    assert "Missing argument" in result.stderr and "Traceback" not in result.stderr


def test_config_prints_the_resolved_config_of_a_cell_as_yaml(tmp_path, monkeypatch):
    import yaml

    from alexnet.ablation import load_ablation
    from alexnet.config import RunConfig

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["config", "relu_vs_tanh", "--arm", "tanh", "--seed", "2",
                                      "--quick", "--set", "optim.lr=0.02"])
    assert result.exit_code == 0, result.output
    printed = RunConfig.model_validate(yaml.safe_load(result.output))
    assert (printed.model.activation, printed.seed, printed.optim.lr) == ("tanh", 2, 0.02)
    cell = next(c for c in load_ablation("relu_vs_tanh").cells(
        quick=True, seeds=[2], overrides={"optim.lr": 0.02}) if c.arms["activation"] == "tanh")
    assert printed.key() == cell.key and f"cell {cell.key} · grid {cell.grid_key}" in result.output
    reference = CliRunner().invoke(app, ["config", "relu_vs_tanh"])
    assert "activation: relu" in reference.output and "other arms (--arm): activation=tanh" \
        in reference.output


def test_cache_info_says_where_and_how_big_and_clear_removes_only_ours(tmp_path):
    cache = tmp_path / "cache"
    (cache / "cifar" / "cifar-10-batches-py").mkdir(parents=True)
    (cache / "imagefolder-0123456789abcdef.pt").write_bytes(b"x" * 2500)
    (cache / "imagefolder-0123456789abcdef.pt.lock").write_bytes(b"")
    (cache / "cifar" / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"y" * 1000)
    (cache / "notes.txt").write_text("not ablate's")
    env = {"ALEXNET_CACHE": str(cache), "COLUMNS": "120"}
    info = CliRunner().invoke(app, ["cache", "info"], env=env)
    assert info.exit_code == 0, info.output
    assert f"cache: {cache} (3.5 KB" in info.output
    assert "imagefolder images, decoded" in info.output and "CIFAR archives" in info.output
    assert "notes.txt" not in info.output
    cleared = CliRunner().invoke(app, ["cache", "clear"], env=env)
    assert cleared.exit_code == 0 and "freed 2.5 KB" in cleared.output
    assert sorted(p.name for p in cache.iterdir()) == ["cifar", "notes.txt"]
    CliRunner().invoke(app, ["cache", "clear", "--downloads"], env=env)
    assert sorted(p.name for p in cache.iterdir()) == ["notes.txt"]


BIG = """\
name: big
title: a grid far larger than anyone means to run by accident
base: {profile: quick}
axes:
  lr: {a: {optim.lr: 0.01}, b: {optim.lr: 0.02}, c: {optim.lr: 0.03}}
  wd: {a: {optim.weight_decay: 0.0}, b: {optim.weight_decay: 0.001}}
seeds: [%s]
"""


def test_a_grid_of_hundreds_of_cells_says_so_and_waits_for_yes(tmp_path):
    (tmp_path / "ablations").mkdir()
    (tmp_path / "ablations" / "big.yaml").write_text(BIG % ", ".join(map(str, range(100))))
    result = ablate(tmp_path, "run", "big")
    assert result.returncode == 1
    assert "big: 600 cells to train" in result.stdout
    assert "add --yes to start it" in result.stderr
    assert not (tmp_path / "mlruns").exists()  # nothing started, nothing created


@pytest.mark.slow
def test_show_lists_each_scale_in_the_store_and_clean_deletes_after_yes(tmp_path):
    tiny(tmp_path, epochs=2)
    first = ablate(tmp_path, "run", "tiny", "--set", "train.epochs=1")
    assert first.returncode == 0, first.stderr
    assert "tiny: 4 cells to train\n" in first.stdout  # no earlier runs: no estimate
    shown = ablate(tmp_path, "show", "tiny")  # no flags: what the store holds
    assert shown.returncode == 0, shown.stderr
    assert "tiny · synthetic 256 · convnet4 w0.125 · 1 ep" in shown.stdout
    assert shown.stdout.count("finished") == 4 and "new" not in shown.stdout
    planned = ablate(tmp_path, "show", "tiny", "--seeds", "3")  # flags: the cells they give
    assert planned.stdout.count("new") == 6 and "finished" not in planned.stdout
    more = ablate(tmp_path, "run", "tiny", "--set", "train.epochs=1", "--seeds", "3")
    assert more.returncode == 0, more.stderr
    assert "tiny: 2 cells to train, 4 already finished; about 0:" in more.stdout

    c, runs = store_runs(tmp_path)
    assert ablate(tmp_path, "clean", "tiny").returncode == 2  # says what to choose
    asked = ablate(tmp_path, "clean", "tiny", "--all")
    assert asked.returncode == 1 and "6 cell runs (6 finished)" in asked.stdout
    assert "add --yes" in asked.stderr
    assert len(store_runs(tmp_path)[1]) == len(runs)  # nothing deleted without --yes
    failed = ablate(tmp_path, "clean", "tiny", "--failed", "--yes")
    assert failed.returncode == 0 and "nothing to delete" in failed.stdout
    done = ablate(tmp_path, "clean", "tiny", "--all", "--yes")
    assert done.returncode == 0 and f"deleted {len(runs)} runs" in done.stdout
    assert store_runs(tmp_path)[1] == []
    assert "nothing of tiny in the store yet" in ablate(tmp_path, "show", "tiny").stdout


@pytest.mark.slow
def test_after_the_readmes_quick_run_show_lists_its_six_finished_cells(tmp_path):
    run = ablate(tmp_path, "run", "relu_vs_tanh", "--quick")
    assert run.returncode == 0, run.stderr
    summary = run.stdout[run.stdout.index("summary: relu_vs_tanh · quick"):]
    for arm in ("relu", "tanh"):  # per arm: 3 seeds, mean ± sd
        assert re.search(rf"^ *{arm} +3 +\d+\.\d ± \d+\.\d", summary, re.MULTILINE), summary
    shown = ablate(tmp_path, "show", "relu_vs_tanh")  # as the README says: no --quick
    assert shown.returncode == 0, shown.stderr
    assert "relu_vs_tanh · quick · convnet4 w0.125" in shown.stdout
    assert shown.stdout.count("finished") == 6 and "new" not in shown.stdout
