"""A cell shared by three ablations (as paper's base cell is by five): trained once, and every
copy names the run that trained it, so that each ablation's ensemble finds the weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BASE = """\
claims: [relu_speed]
base:
  profile: quick
  set:
    model.name: convnet4
    data.synthetic.train_size: 128
    data.synthetic.val_size: 64
    train.epochs: 1
seeds: [0, 1]
"""
AXES = {"act": ("activation", "relu: {model.activation: relu}", "tanh: {model.activation: tanh}"),
        "pool": ("pool", "overlap: {model.pool: overlap}", "nonoverlap: {model.pool: nonoverlap}"),
        "drop": ("dropout", "half: {model.dropout: 0.5}", "none: {model.dropout: 0.0}")}


@pytest.mark.slow
def test_a_cell_shared_by_three_ablations_points_every_copy_at_the_trained_run(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    folder = tmp_path / "ablations"
    folder.mkdir()
    for name, (axis, *arms) in AXES.items():
        (folder / f"{name}.yaml").write_text(
            f"name: {name}\ntitle: {name}\n{BASE}axes:\n  {axis}:\n" + "".join(
                f"    {arm}\n" for arm in arms))
    (folder / "all.yaml").write_text("name: all\ntitle: all\ninclude: [act, pool, drop]\n")
    proc = subprocess.run([sys.executable, "-m", "alexnet", "run", "all", "--jobs", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "12 cells listed, 8 distinct" in proc.stdout
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = [r for name in AXES for r in c.search_runs(
        [c.get_experiment_by_name(name).experiment_id])]
    cells = {r.info.run_id: r for r in runs if r.data.tags.get("ablate.kind") == "cell"}
    copies = [r for r in cells.values() if "ablate.reused_from" in r.data.tags]
    assert len(cells) == 12 and len(copies) == 4
    for copy in copies:
        trained = cells[copy.data.tags["ablate.reused_from"]]
        assert "ablate.reused_from" not in trained.data.tags  # the one that trained, no link
        assert trained.info.experiment_id == copy.data.tags["ablate.reused_from_experiment"]
        assert "weights/model.pt" in [a.path for a in c.list_artifacts(trained.info.run_id,
                                                                        "weights")]
    ensembles = [r for r in runs if r.data.tags.get("ablate.kind") == "ensemble"]
    assert len(ensembles) == 6  # every arm of every ablation, two seeds each
