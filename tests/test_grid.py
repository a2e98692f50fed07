"""A grid across ablations: a cell that two ablations share is trained once and stands in
both; every arm with two or more seeds gets an ensemble run."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import ablate, store_runs

SHARED_BASE = """\
  profile: quick
  set:
    model.name: convnet4
    data.synthetic.train_size: 256
    data.synthetic.val_size: 128
    train.epochs: 1
"""
ACTIVATION = f"""\
name: act
title: activation
claims: [relu_speed]
base:
{SHARED_BASE}axes:
  activation:
    relu: {{model.activation: relu}}
    tanh: {{model.activation: tanh}}
seeds: [0, 1]
"""
POOL = f"""\
name: pool
title: pooling
claims: [overlap_pool]
base:
{SHARED_BASE}axes:
  pool:
    overlap: {{model.pool: overlap}}
    nonoverlap: {{model.pool: nonoverlap}}
seeds: [0, 1]
"""
BOTH = "name: both\ntitle: both\ninclude: [act, pool]\n"


@pytest.mark.slow
def test_a_cell_shared_by_two_ablations_is_trained_once_and_reported_in_both(tmp_path: Path):
    folder = tmp_path / "ablations"
    folder.mkdir()
    for name, text in {"act": ACTIVATION, "pool": POOL, "both": BOTH}.items():
        (folder / f"{name}.yaml").write_text(text)
    result = ablate(tmp_path, "run", "both")
    assert result.returncode == 0, result.stderr
    # relu (act) and overlap (pool) are one config: 8 cells listed, 6 distinct.
    assert "8 cells listed, 6 distinct" in result.stdout

    c, act_runs = store_runs(tmp_path, "act")
    _, pool_runs = store_runs(tmp_path, "pool")
    cells = [r for r in act_runs + pool_runs if r.data.tags.get("ablate.kind") == "cell"]
    assert len(cells) == 8 and all(r.info.status == "FINISHED" for r in cells)
    reused = [r for r in cells if "ablate.reused_from" in r.data.tags]
    trained = [r for r in cells if "ablate.reused_from" not in r.data.tags]
    assert len(trained) == 6 and len(reused) == 2
    by_id = {r.info.run_id: r for r in trained}
    for link in reused:
        original = by_id[link.data.tags["ablate.reused_from"]]
        assert link.data.tags["cell_key"] == original.data.tags["cell_key"]
        assert link.info.experiment_id != original.info.experiment_id
        assert link.data.metrics["final_val_error"] == original.data.metrics["final_val_error"]
        history = [(m.step, m.value) for m in c.get_metric_history(link.info.run_id,
                                                                    "val_error")]
        assert history == [(m.step, m.value) for m in c.get_metric_history(
            original.info.run_id, "val_error")]
    # Both reports use the shared cell, each under its own arm's name.
    for name, arm in (("act", "activation=relu"), ("pool", "pool=overlap")):
        report = ablate(tmp_path, "report", name, "--out", "out")
        assert report.returncode == 0, report.stderr
        text = (tmp_path / "out" / f"{name}.md").read_text()
        shared = next(r for r in cells if r.data.tags["arm"] == arm and r.data.tags["seed"] == "0")
        assert shared.info.run_id in text

    again = ablate(tmp_path, "run", "both")  # everything finished: nothing trains
    assert again.returncode == 0
    assert len(store_runs(tmp_path, "act")[1]) == len(act_runs)


@pytest.mark.slow
def test_every_arm_with_two_seeds_gets_an_ensemble_run(tmp_path: Path):
    folder = tmp_path / "ablations"
    folder.mkdir()
    (folder / "act.yaml").write_text(ACTIVATION)
    assert ablate(tmp_path, "run", "act").returncode == 0
    _, runs = store_runs(tmp_path, "act")
    cells = {r.info.run_id: r for r in runs if r.data.tags.get("ablate.kind") == "cell"}
    ensembles = [r for r in runs if r.data.tags.get("ablate.kind") == "ensemble"]
    assert sorted(e.data.tags["arm"] for e in ensembles) == ["activation=relu",
                                                            "activation=tanh"]
    for e in ensembles:
        members = [cells[i] for i in e.data.tags["members"].split(",")]
        assert {m.data.tags["arm"] for m in members} == {e.data.tags["arm"]}
        assert len(members) == 2 and e.data.tags["split"] == "val"
        assert 0 <= e.data.metrics["ensemble_error"] <= 1
        singles = [m.data.metrics["final_val_error"] for m in members]
        assert e.data.metrics["single_error_mean"] == sum(singles) / len(singles)
    assert ablate(tmp_path, "run", "act").returncode == 0  # the same members: no new one
    _, again = store_runs(tmp_path, "act")
    assert len([r for r in again if r.data.tags.get("ablate.kind") == "ensemble"]) == 2
