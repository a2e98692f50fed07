"""`ablate ui` and what MLflow's UI shows: the training runs, cells grouped by arm."""

from __future__ import annotations

import dataclasses
import json
import math
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

from alexnet import store as store_mod
from alexnet import tracking, ui, ui_server
from alexnet.ablation import load_ablation
from alexnet.claims import CLAIMS
from alexnet.errors import AblateError

ABLATE = str(Path(sys.executable).parent / "ablate")
REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
# Variables that make MLflow turn its telemetry off by itself (it takes them for a CI or a
# test run); removed where a test shows that *we* turn it off.
CI_VARIABLES = ("PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "CI", "CIRCLECI", "GITLAB_CI",
                "JENKINS_URL", "TRAVIS", "TF_BUILD", "BUILDKITE", "TEAMCITY_VERSION")


def _env(**extra: str) -> dict[str, str]:
    """This worktree's code, the user's telemetry choice unset, no CI markers."""
    env = {k: v for k, v in os.environ.items()
           if k not in CI_VARIABLES and k != ui_server.TELEMETRY_SWITCH}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return {**env, **extra}


# --- the experiment and its grids ------------------------------------------------------------


def test_experiments_are_training_experiments_described_by_their_ablation():
    ab = load_ablation("relu_vs_tanh")
    tags = ui.experiment_tags(ab)
    assert tags[ui.KIND_TAG] == "custom_model_development"
    note = tags[ui.NOTE_TAG]
    assert note.startswith(f"**{ab.title}**")
    assert "relu (reference), tanh" in note
    claim = CLAIMS["relu_speed"]
    assert f"`relu_speed` (Section {claim.section}): {claim.statement}" in note
    assert claim.paper_text in note
    assert "ablate sweep relu_vs_tanh" in note  # the description, on one line


def test_grid_names_tell_quick_real_and_tuned_grids_apart():
    ab = load_ablation("relu_vs_tanh")
    real = ui.grid_run_name(ab.cells())
    quick = ui.grid_run_name(ab.cells(quick=True))
    small = ui.grid_run_name(ab.cells(overrides={"data.max_train": 5000, "train.epochs": 3}))
    tuned = ui.grid_run_name([dataclasses.replace(c, tuned={"optim.lr": 0.02})
                              for c in ab.cells()])
    assert real == "relu_vs_tanh · cifar10 45k · convnet4 w1 · 40 ep"
    assert quick == "relu_vs_tanh · quick · convnet4 w0.125 · 3 ep"
    assert small == "relu_vs_tanh · cifar10 5k · convnet4 w1 · 3 ep"
    assert tuned == real + " · tuned"
    # Arms that differ in width (one tower with half the kernels) show both widths.
    assert "alexnet_cifar w1/0.5" in ui.grid_run_name(load_ablation("towers").cells())
    with pytest.raises(ValueError):
        ui.grid_run_name([])


def test_each_grid_gets_a_view_of_its_cells_grouped_by_arm_with_the_curves_first():
    ab = load_ablation("relu_vs_tanh")
    real, quick = ab.cells(), ab.cells(quick=True)
    tags = ui.grid_view_tags(real + quick, now_ms=1000)
    assert set(tags) == {ui.VIEW_TAG_PREFIX + ui.view_id(real[0].grid_key),
                         ui.VIEW_TAG_PREFIX + ui.view_id(quick[0].grid_key)}
    name, state = ui.read_view(tags[ui.VIEW_TAG_PREFIX + ui.view_id(quick[0].grid_key)])
    assert name == ui.grid_run_name(quick)
    assert state["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "arm"}]
    assert f"tags.`ablate.grid_key` = '{quick[0].grid_key}'" in state["searchFilter"]
    assert "tags.`ablate.kind` = 'cell'" in state["searchFilter"]
    first = state["compareRunSections"][0]
    assert first["name"] == ui.CURVES_SECTION
    curves = [c for c in state["compareRunCharts"] if c["metricSectionId"] == first["uuid"]]
    assert [c["metricKey"] for c in curves] == list(ui.CURVES)
    assert {c["type"] for c in curves} == {"LINE"} and {c["xAxisKey"] for c in curves} == {"step"}
    # Every metric a cell logs per epoch has its curve.
    assert set(ui.CURVES) == set(tracking.EPOCH_METRICS)
    # Compressed: small next to the limit on an experiment tag's value (20,000 in 3.17).
    assert max(len(v) for v in tags.values()) < 5000


def test_ablate_ui_opens_the_newest_grid_view_in_the_training_view():
    older = ui.grid_view_tags(load_ablation("relu_vs_tanh").cells(quick=True), now_ms=1000)
    newer = ui.grid_view_tags(load_ablation("relu_vs_tanh").cells(), now_ms=2000)
    tags = {**older, **newer, ui.NOTE_TAG: "text", ui.VIEW_TAG_PREFIX + "someone-else": "{}"}
    newest = ui.newest_view(tags)
    assert ui.VIEW_TAG_PREFIX + newest in newer
    assert ui.newest_view({ui.NOTE_TAG: "text"}) is None
    url = ui.experiment_url("http://127.0.0.1:5000", "7", newest)
    assert url.startswith("http://127.0.0.1:5000/#/experiments/7/runs?")
    assert "workflowType=machine_learning" in url and "compareRunsMode=CHART" in url
    assert f"viewStateShareKey={newest}" in url
    assert ui.experiment_url("http://h:1/", "7") == \
        "http://h:1/#/experiments/7/runs?workflowType=machine_learning"
    assert ui_server.browser_host("0.0.0.0") == "127.0.0.1"
    assert ui_server.browser_host("::1") == "[::1]"


# --- telemetry and the server ------------------------------------------------------------


def test_quiet_mlflow_turns_telemetry_off_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv(ui_server.TELEMETRY_SWITCH, raising=False)
    ui_server.quiet_mlflow()
    assert os.environ[ui_server.TELEMETRY_SWITCH] == "true"
    monkeypatch.setenv(ui_server.TELEMETRY_SWITCH, "false")  # the user wants it on
    ui_server.quiet_mlflow()
    assert os.environ[ui_server.TELEMETRY_SWITCH] == "false"
    assert ui_server.server_env()[ui_server.TELEMETRY_SWITCH] == "false"


def test_mlflow_imported_after_quiet_mlflow_has_no_telemetry_client():
    code = ("from alexnet.ui_server import quiet_mlflow; quiet_mlflow(); import mlflow; "
            "from mlflow.telemetry import get_telemetry_client; "
            "print(get_telemetry_client())")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_ablate_ui_on_a_taken_port_exits_2_with_one_line(tmp_path):
    with _listening_socket() as taken:
        port = taken.getsockname()[1]
        out = subprocess.run([ABLATE, "ui", "--port", str(port)], cwd=tmp_path, env=_env(),
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert f"port {port} on 127.0.0.1 is in use" in lines[0] and "--port" in lines[0]
    assert out.stdout == ""


def test_port_check_names_a_host_that_is_not_ours():
    with pytest.raises(AblateError, match="--host 192.0.2.1 is not an address"):
        ui_server.check_port_free("192.0.2.1", 5000)  # TEST-NET-1: never this machine's
    with _listening_socket() as taken:
        port = taken.getsockname()[1]
        with pytest.raises(AblateError, match=f"port {port} on 127.0.0.1 is in use"):
            ui_server.check_port_free("127.0.0.1", port)
    ui_server.check_port_free("127.0.0.1", port)  # closed again: free


def test_a_server_that_stops_by_itself_is_an_error(capsys):
    env = dict(os.environ)
    # MLflow's server exits 0 when it cannot bind its port: that is no success for us.
    assert ui_server.run_server([sys.executable, "-c", "pass"], env) == 1
    assert ui_server.run_server([sys.executable, "-c", "raise SystemExit(3)"], env) == 3
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: the MLflow server stopped by itself (exit code 0); its messages "
                   "are above", "error: the MLflow server stopped by itself (exit code 3); "
                   "its messages are above"]


def test_ctrl_c_reaches_the_server_once_and_is_a_normal_stop(tmp_path):
    ready, got = tmp_path / "ready", tmp_path / "signals"
    # The stand-in server notes each SIGINT and stops half a second after the first.
    server = (f"import signal, sys, time, pathlib\n"
              f"got = pathlib.Path({str(got)!r})\n"
              f"def note(*_):\n"
              f"    got.write_text(got.read_text() + 'INT ' if got.exists() else 'INT ')\n"
              f"signal.signal(signal.SIGINT, note)\n"
              f"pathlib.Path({str(ready)!r}).touch()\n"
              f"while not got.exists(): time.sleep(0.05)\n"
              f"time.sleep(0.5)\n")
    ablate_ui = ("import sys; from alexnet.ui_server import run_server; "
                 f"sys.exit(run_server([sys.executable, '-c', {server!r}], {{}}))")
    # A terminal's Ctrl-C goes to its foreground process group: `ablate ui` and whatever
    # shares its group.
    proc = subprocess.Popen([sys.executable, "-c", ablate_ui], env=_env(),
                            start_new_session=True)
    deadline = time.time() + 60
    while not ready.exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    assert got.read_text() == "INT "


# --- the page itself, in a real browser -----------------------------------------------------

EPOCHS = 6


def _store_with_a_grid(store: Path) -> tuple[str, str]:
    """An experiment created as the runner creates it, one quick grid of relu_vs_tanh with
    two seeds and per-epoch curves that differ by arm. Returns (uri, experiment id)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    store.mkdir()
    uri = f"sqlite:///{store / store_mod.DB_NAME}"
    c = MlflowClient(tracking_uri=uri)
    ab = load_ablation("relu_vs_tanh")
    cells = ab.cells(quick=True, seeds=[0, 1])
    exp_id = c.create_experiment(ab.name, tags=ui.experiment_tags(ab))
    for key, value in ui.grid_view_tags(cells).items():
        c.set_experiment_tag(exp_id, key, value)
    parent = c.create_run(exp_id, run_name=ui.grid_run_name(cells),
                          tags={"ablate.kind": "grid", "ablation": ab.name}).info.run_id
    for cell in cells:
        run = c.create_run(exp_id, run_name=f"{cell.arm_label} seed={cell.seed}", tags={
            "mlflow.parentRunId": parent, "ablate.kind": "cell", "ablation": ab.name,
            "arm": cell.arm_label, "seed": str(cell.seed), "ablate.grid_key": cell.grid_key,
            **{f"axis.{a}": v for a, v in cell.arms.items()}}).info.run_id
        speed = 1.0 if cell.arms["activation"] == "relu" else 0.3
        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, epoch) for epoch in range(1, EPOCHS + 1)
                   for name, value in {
                       "train_error": 0.9 * math.exp(-speed * epoch / 2) + 0.01 * cell.seed,
                       "val_error": 0.9 * math.exp(-speed * epoch / 3) + 0.1,
                       "train_loss": 2.3 * math.exp(-speed * epoch / 2),
                       "val_loss": 2.3 * math.exp(-speed * epoch / 3) + 0.3}.items()]
        c.log_batch(run, metrics=[*metrics, Metric("final_val_error", 0.3, now, 0)])
        c.set_terminated(run)
    c.set_terminated(parent)
    return uri, exp_id


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def _wait_for(url: str, server: subprocess.Popen, seconds: float) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                raise
            time.sleep(0.5)


@pytest.mark.browser
def test_the_experiment_page_opens_on_training_runs_grouped_by_arm(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}; apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is in the dev extra: pip install -e .[dev]")
    uri, exp_id = _store_with_a_grid(tmp_path / "mlruns")
    port = _free_port()
    out, err = tmp_path / "ui.out", tmp_path / "ui.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        server = subprocess.Popen([ABLATE, "ui", "--port", str(port), "--tracking-uri", uri],
                                  cwd=tmp_path, env=_env(), stdout=stdout, stderr=stderr)
    try:
        _wait_for(f"http://127.0.0.1:{port}/health", server, 180)
        # What `ablate ui` printed: the experiment's training runs through its grid view.
        urls = re.findall(r"^\s+relu_vs_tanh\s+(\S+)$", out.read_text(), re.MULTILINE)
        assert len(urls) == 1, out.read_text()
        url = urls[0]
        assert f"/#/experiments/{exp_id}/runs?" in url and "viewStateShareKey=ablate-" in url
        # What the UI's REST answers say: the tags, and that the UI's telemetry is off.
        rest = f"http://127.0.0.1:{port}/ajax-api"
        exp = _get_json(f"{rest}/2.0/mlflow/experiments/get?experiment_id={exp_id}")
        tags = {t["key"]: t["value"] for t in exp["experiment"]["tags"]}
        assert tags[ui.KIND_TAG] == ui.TRAINING_KIND
        assert _get_json(f"{rest}/3.0/mlflow/ui-telemetry")["disable_ui_telemetry"] is True

        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM),
                headless=True, viewport={"width": 1600, "height": 1000},
                args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update",
                      "--disable-sync"])
            try:
                page = browser.new_page()
                page.goto(url)
                page.get_by_text("Group: activation=relu").first.wait_for(timeout=120_000)
                page.get_by_text("val_error", exact=True).first.wait_for(timeout=60_000)
                page.wait_for_timeout(2000)  # let the charts draw
                page.screenshot(path=str(tmp_path / "experiment.png"))
                text = page.inner_text("body")
                final_url = page.url
            finally:
                browser.close()
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            stopped = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert stopped == 0
    assert "workflowType=machine_learning" in final_url
    # The training view, not the GenAI one.
    for genai_only in ("Evaluation runs", "Detect Issues", "Token Usage", "Observability"):
        assert genai_only not in text
    assert "Group by: arm" in text
    assert "Group: activation=relu" in text and "Group: activation=tanh" in text
    assert ui.grid_run_name(load_ablation("relu_vs_tanh").cells(quick=True)) in text
    sections = [text.find(ui.CURVES_SECTION), text.find("Model metrics"),
                text.find("System metrics")]
    assert -1 not in sections and sections == sorted(sections), sections
    charts = [text.find(f"\n{m}\n") for m in ("val_error", "train_error", "val_loss")]
    assert -1 not in charts and charts == sorted(charts), charts
    assert (tmp_path / "experiment.png").stat().st_size > 50_000
    # Quiet: no line per request (the page made dozens), and nothing on stderr but MLflow's
    # one-line security notice (no traceback at Ctrl-C either).
    logs = out.read_text() + err.read_text()
    assert "GET /" not in logs and "POST /" not in logs, logs
    assert len(err.read_text().splitlines()) <= 1, err.read_text()
