"""`--jobs auto`: how many cells share one GPU. The decision is a pure function of measured
numbers, tested here with the numbers a GPU would give (a faked device); the probe that
measures them runs on CUDA only (`gpu`). On a CPU auto is 1, and --tuned on a grid of several
ablations tunes only those that were swept."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from alexnet import packing, store
from alexnet.ablation import load_ablation
from alexnet.cli import app
from alexnet.config import parse_set
from alexnet.errors import ConfigError
from alexnet.packing import Probe, cells_to_fill, choose_jobs, decide, parse_jobs, resolve_jobs

GIB = 2**30


@pytest.mark.parametrize("free, per_cell, util, max_jobs, jobs, limit", [
    # An H200 (about 140 GiB) and a CIFAR cell: the device's idle time decides.
    (130 * GIB, 3 * GIB, 0.30, 8, 4, "utilization"),
    (130 * GIB, 3 * GIB, 0.50, 8, 2, "utilization"),
    (130 * GIB, 3 * GIB, 0.95, 8, 1, "utilization"),  # a 5% gain is not worth a process
    (130 * GIB, 3 * GIB, 0.02, 8, 8, "cpu cores"),
    (130 * GIB, 3 * GIB, 0.02, 4, 4, "cpu cores"),
    # A small or busy GPU: memory decides, with headroom (10 GiB * 0.8 / 3 GiB = 2.7).
    (10 * GIB, 3 * GIB, 0.10, 8, 2, "memory"),
    # Not even one fits: still one (it fails with the allocator's own message).
    (1 * GIB, 3 * GIB, 0.10, 8, 1, "memory"),
])
def test_choose_jobs_fills_the_device_within_memory_and_cores(free, per_cell, util, max_jobs,
                                                              jobs, limit):
    choice = choose_jobs(free, per_cell, util, max_jobs)
    assert (choice.jobs, choice.limit) == (jobs, limit)
    assert choice.max_jobs == max_jobs
    assert choice.by_memory == int(free * packing.HEADROOM // per_cell)


def test_cells_to_fill_stops_when_another_cell_adds_little():
    # k cells keep the device busy min(k*u, 1): with u = 0.3, three reach 0.9 and a fourth
    # adds the last 0.1 (a third of a cell: worth it), a fifth nothing.
    assert cells_to_fill(0.3) == 4
    assert cells_to_fill(1.0) == 1
    assert cells_to_fill(0.0) == 100  # an idle reading is clamped, not a division by zero
    previous = 100
    for percent in range(1, 101):  # busier cells: never more of them
        k = cells_to_fill(percent / 100)
        assert 1 <= k <= previous
        previous = k


def test_choose_jobs_refuses_impossible_measurements():
    with pytest.raises(ValueError):
        choose_jobs(10 * GIB, 0, 0.5, 8)
    with pytest.raises(ValueError):
        choose_jobs(10 * GIB, GIB, 0.5, 0)


def test_decide_says_why_in_one_line():
    probe = Probe(model="alexnet_cifar", device_name="NVIDIA H200", peak_bytes=2 * GIB,
                  free_bytes=130 * GIB, util=0.3, step_seconds=0.004)
    d = decide(probe, 8)
    assert d.jobs == 4
    assert "\n" not in d.reason
    for part in ("--jobs auto: 4 cells at once, limited by utilization", "alexnet_cifar",
                 "2.0 GiB", "NVIDIA H200 busy 30%", "4.0 ms a step", "the CPU cores 8"):
        assert part in d.reason
    blind = decide(Probe("convnet4", "NVIDIA H200", GIB, 130 * GIB, None, 0.002), 8)
    assert blind.jobs == 1 and "utilization cannot be read" in blind.reason


def test_parse_jobs():
    assert parse_jobs("auto") == "auto" and parse_jobs("AUTO") == "auto"
    assert parse_jobs("3") == 3
    for bad in ("0", "-1", "many", "2.5", ""):
        with pytest.raises(ConfigError, match="--jobs .*: give a number of processes"):
            parse_jobs(bad)


def test_max_jobs_for_cpus_leaves_each_job_its_threads():
    assert packing.max_jobs_for_cpus(16) == 8
    assert packing.max_jobs_for_cpus(6) == 3
    assert packing.max_jobs_for_cpus(1) == 1
    assert packing.max_jobs_for_cpus(64) == packing.MAX_AUTO_JOBS


def test_auto_is_one_on_a_cpu_and_a_number_is_kept():
    cells = load_ablation("relu_vs_tanh").cells(quick=True, overrides={"runtime.device": "cpu"})
    assert resolve_jobs("auto", cells) == packing.Decision(1, "")
    assert resolve_jobs(3, cells).jobs == 3


def test_largest_is_the_cell_with_the_most_parameters():
    cells = load_ablation("paper").cells(quick=True)
    assert cells[0].config.model.name == "convnet4"  # relu_vs_tanh comes first
    big = packing.largest(cells)
    assert big.config.model.name == "alexnet_cifar"
    assert big.config.model.towers == 1 and big.config.model.width == pytest.approx(0.125)


def test_bad_jobs_is_one_line_exit_2_and_creates_no_store(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", "relu_vs_tanh", "--quick", "--jobs", "0"])
    assert result.exit_code == 2, result.output
    assert "--jobs '0': give a number of processes (1, 4) or auto" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "mlruns").exists()


# --- --tuned on a grid of several ablations ----------------------------------------------------

SHRINK = ["data.synthetic.train_size=256", "data.synthetic.val_size=128", "train.epochs=1"]


@pytest.mark.slow
def test_tuned_paper_tunes_the_swept_ablation_and_names_the_others(tmp_path, monkeypatch):
    from alexnet.tuned import apply_tuned_where_swept

    monkeypatch.chdir(tmp_path)
    args = ["--quick", *[x for s in SHRINK for x in ("--set", s)]]
    spec = store.storage_spec(None, store.tracking_uri())
    cells = load_ablation("paper").cells(quick=True, seeds=[0], overrides=parse_set(SHRINK))
    with pytest.raises(ConfigError, match="no sweep for arm activation=relu of relu_vs_tanh"):
        apply_tuned_where_swept(cells, spec)  # nothing swept at all: --tuned's own error

    swept = CliRunner().invoke(app, ["sweep", "relu_vs_tanh", *args, "--trials", "1",
                                     "--pruner", "none", "--wd-range", "off"])
    assert swept.exit_code == 0, swept.output
    tuned, untuned = apply_tuned_where_swept(cells, spec)
    members = [m.name for m in load_ablation("paper").members()]
    assert untuned == [m for m in members if m != "relu_vs_tanh"]
    assert [c.ablation for c in tuned] == [c.ablation for c in cells]  # order kept
    for before, after in zip(cells, tuned, strict=True):
        if before.ablation == "relu_vs_tanh":
            assert after.tuned and after.key != before.key
            assert after.config.optim.weight_decay == 0.0  # --wd-range off: none, as Fig. 1
        else:
            assert after is before

    plan = CliRunner().invoke(app, ["run", "paper", *args, "--seeds", "1", "--tuned",
                                    "--dry-run"], env={"COLUMNS": "200"})
    assert plan.exit_code == 0, plan.output
    assert f"--tuned: no sweep for {', '.join(untuned)}; these run at their configured lr " \
           "and weight decay" in plan.output


# --- on a GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_probe_measures_one_cell_on_the_gpu():
    from alexnet.data import open_data

    cells = load_ablation("paper").cells(quick=True, overrides={"runtime.device": "cuda"})
    cell = packing.largest(cells)
    data = open_data(cell.config.data, "cuda")
    p = packing.probe(cell.config, data)
    assert 0 < p.peak_bytes < p.free_bytes
    assert p.util is not None and 0 < p.util <= 1  # nvidia-ml-py is a dependency
    assert 0 < p.step_seconds < 1
    d = resolve_jobs("auto", cells)
    assert 1 <= d.jobs <= packing.MAX_AUTO_JOBS
    assert d.reason.startswith(f"--jobs auto: {d.jobs} cell")
