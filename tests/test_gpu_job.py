"""benchmarks/gpu_job.sh: the whole GPU job, run end to end on a CPU at its --tiny size (slow:
minutes), and its Python parts (benchmarks/gpu_job.py): the archive's limit, the summary."""

from __future__ import annotations

import importlib.util
import os
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from alexnet.ablation import load_ablation

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "benchmarks" / "gpu_job.sh"
MIB = 2**20


def pythonpath() -> str:
    """This source tree first, then what the environment had (where the requirements may
    live, as on a machine that runs the project from its source tree)."""
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="module")
def tools():
    spec = importlib.util.spec_from_file_location("gpu_job_tools", JOB.with_suffix(".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def job(state: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "STATE": str(state), "OUT": str(state / "out"),
           "PYTHON": sys.executable, "PYTHONPATH": pythonpath(), "COLUMNS": "160"}
    return subprocess.run(["bash", str(JOB), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_unknown_step_is_one_line_exit_2_and_help_is_the_header(tmp_path: Path):
    bad = job(tmp_path / "state", "--tiny", "bench", "benchmark")
    assert bad.returncode == 2
    assert bad.stderr == ("error: unknown argument 'benchmark'; steps: tests bench packing "
                          "sweep paper reports pack, or --tiny, --redo\n")
    assert not (tmp_path / "state").exists()  # nothing made before the arguments are good
    shown = job(tmp_path / "state", "--help")
    assert shown.returncode == 0
    assert shown.stdout.startswith("The whole GPU job:")
    assert "JOB_LIMIT" in shown.stdout and "set -euo" not in shown.stdout


def test_the_paper_grid_waits_for_its_sweep(tmp_path: Path):
    early = job(tmp_path / "state", "--tiny", "paper")
    assert early.returncode == 3
    assert early.stdout.rstrip().endswith(
        f"paper: waits for sweep, which has not finished; run: bash {JOB} --tiny sweep paper")
    assert not (tmp_path / "state" / "mlruns" / "mlflow.db").exists()


def test_pack_drops_the_logs_before_going_over_the_limit_and_fails_past_it(tools, tmp_path):
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    (state / "reports").mkdir()
    (state / "reports" / "paper.md").write_text("# The paper's claims, measured\n")
    (state / "logs" / "paper.log").write_text(  # incompressible: 2 MiB of hex, 1 MiB packed
        "\n".join(os.urandom(512).hex() for _ in range(2048)))
    archive = tmp_path / "out" / "results.tar.gz"
    size = tools.pack(state, archive, limit=MIB // 2)
    assert size == archive.stat().st_size <= MIB // 2
    with tarfile.open(archive) as tar:
        assert tar.getnames() == ["reports", "reports/paper.md"]
    assert tools.pack(state, archive, limit=2 * MIB) > MIB  # room for the logs: kept
    with tarfile.open(archive) as tar:
        assert "logs/paper.log" in tar.getnames()
    (state / "reports" / "figure.png").write_bytes(os.urandom(MIB))
    with pytest.raises(SystemExit, match="even without the logs; at most 0.5 MiB come back"):
        tools.pack(state, archive, limit=MIB // 2)
    with tarfile.open(archive) as tar:  # the last good archive is left as it was
        assert "reports/figure.png" not in tar.getnames()
    assert tools.MAX_ARCHIVE_BYTES == 16 * MIB  # what a GPU machine sends back, per file


def test_summary_adds_up_every_attempt_of_step_4(tools, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "times.tsv").write_text(
        "step\tstarted\tseconds\texit\n"
        "bench\tt\t250.0\t0\n"
        "paper\tt\t540.2\t124\n"  # stopped by the time limit, then resumed
        "sweep\tt\t150.4\t0\n"
        "paper\tt\t60.1\t0\n"
        "reports\tt\t40.0\t0\n")
    text = tools.summary(tmp_path, "full")
    assert "| paper | 2 | 600 | 0 |" in text and "| bench | 1 | 250 | 0 |" in text
    assert text.rstrip().endswith("(sweep + paper + reports): 791 s wall (13.2 min); "
                                  "target <= 10 min: MISSED")
    assert tools.summary(tmp_path, "tiny").rstrip().endswith(
        "a tiny run; the target is for the full job on a GPU")


@pytest.mark.slow
def test_the_tiny_job_runs_every_step_and_packs_one_archive(tmp_path: Path):
    state = tmp_path / "state"
    started = time.perf_counter()
    first = job(state, "--tiny", timeout=1800)
    seconds = time.perf_counter() - started
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    print(f"the --tiny job took {seconds:.0f} s")
    for step in ("tests", "bench", "packing", "sweep", "paper", "reports", "pack"):
        assert f"{step}: done in" in first.stdout

    archive = state / "out" / "gpu-job-results.tar.gz"
    assert 0 < archive.stat().st_size <= 16 * MIB
    unpacked = tmp_path / "unpacked"
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        tar.extractall(unpacked, filter="data")
    assert not [n for n in names if n.endswith(".pt") or "/artifacts" in n]  # no weights
    paper = load_ablation("paper")
    members = [m.name for m in paper.members()]
    for name in ["paper", *members]:
        assert f"reports/{name}.md" in names
        assert any(n.startswith(f"reports/{name}/") and n.endswith(".png") for n in names)
    results = (unpacked / "results" / "RESULTS.md").read_text()
    for marker in ("gpu-benchmark", "gpu-packing", "gpu-job"):
        assert f"<!-- {marker}:start -->" in results and f"<!-- {marker}:end -->" in results
    assert "Step 4, the paper table" in (unpacked / "results" / "gpu-job.md").read_text()

    # The database alone is the store the reports were written from: every ablation's cells,
    # the sweep's trials, and the reports can be written again from it.
    db = unpacked / "mlruns" / "mlflow.db"
    with sqlite3.connect(db) as con:
        experiments = {n for (n,) in con.execute("select name from experiments")}
        kinds = dict(con.execute("select value, count(*) from tags where key = "
                                 "'ablate.kind' group by value"))
    assert set(members) <= experiments
    assert kinds["cell"] == len(paper.cells(seeds=[0, 1]))  # every ablation's copy of its cells
    assert kinds["trial"] >= 2 and kinds["ensemble"] >= len(members)
    again = subprocess.run(
        [sys.executable, "-m", "alexnet", "report", "relu_vs_tanh", "--out", "again",
         "--tracking-uri", f"sqlite:///{db}"], cwd=tmp_path, capture_output=True, text=True,
        timeout=300, env={**os.environ, "PYTHONPATH": pythonpath(), "MPLBACKEND": "Agg"})
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "again" / "relu_vs_tanh.md").read_text().split("\n")[0] == \
        (unpacked / "reports" / "relu_vs_tanh.md").read_text().split("\n")[0]

    rerun = job(state, "--tiny", timeout=300)  # every step finished: nothing runs again
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rerun.stdout.count("finished before; skipped") == 7
