"""benchmarks/gpu.py on the CPU: a --quick run gives the table, skips the data rows without
the image folder, and --write-results writes between the markers of the file it is given."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    """benchmarks/gpu.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def table_rows(markdown: str) -> list[dict[str, str]]:
    """The markdown table's body as dicts keyed by its header."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    header, body = split[0], split[2:]  # split[1] is the |:---| line
    return [dict(zip(header, cells, strict=True)) for cells in body]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("gpu-benchmark")
    results = tmp / "RESULTS.md"
    results.write_text("# Results\n\nwritten by hand, kept as is\n")
    real_results = REPO / "benchmarks" / "RESULTS.md"
    before = real_results.read_bytes() if real_results.exists() else None
    out = tmp / "table.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--no-compile",
         "--steps", "1", "--threads", "1", "--data-root", str(tmp / "no-such-folder"),
         "--out", str(out), "--write-results", "--results-file", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = real_results.read_bytes() if real_results.exists() else None
    return {"stdout": proc.stdout, "out": out.read_text(), "results": results.read_text(),
            "real_results_untouched": before == after}


def test_quick_table_has_every_row_with_a_rate(quick_run: dict) -> None:
    assert quick_run["out"] == quick_run["stdout"]
    rows = table_rows(quick_run["out"])

    def measured(what: str, batch: str) -> bool:
        return any(r["what"].startswith(what) and r["batch"] == batch and r["images/s"]
                   for r in rows)

    quick = "alexnet w=0.25 (--quick)"
    for batch in ("8", "16"):
        assert measured(f"{quick} 2 towers @227: project step", batch)
        assert measured(f"{quick} 1 tower @227: project step", batch)
        assert measured(f"{quick} 2 towers @227: plain fp32 loop", batch)
        assert measured("torchvision alexnet @227: plain fp32 loop", batch)
    for r in rows:
        if r["images/s"]:
            assert float(r["images/s"].replace(",", "")) > 0, r
            assert float(r["TFLOP/s"]) > 0, r  # every 227 row has its MACs counted
            assert r["MFU"] == "n/a", r  # no peak to divide by on a CPU
    project = [r for r in rows if "project step" in r["what"] and "2 towers" in r["what"]]
    assert {r["vs project step"] for r in project} == {"1.00x"}
    assert "724.4 M" in quick_run["out"] and "1,135.3 M" in quick_run["out"]
    assert quick_run["stdout"].rstrip().splitlines()[-1].startswith(
        "project step (alexnet two towers, batch 8) vs plain fp32 loop: ")


def test_data_rows_are_skipped_with_a_note_without_the_folder(quick_run: dict) -> None:
    rows = table_rows(quick_run["out"])
    skipped = [r for r in rows if r["note"].startswith("skipped: no image folder")]
    assert {r["what"].split(" ")[0] for r in skipped} == {"blog", "convnet4", "alexnet_cifar"}
    assert all(not r["images/s"] for r in skipped)
    assert "vs blog loop: n/a" in quick_run["stdout"]


def test_write_results_appends_markers_and_keeps_the_rest(quick_run: dict) -> None:
    text = quick_run["results"]
    assert text.startswith("# Results\n\nwritten by hand, kept as is\n\n<!-- gpu-benchmark:start")
    assert text.rstrip().endswith("<!-- gpu-benchmark:end -->")
    inside = text.split("<!-- gpu-benchmark:start -->\n")[1].split("<!-- gpu-benchmark:end")[0]
    assert inside == quick_run["out"]
    assert quick_run["real_results_untouched"]


def test_write_between_markers_replaces_only_the_marked_part(gpu, tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text(f"before\n{gpu.MARK_START}\nold table\n{gpu.MARK_END}\nafter\n")
    gpu.write_between_markers(path, "new table\n")
    assert path.read_text() == f"before\n{gpu.MARK_START}\nnew table\n{gpu.MARK_END}\nafter\n"
    fresh = tmp_path / "absent.md"
    gpu.write_between_markers(fresh, "t")
    assert fresh.read_text() == f"{gpu.MARK_START}\nt\n{gpu.MARK_END}\n"
    path.write_text(f"{gpu.MARK_END}\n{gpu.MARK_START}\n")
    with pytest.raises(SystemExit):
        gpu.write_between_markers(path, "t")


def test_mac_counter_matches_the_paper_and_the_peak_table(gpu) -> None:
    from alexnet.models import build_model

    for towers, paper in gpu.PAPER_MACS.items():
        macs = gpu.macs_of(lambda t=towers: build_model("alexnet", towers=t), 227)
        assert abs(macs - paper) / paper < 0.002, (towers, macs)
    assert gpu.peak_for("NVIDIA H100 80GB HBM3") == 989
    assert gpu.peak_for("NVIDIA H100 PCIe") == 756
    assert gpu.peak_for("NVIDIA H200") == 989
    assert gpu.peak_for("NVIDIA H200 NVL") == 835  # not the SXM part's 989
    assert gpu.peak_for("NVIDIA H100 NVL") == 835
    assert gpu.peak_for("NVIDIA A100-SXM4-80GB") == 312
    assert gpu.peak_for("NVIDIA GeForce RTX 4090") is None


@pytest.mark.gpu
def test_cuda_run_reports_bf16_rows_and_targets(tmp_path: Path) -> None:
    out = tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cuda", "--no-compile", "--steps", "3",
         "--warmup", "2", "--data-root", str(tmp_path / "no-such-folder"), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = table_rows(out.read_text())
    project = [r for r in rows if "project step (bf16 autocast, channels_last" in r["what"]]
    assert len(project) == 4  # two towers and one, batch 128 and 256
    assert all(float(r["images/s"].replace(",", "")) > 0 and r["TFLOP/s"] for r in project)
    assert "Targets:" in out.read_text()


# --- benchmarks/gpu_packing.py: several cells at once on one device ---------------------------

PACKING = REPO / "benchmarks" / "gpu_packing.py"


@pytest.fixture(scope="module")
def packing():
    spec = importlib.util.spec_from_file_location("gpu_packing", PACKING)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_plan_counts_the_paper_grids_distinct_cells_and_fits_epochs(packing):
    s = packing.settings(packing.parse_args(["--quick", "--device", "cpu",
                                             "--data-root", "/no/such/folder"]))
    rows = [packing.Row("convnet4", 1, [1000.0]), packing.Row("convnet4", 2, [900.0, 900.0]),
            packing.Row("alexnet_cifar", 1, [500.0]),
            packing.Row("alexnet_cifar", 2, error="failed")]
    epochs, line = packing.plan(rows, s, seeds=3, budget=600)
    # relu_vs_tanh: 2 arms of convnet4; the other eight ablations share their base cell, so
    # 12 distinct alexnet_cifar arms (base, bn, none, nonoverlap, pca off, dropout off,
    # augmentation off, two towers, one narrow tower, no conv2/3/4; ensemble's only arm is
    # the base); times 3 seeds.
    assert "42 distinct cells (6 convnet4 + 36 alexnet_cifar)" in line
    per_image = 1 + (256 / 1024) / 3  # training + a forward pass over the validation split
    one_epoch = 6 * 1024 * per_image / 1800 + 36 * 1024 * per_image / 500  # best aggregates
    assert f"takes about {one_epoch:.0f} s" in line
    assert epochs == int(600 // one_epoch) and line.endswith(f"EPOCHS={epochs} (bounded to 2..30)")
    assert packing.plan(rows, s, seeds=3, budget=1)[0] == 2  # never fewer than 2 epochs
    missing, why = packing.plan(rows[:2], s, seeds=1, budget=600)
    assert missing is None and why == "plan: none, alexnet_cifar not measured"


@pytest.mark.slow
def test_packing_quick_run_measures_one_and_two_cells(packing, tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n")
    out = tmp_path / "packing.md"
    proc = subprocess.run(
        [sys.executable, str(PACKING), "--quick", "--device", "cpu", "--models", "convnet4",
         "--data-root", str(tmp_path / "no-such-folder"), "--out", str(out),
         "--write-results", "--results-file", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = table_rows(out.read_text())
    assert [r["cells at once"] for r in rows] == ["1", "2"]
    for r in rows:
        per_cell = float(r["images/s per cell"].replace(",", ""))
        aggregate = float(r["aggregate images/s"].replace(",", ""))
        assert per_cell > 0 and aggregate == pytest.approx(per_cell * int(r["cells at once"]),
                                                           rel=0.01, abs=1)
    assert rows[0]["vs 1 cell"] == "1.00x"
    assert "`--jobs auto` for convnet4: 1 (a CPU" in out.read_text()
    assert results.read_text() == (f"# Results\n\n{packing.MARK_START}\n"
                                   f"{out.read_text().rstrip()}\n{packing.MARK_END}\n")


@pytest.mark.gpu
def test_packing_on_cuda_measures_memory_and_asks_the_probe(tmp_path: Path) -> None:
    out = tmp_path / "packing.md"
    proc = subprocess.run(
        [sys.executable, str(PACKING), "--device", "cuda", "--quick", "--models", "convnet4",
         "--cells", "1,2", "--seconds", "2", "--data-root", str(tmp_path / "none"),
         "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = table_rows(out.read_text())
    assert len(rows) == 2 and all(r["GPU memory per cell"].endswith("GiB") for r in rows)
    assert "`--jobs auto` for convnet4: " in out.read_text()
    assert "limited by" in out.read_text() or "cannot be read" in out.read_text()
