"""A finished cell's model at work: the classifier rebuilt from a run's artifacts, the held-out
predictions a cell logs, its MLflow model, `ablate predict`, `ablate serve` (a real HTTP
server) and `ablate demo` (a real page in headless Chromium)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from alexnet.config import build_config
from alexnet.data import open_data
from alexnet.errors import ConfigError, DataError
from alexnet.models import build_model_from_config
from alexnet.serving.artifacts import HELDOUT_ARTIFACT, MODEL_NAME, read_heldout
from alexnet.serving.classifier import decode_image, load_classifier, preprocess_facts
from alexnet.serving.record import heldout_predictions
from alexnet.serving.runs import match_arm
from alexnet.serving.server import curl_line
from alexnet.train import autocast_for, softmax_probs, use_channels_last

ABLATE = str(Path(sys.executable).parent / "ablate")
REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
TINY = """\
name: tiny
title: one seed of a tiny grid
base:
  profile: quick
  set: {model.name: convnet4, data.synthetic.train_size: 256, data.synthetic.val_size: 64,
        train.epochs: 1}
axes:
  activation:
    relu: {model.activation: relu}
    tanh: {model.activation: tanh}
reference: {activation: relu}
seeds: [0]
"""


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _cell_files(folder: Path, **overrides: object) -> tuple[object, object, Path]:
    """A small net, its data, and a run's three artifacts as a finished cell leaves them."""
    from alexnet.ablation import Cell

    cfg = build_config("quick", {"model.name": "convnet4", "data.synthetic.train_size": 64,
                                 "data.synthetic.val_size": 40, **overrides})
    data = open_data(cfg.data, "cpu")
    torch.manual_seed(0)
    model = build_model_from_config(cfg.model, data.num_classes).eval()
    (folder / "weights").mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    torch.save(model.state_dict(), folder / "weights" / "model.pt")
    (folder / "weights" / "preprocess.json").write_text(
        json.dumps(preprocess_facts(data.classes, data.stats)))
    return Cell("t", {"activation": "relu"}, 0, cfg), data, model


def _as_evaluated(model, cfg, batches) -> torch.Tensor:
    """Softmax outputs as ``evaluate`` computes them: the run's precision and layout."""
    cpu = torch.device("cpu")
    channels_last = use_channels_last(cpu, cfg)
    model = model.to(memory_format=torch.channels_last) if channels_last else model
    with torch.no_grad(), autocast_for(cpu, cfg):
        return torch.cat([softmax_probs(model, x, channels_last).float() for x, _ in batches])


def _load(folder: Path):
    return load_classifier(folder / "config.yaml", folder / "weights" / "model.pt",
                           folder / "weights" / "preprocess.json", device="cpu")


# --- the classifier ----------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, {"data.image_size": 40, "data.ten_crop": True}])
def test_raw_images_get_exactly_the_predictions_evaluation_counted(tmp_path, overrides):
    cell, data, model = _cell_files(tmp_path, **overrides)
    classifier = _load(tmp_path)
    assert classifier.input_size == cell.config.data.image_size
    # the data pipeline's normalised crops, as `evaluate` scores them
    expected = _as_evaluated(model, cell.config, data.eval_batches(16))
    raw = data.val_images  # uint8, the size the cell trained on
    assert torch.allclose(classifier.probabilities(raw), expected, atol=1e-5)
    # An image file of a validation image (PNG is lossless) is the same input.
    png = _png(raw[3].permute(1, 2, 0).numpy())
    [one] = classifier.predict(torch.stack([classifier.read(png, "x.png")]))
    assert one.label == data.classes[int(expected[3].argmax())]
    assert abs(sum(one.probabilities.values()) - 1) < 1e-5
    probs = [p for _, p in one.top]
    assert len(one.top) == 5 and probs == sorted(probs, reverse=True)
    assert all(one.probabilities[c] == p for c, p in one.top)


def test_bad_images_are_one_line_errors_before_any_pixel_is_decoded(tmp_path):
    _, _, _ = _cell_files(tmp_path)
    classifier = _load(tmp_path)
    with pytest.raises(DataError, match=r"^a\.txt is not an image PIL can read") as err:
        classifier.read(b"hello, not an image", "a.txt")
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"^b\.png is 40×32; this model takes 32×32 images"):
        classifier.read(_png(np.zeros((32, 40, 3), np.uint8)), "b.png")
    # A 12000×12000 PNG (a few kB on disk, 430 MB decoded) fails on its header, at once; one
    # that PIL takes for a decompression bomb too.
    for side, message in ((12_000, "huge.png is 12000×12000"),
                          (20_000, "huge.png is too large to decode")):
        buffer = io.BytesIO()
        Image.new("1", (side, side)).save(buffer, format="PNG")
        started = time.perf_counter()
        with pytest.warns() if side == 12_000 else contextlib.nullcontext(), \
                pytest.raises(DataError, match=message):
            classifier.read(buffer.getvalue(), "huge.png")
        assert time.perf_counter() - started < 1.0
    truncated = _png(np.full((32, 32, 3), 7, np.uint8))[:60]
    with pytest.raises(DataError, match="c.png"):
        classifier.read(truncated, "c.png")
    # Greyscale and RGBA files of the right size are read as RGB.
    assert decode_image(_png(np.zeros((32, 32), np.uint8)), "g").shape == (3, 32, 32)


def test_a_config_from_another_version_is_a_config_error(tmp_path):
    _cell_files(tmp_path)
    text = (tmp_path / "config.yaml").read_text().replace("model:", "model:\n  depth: 9", 1)
    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match="config.yaml: model.depth"):
        _load(tmp_path)


# --- held-out predictions -------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, {"data.image_size": 40, "data.ten_crop": True}])
def test_heldout_predictions_keep_the_wrong_images_pixel_for_pixel(tmp_path, overrides):
    cell, data, model = _cell_files(tmp_path, **overrides)
    held = heldout_predictions(cell, model, data)
    probs = _as_evaluated(model, cell.config, data.eval_batches(16))
    assert str(held["split"]) == "val" and list(held["classes"]) == data.classes
    np.testing.assert_array_equal(held["label"], data.val_labels.numpy())
    np.testing.assert_array_equal(held["predicted"], probs.argmax(1).numpy())
    np.testing.assert_allclose(held["confidence"], probs.max(1).values.numpy(), atol=1e-6)
    wrong = np.flatnonzero(held["predicted"] != held["label"])
    assert 0 < len(wrong) < 40  # an untrained net gets some right, some wrong
    np.testing.assert_array_equal(held["pool_index"], wrong)  # all 40 are in the pool
    crop = cell.config.data.crop_size
    top = (cell.config.data.image_size - crop) // 2
    centre = data.val_images[:, :, top:top + crop, top:top + crop].permute(0, 2, 3, 1)
    np.testing.assert_array_equal(held["pool_images"], centre[wrong].numpy())
    # What is logged reads back as plain arrays.
    np.savez_compressed(tmp_path / "h.npz", **held)
    again = read_heldout(tmp_path / "h.npz")
    assert again.keys() == held.keys()
    np.testing.assert_array_equal(again["pool_images"], held["pool_images"])


def test_model_logging_is_a_runtime_switch_outside_the_cell_key():
    on = build_config("quick")
    off = build_config("quick", {"runtime.log_model": False})
    assert on.runtime.log_model and not off.runtime.log_model
    assert on.key() == off.key()  # a cell trained without its model is the same cell


# --- naming a cell -------------------------------------------------------------------------


def test_an_arm_is_named_by_its_label_or_its_values():
    labels = ["norm=lrn,pool=overlap", "norm=lrn,pool=nonoverlap", "norm=none,pool=overlap"]
    assert match_arm("lrn,overlap", labels, "x") == "norm=lrn,pool=overlap"
    assert match_arm("norm=none,pool=overlap", labels, "x") == "norm=none,pool=overlap"
    assert match_arm("none", labels, "x") == "norm=none,pool=overlap"
    with pytest.raises(ConfigError, match="--arm lrn matches 2 arms of x"):
        match_arm("lrn", labels, "x")
    with pytest.raises(ConfigError, match="--arm bn: x has no such arm; choose one of: "
                                          "lrn,overlap, lrn,nonoverlap, none,overlap"):
        match_arm("bn", labels, "x")


def test_the_curl_line_posts_the_file_base64_encoded(tmp_path):
    """The printed line, run by a shell against a listener, sends the JSON the scoring
    server reads: dataframe_records with the file's bytes, base64."""
    image = _png(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3))
    (tmp_path / "my cat.png").write_bytes(image)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        line = curl_line("0.0.0.0", port, "my cat.png")
        assert line.startswith(f"curl -s http://127.0.0.1:{port}/invocations ")
        proc = subprocess.Popen(["bash", "-c", line + " --max-time 5"], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(10)
            request = b""
            while b"\r\n\r\n" not in request or len(request.split(b"\r\n\r\n", 1)[1]) < int(
                    request.split(b"Content-Length: ", 1)[1].split(b"\r\n")[0]):
                request += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        proc.wait(timeout=10)
    head, body = request.split(b"\r\n\r\n", 1)
    assert b"Content-Type: application/json" in head
    import base64

    [record] = json.loads(body)["dataframe_records"]
    assert base64.b64decode(record["image"]) == image


# --- a real grid: its MLflow model, predict, serve ----------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return {**env, "COLUMNS": "200"}


def _ablate(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([ABLATE, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=_env())


@pytest.fixture(scope="module")
def quick_grid(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`ablate run relu_vs_tanh --quick` (one seed), and a 32×32 image."""
    root = tmp_path_factory.mktemp("quick")
    done = _ablate(root, "run", "relu_vs_tanh", "--quick", "--seeds", "1")
    assert done.returncode == 0, done.stderr
    assert os.listdir(root) == ["mlruns"]  # nothing written beside the store
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:24, 8:24] = (250, 200, 20)
    (root / "image.png").write_bytes(_png(image))
    (root / "wide.png").write_bytes(_png(np.zeros((32, 48, 3), np.uint8)))
    (root / "notes.png").write_text("not an image")
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    exp = c.get_experiment_by_name("relu_vs_tanh")
    runs = {r.data.tags["arm"]: r for r in c.search_runs(
        [exp.experiment_id], "tags.`ablate.kind` = 'cell'")}
    return {"root": root, "client": c, "runs": runs}


def _predict(root: Path, *args: str) -> list[dict]:
    out = _ablate(root, "predict", *args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.slow
def test_each_cell_logs_a_pickle_free_mlflow_model_that_predicts_as_ablate_predict(quick_grid):
    import mlflow.pyfunc
    import pandas as pd

    c, root = quick_grid["client"], quick_grid["root"]
    run = quick_grid["runs"]["activation=relu"]
    names = {a.path for a in c.list_artifacts(run.info.run_id, "heldout")}
    assert names == {HELDOUT_ARTIFACT}
    [logged] = c.search_logged_models(  # what runs:/<id>/model names (`ablate serve` test)
        [run.info.experiment_id],
        filter_string=f"name = '{MODEL_NAME}' AND source_run_id = '{run.info.run_id}'")
    folder = Path(urlparse(logged.artifact_location).path)
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pth", ".cloudpickle"))]
    assert {"MLmodel", "pyfunc_model.py", "artifacts/model.pt", "artifacts/config.yaml",
            "artifacts/preprocess.json"} <= files
    assert (folder / "pyfunc_model.py").read_text() == (
        REPO / "alexnet" / "serving" / "pyfunc_model.py").read_text()
    model = mlflow.pyfunc.load_model(str(folder))
    assert [i.name for i in model.metadata.get_input_schema().inputs] == ["image"]
    answer = model.predict(pd.DataFrame({"image": [(root / "image.png").read_bytes()]}))
    [mine] = _predict(root, "relu_vs_tanh", "--arm", "relu", "image.png")
    assert answer[0]["class"] == mine["class"]
    assert answer[0]["probabilities"] == pytest.approx(mine["probabilities"], abs=1e-6)


@pytest.mark.slow
def test_predict_by_run_id_and_bad_input_is_one_line_exit_2(quick_grid):
    root = quick_grid["root"]
    tanh = quick_grid["runs"]["activation=tanh"].info.run_id
    [by_id] = _predict(root, tanh, "image.png")
    [by_arm] = _predict(root, "relu_vs_tanh", "--arm", "activation=tanh", "--seed", "0",
                        "image.png")
    assert by_id == by_arm and by_id["run_id"] == tanh
    text = _ablate(root, "predict", "relu_vs_tanh", "--arm", "relu", "image.png")
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert lines[0].startswith("relu_vs_tanh activation=relu seed 0 (run ")
    assert lines[1] == "image.png" and len(lines) == 7 and lines[2].lstrip().startswith("1. ")
    for args, message in [
        (("relu_vs_tanh", "--arm", "gelu", "image.png"),
         "--arm gelu: relu_vs_tanh has no such arm"),
        (("relu_vs_tanh", "--arm", "relu", "--seed", "4", "image.png"),
         "relu_vs_tanh activation=relu seed 4 has no finished run"),
        (("relu_vs_tanh", "--arm", "relu", "wide.png"), "wide.png is 48×32"),
        (("relu_vs_tanh", "--arm", "relu", "image.png", "notes.png"), "notes.png is not an image"),
        (("relu_vs_tanh", "--arm", "relu", "nothing.png"), "nothing.png: no such file"),
        (("relu_vs_tanh", "image.png"), "--arm is needed"),
        (("0" * 32, "image.png"), f"no run {'0' * 32}"),
        (("normalization", "--arm", "lrn", "image.png"), "no runs of ablation normalization"),
    ]:
        out = _ablate(root, "predict", *args)
        assert out.returncode == 2, (args, out.stderr)
        # One line, and nothing printed for the good image before the bad one.
        assert out.stdout == "" and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert message in out.stderr, out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                     data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


@pytest.mark.slow
def test_ablate_serve_answers_a_real_post_as_ablate_predict_does(quick_grid):
    import base64

    root = quick_grid["root"]
    port = _free_port()
    out, err = root / "serve.out", root / "serve.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        server = subprocess.Popen([ABLATE, "serve", "relu_vs_tanh", "--arm", "relu",
                                   "--port", str(port)], cwd=root, env=_env(), stdout=stdout,
                                  stderr=stderr, start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert time.time() < deadline and server.poll() is None, err.read_text()
                time.sleep(0.5)
        # The curl line it printed, as a user would paste it.
        [line] = [x.strip() for x in out.read_text().splitlines() if x.strip().startswith("curl")]
        answer = json.loads(subprocess.run(["bash", "-c", line], cwd=root, capture_output=True,
                                           text=True, timeout=60, check=True).stdout)
        [served] = answer["predictions"]
        assert sum(served["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        [predicted] = _predict(root, "relu_vs_tanh", "--arm", "relu", "image.png")
        assert served["class"] == predicted["class"] == served["top5"][0]["class"]
        assert served["probabilities"] == pytest.approx(predicted["probabilities"], abs=1e-6)
        # {"inputs": ...} with base64 text reaches the model too; a wrong image is a 400 with
        # our one line, and the server goes on answering.
        text = base64.b64encode((root / "image.png").read_bytes()).decode()
        code, body = _post(port, {"inputs": {"image": [text]}})
        assert code == 200 and body["predictions"][0]["class"] == served["class"]
        wide = base64.b64encode((root / "wide.png").read_bytes()).decode()
        code, body = _post(port, {"dataframe_records": [{"image": wide}]})
        assert code == 400 and "image 0 is 48×32; this model takes 32×32 images" in \
            body["message"]
        code, _ = _post(port, {"dataframe_records": [{"image": text}]})
        assert code == 200
    finally:
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            raise
    assert code == 0, err.read_text()
    assert "runs:/" in out.read_text() and "it takes 32×32 images" in out.read_text()


@pytest.mark.slow
def test_serve_names_what_is_wrong_in_one_line(quick_grid):
    root = quick_grid["root"]
    for args, message in [
        (("relu_vs_tanh", "--arm", "tan"), "--arm tan: relu_vs_tanh has no such arm"),
        (("relu_vs_tanh", "--arm", "relu", "--seed", "2"), "has no finished run"),
    ]:
        out = _ablate(root, "serve", *args, "--port", str(_free_port()))
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert message in out.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _ablate(root, "serve", "relu_vs_tanh", "--arm", "relu", "--port", str(port))
    assert out.returncode == 2 and f"port {port} on 127.0.0.1 is in use" in out.stderr


@pytest.mark.slow
def test_with_model_logging_off_predict_works_and_serve_says_why_not(tmp_path):
    (tmp_path / "ablations").mkdir()
    (tmp_path / "ablations" / "tiny.yaml").write_text(TINY)
    done = _ablate(tmp_path, "run", "tiny", "--set", "runtime.log_model=false")
    assert done.returncode == 0, done.stderr
    (tmp_path / "image.png").write_bytes(_png(np.zeros((32, 32, 3), np.uint8)))
    [answer] = _predict(tmp_path, "tiny", "--arm", "relu", "image.png")
    assert sum(answer["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    out = _ablate(tmp_path, "serve", "tiny", "--arm", "relu", "--port", str(_free_port()))
    assert out.returncode == 2 and "logged no MLflow model" in out.stderr
    assert "runtime.log_model=false" in out.stderr
    assert not list((tmp_path / "mlruns").rglob("MLmodel"))


# --- the demo page, in a real browser -------------------------------------------------------


@pytest.mark.browser
def test_the_demo_page_shows_both_arms_top5_for_a_dropped_image(quick_grid):
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}; apt-get install -y chromium")
    pytest.importorskip("streamlit", reason="the demo extra: pip install -e .[demo]")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is in the dev extra: pip install -e .[dev]")
    root = quick_grid["root"]
    [relu] = _predict(root, "relu_vs_tanh", "--arm", "relu", "image.png")
    [tanh] = _predict(root, "relu_vs_tanh", "--arm", "tanh", "image.png")
    port = _free_port()
    out, err = root / "demo.out", root / "demo.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        demo = subprocess.Popen([ABLATE, "demo", "relu_vs_tanh", "--port", str(port)], cwd=root,
                                env=_env(), stdout=stdout, stderr=stderr,
                                start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health",
                                            timeout=2):
                    break
            except OSError:
                assert time.time() < deadline and demo.poll() is None, err.read_text()
                time.sleep(0.5)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(
                str(root / "chromium-profile"), executable_path=str(CHROMIUM), headless=True,
                viewport={"width": 1400, "height": 1000},
                args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update",
                      "--disable-sync"])
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{port}")
                page.locator("input[type=file]").set_input_files(str(root / "image.png"))
                page.get_by_text("activation=tanh", exact=True).wait_for(timeout=120_000)
                page.get_by_text(f"1. {tanh['class']} — ").first.wait_for(timeout=120_000)
                last = tanh["top5"][-1]  # Streamlit draws line by line: wait for the last one
                page.get_by_text(f"5. {last['class']} — {100 * last['probability']:.1f}%"
                                 ).first.wait_for(timeout=60_000)
                page.screenshot(path=str(root / "demo.png"), full_page=True)
                text = page.inner_text("body")
                page.locator("input[type=file]").set_input_files(str(root / "wide.png"))
                page.get_by_text("wide.png is 48×32").first.wait_for(timeout=60_000)
            finally:
                browser.close()
    finally:
        os.killpg(demo.pid, signal.SIGINT)
        code = demo.wait(timeout=60)
    assert code == 0
    for arm, answer in (("activation=relu", relu), ("activation=tanh", tanh)):
        block = text.split(arm, 1)[1]
        for rank, entry in enumerate(answer["top5"], 1):
            assert f"{rank}. {entry['class']} — {100 * entry['probability']:.1f}%" in block
    assert text.index("activation=relu") < text.index("activation=tanh")
    assert (root / "demo.png").stat().st_size > 20_000


@pytest.mark.slow
def test_demo_names_what_is_wrong_in_one_line(quick_grid):
    import importlib.util

    installed = importlib.util.find_spec("streamlit") is not None
    out = _ablate(quick_grid["root"], "demo", "normalization", "--port", str(_free_port()))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert ("ablation normalization has no finished run" if installed
            else "`ablate demo` needs Streamlit") in out.stderr
