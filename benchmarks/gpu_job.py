"""The Python parts of benchmarks/gpu_job.sh (see its header for the job itself).

    python benchmarks/gpu_job.py tiny-data DIR          a tiny image folder for --tiny
    python benchmarks/gpu_job.py members NAME           the ablations a composite runs
    python benchmarks/gpu_job.py check-reports DIR      each report says GPU, full data, width
    python benchmarks/gpu_job.py summary STATE SIZE     the job's timings as markdown
    python benchmarks/gpu_job.py pack STATE OUT_FILE    the results as one archive
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import shutil
import sqlite3
import sys
import tarfile
import tempfile
from pathlib import Path

MAX_ARCHIVE_BYTES = 16 * 2**20  # what comes back from a GPU machine, per file
LOG_LINES = 2000  # the end of each step's log is kept in the archive
MARK_START = "<!-- gpu-job:start -->"
MARK_END = "<!-- gpu-job:end -->"
STEP4 = ("sweep", "paper", "reports")  # the paper table: the "step 4"
STEP4_TARGET_S = 600


def tiny_data(root: Path, classes: int = 10, per_class: int = 30) -> None:
    """``root/train/<class>/*.png``: 32x32 images, one mean colour per class plus noise, so
    that a tiny run learns something; written once."""
    import numpy as np
    from PIL import Image

    if (root / "train").is_dir():
        return
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root.parent))
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = tmp / "train" / f"class{c}"
        folder.mkdir(parents=True)
        colour = rng.uniform(40, 215, size=3)
        for i in range(per_class):
            pixels = np.clip(colour + rng.normal(0, 35, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    tmp.rename(root)  # whole or absent


def members(name: str) -> list[str]:
    from alexnet.ablation import load_ablation

    return [m.name for m in load_ablation(name).members()]


def check_reports(folder: Path) -> list[str]:
    """What a report of the full GPU run must say in its header: the device (cuda), the
    full training set, and the models' full width (1.0; the towers ablation's one-tower arm
    is half as wide by design). One line per report that does not."""
    problems = []
    for path in sorted(folder.glob("*.md")):
        head = path.read_text().split("## Results per arm")[0]
        missing = [what for what, pattern in (
            ("the device (cuda)", r"\bcuda\b"), ("the full training set", r"full training set"),
            ("full width (width 1.0)", r"width 1(\.0)?\b")) if not re.search(pattern, head)]
        if missing:
            problems.append(f"{path.name}: the header does not say {', '.join(missing)}")
    return problems


def read_times(state: Path) -> list[dict[str, str]]:
    path = state / "results" / "times.tsv"
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f, delimiter="\t"))


def device_text() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"


def summary(state: Path, size: str) -> str:
    """The steps' wall times (every attempt counted: a step stopped by its time limit and
    run again costs both), and step 4's, against its 10-minute target."""
    rows = read_times(state)
    steps: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        steps.setdefault(r["step"], []).append(r)
    settings = (state / "results" / "settings.txt").read_text().strip() \
        if (state / "results" / "settings.txt").exists() else ""
    lines = ["### The whole GPU job (`benchmarks/gpu_job.sh`)", "",
             f"- device: {device_text()}; size: {size}", *([f"- {settings}"] if settings else []),
             "", "| step | attempts | wall time (s) | last exit |", "|---|---:|---:|---:|"]
    for step, tries in steps.items():
        seconds = sum(float(t["seconds"]) for t in tries)
        lines.append(f"| {step} | {len(tries)} | {seconds:.0f} | {tries[-1]['exit']} |")
    step4 = sum(float(t["seconds"]) for s in STEP4 for t in steps.get(s, []))
    done = all(steps.get(s) and steps[s][-1]["exit"] == "0" for s in STEP4)
    if size != "full":
        verdict = "a tiny run; the target is for the full job on a GPU"
    elif not done:
        verdict = "incomplete"
    else:
        verdict = "met" if step4 <= STEP4_TARGET_S else "MISSED"
    lines += ["", f"Step 4, the paper table ({' + '.join(STEP4)}): {step4:.0f} s wall "
              f"({step4 / 60:.1f} min); target <= {STEP4_TARGET_S // 60} min: {verdict}"]
    return "\n".join(lines) + "\n"


def write_summary(state: Path, size: str) -> str:
    text = summary(state, size)
    results = state / "results"
    (results / "gpu-job.md").write_text(text)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu import write_between_markers

    write_between_markers(results / "RESULTS.md", text, MARK_START, MARK_END)
    return text


def copy_database(src: Path, dst: Path) -> None:
    """A consistent copy of a live SQLite database (the backup API), compacted."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(f"file:{src}?mode=ro", uri=True) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    with sqlite3.connect(dst) as b:
        b.execute("VACUUM")


def tail(src: Path, dst: Path, lines: int = LOG_LINES) -> None:
    text = src.read_text(errors="replace").splitlines()
    dst.write_text("\n".join(text[-lines:]) + "\n")


def pack(state: Path, archive: Path, limit: int = MAX_ARCHIVE_BYTES) -> int:
    """``archive`` (.tar.gz): mlruns/mlflow.db and optuna.db (no artifacts: no checkpoints,
    no weights; the reports need only the database), reports/ with their figures, results/
    (RESULTS.md with every fragment in place, the fragments, timings, test results) and the
    end of each step's log; without the logs when that is too large. Returns its size."""
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        for db in ("mlflow.db", "optuna.db"):
            if (state / "mlruns" / db).exists():
                copy_database(state / "mlruns" / db, stage / "mlruns" / db)
        for folder in ("reports", "results"):
            if (state / folder).is_dir():
                shutil.copytree(state / folder, stage / folder)
        if (state / "logs").is_dir():
            (stage / "logs").mkdir()
            for log in sorted((state / "logs").glob("*.log")):
                tail(log, stage / "logs" / log.name)
        archive.parent.mkdir(parents=True, exist_ok=True)
        for leave_out in ((), ("logs",)):
            data = io.BytesIO()
            with tarfile.open(fileobj=data, mode="w:gz") as tar:
                for entry in sorted(stage.iterdir()):
                    if entry.name not in leave_out:
                        tar.add(entry, arcname=entry.name)
            if data.tell() <= limit:
                tmp_archive = archive.with_suffix(".partial")
                tmp_archive.write_bytes(data.getvalue())
                tmp_archive.replace(archive)
                return data.tell()
        raise SystemExit(f"error: the results take {data.tell() / 2**20:.1f} MiB even without "
                         f"the logs; at most {limit / 2**20:g} MiB come back")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("tiny-data").add_argument("dir", type=Path)
    sub.add_parser("members").add_argument("name")
    sub.add_parser("check-reports").add_argument("dir", type=Path)
    s = sub.add_parser("summary")
    s.add_argument("state", type=Path)
    s.add_argument("size")
    k = sub.add_parser("pack")
    k.add_argument("state", type=Path)
    k.add_argument("archive", type=Path)
    args = p.parse_args(argv)
    if args.what == "tiny-data":
        tiny_data(args.dir)
    elif args.what == "members":
        print(" ".join(members(args.name)))
    elif args.what == "check-reports":
        problems = check_reports(args.dir)
        print("\n".join(problems) if problems else "every report's header says cuda, the full "
              "training set and width 1.0")
        return 1 if problems else 0
    elif args.what == "summary":
        print(write_summary(args.state, args.size), end="")
    else:
        size = pack(args.state, args.archive)
        print(f"packed {args.archive} ({size / 2**20:.2f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
