"""Nothing lost, nothing doubled, nothing executed: cells claimed atomically by concurrent
processes, safe checkpoints, crash-safe stores, SIGTERM like Ctrl-C, and one line for a
broken store."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import torch
from test_cli import ABLATE, children, store_runs, tiny

# One thread per process, for every process of this module alike: many run at once here,
# and a run's numbers depend on its thread count (reductions split differently), so a
# reference and a resumed store must be made with the same one.
ENV = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}


def ablate(cwd: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([ABLATE, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def start(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([ABLATE, "run", "tiny", *args], cwd=cwd, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(path_glob: tuple[Path, str], timeout: float = 180) -> Path:
    folder, pattern = path_glob
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(folder.rglob(pattern)) if folder.exists() else []
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"nothing matched {pattern} in {folder}")


def exactly_once(cwd: Path) -> dict[str, dict[str, float]]:
    """Every cell of the store has one FINISHED run, and no run is RUNNING (parents too)."""
    _, runs = store_runs(cwd)
    cells = children(runs)
    keys = [r.data.tags["cell_key"] for r in cells if r.info.status == "FINISHED"]
    assert len(keys) == len(set(keys)), "a cell finished twice"
    assert not [r for r in runs if r.info.status == "RUNNING"]
    return {r.data.tags["cell_key"]: r.data.metrics for r in cells
            if r.info.status == "FINISHED"}


@pytest.mark.slow
def test_a_planted_pickle_at_a_cell_checkpoint_never_runs_and_the_cell_retrains(tmp_path):
    tiny(tmp_path, seeds=(0,), epochs=4, train=1024)
    proc = start(tmp_path)
    ckpt = wait_for((tmp_path / "mlruns" / "artifacts", "resume/checkpoint.pt"))
    proc.kill()
    proc.communicate()
    marker = tmp_path / "payload-ran"
    torch.save({"format": 1, "payload": _Payload(marker)}, ckpt)  # unpickling runs `touch`
    rerun = ablate(tmp_path, "run", "tiny")
    assert rerun.returncode == 0, rerun.stderr
    assert not marker.exists()
    warned = [line for line in rerun.stderr.splitlines() if "is never loaded" in line]
    assert len(warned) == 1 and str(ckpt) in warned[0] and "training from the start" in warned[0]
    assert len(exactly_once(tmp_path)) == 2


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [1, 2])
def test_processes_started_together_train_every_cell_exactly_once(tmp_path, jobs):
    """4 processes of one grid (or 2 with --jobs 2 each) on one new store."""
    tiny(tmp_path, seeds=(0, 1, 2))
    procs = [start(tmp_path, "--jobs", str(jobs)) for _ in range(4 // jobs)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, out + err
        assert "Traceback" not in err, err
    assert len(exactly_once(tmp_path)) == 6


@pytest.mark.slow
def test_sigterm_is_ctrl_c_one_line_exit_143_and_the_rerun_resumes(tmp_path):
    tiny(tmp_path, seeds=(0,), epochs=4, train=1024)
    proc = start(tmp_path)
    wait_for((tmp_path / "mlruns" / "artifacts", "resume/checkpoint.pt"))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("interrupted (SIGTERM)") and "resumes" in lines[-1]
    assert "Traceback" not in err
    _, runs = store_runs(tmp_path)
    statuses = {r.data.tags["ablate.kind"]: r.info.status for r in runs
                if r.info.status != "FINISHED"}
    assert statuses == {"cell": "KILLED", "grid": "KILLED"}
    assert ablate(tmp_path, "run", "tiny").returncode == 0
    _, after = store_runs(tmp_path)
    resumed = [r for r in children(after) if r.info.status == "FINISHED"]
    assert len(resumed) == 2 and len(children(after)) == 2  # the killed run was reopened


@pytest.mark.slow
def test_twenty_sigkills_at_random_times_never_break_the_store(tmp_path):
    """Killed anywhere from the first instant of a new store to the end of the grid, a rerun
    finishes with one FINISHED run per cell, the numbers of an uninterrupted run, and
    nothing left RUNNING."""
    clean = tmp_path / "clean"
    tiny(clean, seeds=(0,), epochs=3, train=512)
    t0 = time.time()
    assert ablate(clean, "run", "tiny").returncode == 0
    whole = time.time() - t0
    reference = exactly_once(clean)
    rng = random.Random(0)
    for i in range(20):
        folder = tmp_path / f"kill{i}"
        tiny(folder, seeds=(0,), epochs=3, train=512)
        proc = start(folder)
        time.sleep(rng.uniform(0, 1) if i < 5 else rng.uniform(0, whole))
        proc.kill()
        proc.communicate()
        rerun = ablate(folder, "run", "tiny")
        assert rerun.returncode == 0, f"kill {i}: {rerun.stderr}"
        got = exactly_once(folder)
        assert got.keys() == reference.keys(), f"kill {i}"
        for key, metrics in got.items():
            for name in ("final_val_error", "final_train_loss", "final_val_loss"):
                assert metrics[name] == reference[key][name], f"kill {i}: {name}"


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_broken_store_is_one_line_naming_the_file(tmp_path, damage):
    tiny(tmp_path, seeds=(0,), epochs=1)
    assert ablate(tmp_path, "run", "tiny").returncode == 0
    db = tmp_path / "mlruns" / "mlflow.db"
    if damage == "garbage":
        db.write_bytes(b"this is not a database" * 100)
    else:
        db.write_bytes(db.read_bytes()[:8192])
    before = db.read_bytes()
    for args in (["run", "tiny"], ["report", "tiny", "--out", "out"], ["show", "tiny"]):
        result = ablate(tmp_path, *args)
        assert result.returncode == 2, (args, result.stderr)
        [line] = result.stderr.strip().splitlines()
        assert str(db) in line and "move it aside" in line and "Traceback" not in line
    assert db.read_bytes() == before


@pytest.mark.slow
def test_a_half_migrated_store_from_an_old_crash_is_one_line(tmp_path):
    """What an interrupted migration used to leave: alembic's temporary table."""
    tiny(tmp_path, seeds=(0,), epochs=1)
    assert ablate(tmp_path, "run", "tiny").returncode == 0
    db = tmp_path / "mlruns" / "mlflow.db"
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM alembic_version")
    result = ablate(tmp_path, "run", "tiny")
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert str(db) in line


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="chattr +i (an immutable store) needs root")
def test_reading_a_read_only_store_needs_no_write(tmp_path):
    tiny(tmp_path, seeds=(0,), epochs=1)
    assert ablate(tmp_path, "run", "tiny").returncode == 0
    store = tmp_path / "mlruns"
    files = [store, *store.rglob("*")]
    subprocess.run(["chattr", "+i", *map(str, files)], check=True)
    try:
        report = ablate(tmp_path, "report", "tiny", "--out", "out")
        assert report.returncode == 0, report.stderr
        assert (tmp_path / "out" / "tiny.md").exists()
        shown = ablate(tmp_path, "show", "tiny")
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.count("finished") == 2
    finally:
        subprocess.run(["chattr", "-i", *map(str, files)], check=True)
