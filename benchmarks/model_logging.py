"""What logging a finished cell's model costs: time and bytes, per cell.

    python benchmarks/model_logging.py                      # a cell of relu_vs_tanh --quick
    python benchmarks/model_logging.py --paper-alexnet      # the paper's 61 M-parameter net

The same calls a finished cell makes (``serving.record``), into a fresh local store, on an
untrained net of the chosen size: the held-out predictions (one more pass over the held-out
split, plus the kept images) and the MLflow model (a pyfunc "model from code" holding the
config, the state dict and the preprocessing facts). Each is timed ``--repeats`` times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from alexnet import store, tracking
from alexnet.ablation import Cell, load_ablation
from alexnet.config import build_config
from alexnet.models import build_model_from_config
from alexnet.runner import WEIGHTS_ARTIFACT, open_data_once
from alexnet.serving.artifacts import CONFIG_ARTIFACT, PREPROCESS_ARTIFACT
from alexnet.serving.classifier import preprocess_facts
from alexnet.serving.record import heldout_predictions, log_mlflow_model

PAPER = {"model.name": "alexnet", "model.towers": 2, "data.image_size": 256,
         "data.crop_size": 227, "data.crop_padding": 0, "data.synthetic.image_size": 256,
         "data.synthetic.num_classes": 1000, "data.synthetic.train_size": 1000,
         "data.synthetic.val_size": 256, "train.eval_batch_size": 64, "runtime.device": "cpu"}


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() \
        else path.stat().st_size


def elapsed(started: tuple[float, float]) -> tuple[float, float]:
    """(wall, CPU) seconds since ``started``; CPU time is all threads of this process, and
    says more than wall time on a machine shared with other work."""
    return time.perf_counter() - started[0], time.process_time() - started[1]


def seconds(samples: list[tuple[float, float]]) -> str:
    wall = statistics.median(s[0] for s in samples)
    cpu = statistics.median(s[1] for s in samples)
    return f"{wall:.2f} s wall, {cpu:.2f} s CPU (medians of {len(samples)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paper-alexnet", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.paper_alexnet:
        cell = Cell("bench", {"net": "alexnet"}, 0, build_config("quick", PAPER))
    else:
        cell = load_ablation("relu_vs_tanh").cells(quick=True, seeds=[0])[0]
    cfg = cell.config
    data = open_data_once(cell)
    model = build_model_from_config(cfg.model, data.num_classes).eval()
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        uri = f"sqlite:///{root / 'mlruns' / store.DB_NAME}"
        (root / "mlruns").mkdir()
        c = store.client(uri)
        exp = tracking.get_experiment_id(c, uri, cell.ablation)
        folder = root / "artifacts"
        (folder / "weights").mkdir(parents=True)
        (folder / CONFIG_ARTIFACT).write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        started = time.perf_counter()
        torch.save(model.state_dict(), folder / WEIGHTS_ARTIFACT)
        save_s = time.perf_counter() - started
        (folder / PREPROCESS_ARTIFACT).write_text(
            json.dumps(preprocess_facts(data.classes, data.stats)))
        held_s, model_s = [], []
        for _ in range(args.repeats):
            started = time.perf_counter(), time.process_time()
            held = heldout_predictions(cell, model, data)
            held_s.append(elapsed(started))
            run_id = c.create_run(exp).info.run_id
            started = time.perf_counter(), time.process_time()
            log_mlflow_model(c, run_id, cell, folder, folder / WEIGHTS_ARTIFACT)
            model_s.append(elapsed(started))
        import numpy as np

        np.savez_compressed(root / "held.npz", **held)
        models = root / "mlruns" / "artifacts" / cell.ablation / "models"
        one_model = next(models.iterdir())
        print(f"net: {cfg.model.name}, {params:,} parameters, input {cfg.data.image_size}px; "
              f"held-out split: {len(held['label'])} images")
        print(f"state dict: {size(folder / WEIGHTS_ARTIFACT) / 2**20:.1f} MiB, "
              f"torch.save {save_s:.2f} s (the runner's, already paid)")
        print(f"held-out predictions: {seconds(held_s)}, "
              f"{size(root / 'held.npz') / 2**10:.0f} KiB")
        print(f"MLflow model: {seconds(model_s)}, {size(one_model) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
