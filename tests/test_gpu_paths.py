"""What only a GPU exercises, on the real training path: bf16 autocast, channels_last,
torch.compile, `--jobs auto`'s probe, and MLflow's GPU system metrics. All marked `gpu`:
skipped, with the reason, where no CUDA device is visible (`pytest -m gpu` runs them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alexnet.config import build_config
from alexnet.data import open_data
from alexnet.models import build_model_from_config
from alexnet.train import autocast_for, make_optimizer, train_epoch, train_run

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]
TINY = {"model.name": "alexnet_cifar", "data.synthetic.train_size": 512,
        "data.synthetic.val_size": 128, "train.epochs": 2, "runtime.device": "cuda"}


def pythonpath() -> str:
    """This source tree first, then what the environment had (where the requirements may
    live, as on a machine that runs the project from its source tree)."""
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def test_a_cuda_step_runs_in_bf16_on_channels_last_and_keeps_fp32_weights():
    cfg = build_config("quick", TINY)
    device = torch.device("cuda")
    data = open_data(cfg.data, device)
    model = build_model_from_config(cfg.model, data.num_classes).to(device)
    model = model.to(memory_format=torch.channels_last)  # as train_run does on CUDA
    seen: list[tuple[torch.dtype, bool]] = []

    def record(module: torch.nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        seen.append((out.dtype, inputs[0].is_contiguous(memory_format=torch.channels_last)))

    model.features.conv1.register_forward_hook(record)
    loss_sum, wrong, n = train_epoch(model, data.train_batches(1, 32, 0),
                                     make_optimizer(cfg, model), device, cfg, True, None, 0)
    assert n == data.train_size and torch.isfinite(loss_sum).item()
    assert seen and all(s == (torch.bfloat16, True) for s in seen)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.features.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast_for(device, cfg):
        assert model(next(data.eval_batches(8))[0]).dtype == torch.bfloat16


def test_train_run_on_cuda_ends_with_a_channels_last_fp32_model():
    kept: list[torch.nn.Module] = []
    result = train_run(build_config("quick", TINY), on_end=kept.append)
    assert result.status == "finished" and result.device.startswith("cuda")
    [model] = kept
    assert next(model.parameters()).is_cuda
    assert model.features.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_compiled_training_matches_eager():
    eager = train_run(build_config("quick", TINY))
    compiled = train_run(build_config("quick", {**TINY, "runtime.compile": True}))
    assert compiled.status == eager.status == "finished"
    # The same seed, data and steps; bf16 kernels fused differently drift a little.
    assert compiled.history[0].train_loss == pytest.approx(eager.history[0].train_loss, rel=0.05)
    assert compiled.history[-1].train_loss == pytest.approx(eager.history[-1].train_loss, rel=0.1)


def test_a_cuda_grid_picks_its_jobs_and_logs_gpu_system_metrics(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    (tmp_path / "ablations").mkdir()
    (tmp_path / "ablations" / "tiny.yaml").write_text(
        "name: tiny\ntitle: tiny\nclaims: [relu_speed]\nbase:\n  profile: quick\n  set:\n"
        "    model.name: convnet4\n    data.synthetic.train_size: 1024\n    train.epochs: 6\n"
        "axes:\n  activation:\n    relu: {model.activation: relu}\n"
        "    tanh: {model.activation: tanh}\nreference: {activation: relu}\nseeds: [0, 1]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "alexnet", "run", "tiny", "--device", "cuda"], cwd=tmp_path,
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": pythonpath(), "COLUMNS": "200",
             "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--jobs auto: " in proc.stdout  # the probe ran and said what it chose
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = c.get_experiment_by_name("tiny")
    cells = [r for r in c.search_runs([exp.experiment_id])
             if r.data.tags.get("ablate.kind") == "cell"]
    assert len(cells) == 4 and all(r.info.status == "FINISHED" for r in cells)
    for r in cells:
        assert r.data.tags["device"].startswith("cuda")
        assert "system/gpu_0_utilization_percentage" in r.data.metrics
        assert r.data.metrics["system/gpu_0_memory_usage_megabytes"] > 0
