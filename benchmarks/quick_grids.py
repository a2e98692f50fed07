"""Wall time of every shipped ablation's --quick grid, one after another, each in a fresh
folder (a new store, as a first-time user has), through the `ablate` command itself.

    python benchmarks/quick_grids.py [--only relu_vs_tanh,normalization] [--skip paper]

Prints one row per ablation (cells, wall seconds, CPU seconds of the command and its
workers, exit code) and the machine's load average before and after, as a markdown table
for benchmarks/RESULTS.md. `relu_vs_tanh` is the README's first run.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from alexnet.ablation import PACKAGE_ABLATIONS, load_ablation

ABLATE = str(Path(sys.executable).parent / "ablate")


def shipped() -> list[str]:
    return sorted(p.stem for p in PACKAGE_ABLATIONS.glob("*.yaml"))


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_quick(name: str, extra: list[str]) -> tuple[float, float, int]:
    """(wall s, CPU s, exit code) of `ablate run NAME --quick` in a new folder."""
    with tempfile.TemporaryDirectory(prefix=f"quick-{name}-") as folder:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        env["ALEXNET_CACHE"] = str(Path(folder) / "cache")  # nothing decoded before
        cpu, started = children_cpu(), time.perf_counter()
        done = subprocess.run([ABLATE, "run", name, "--quick", *extra], cwd=folder, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - started
        if done.returncode:
            print(f"{name}: exit {done.returncode}: {done.stderr.strip()[-500:]}",
                  file=sys.stderr)
        return wall, children_cpu() - cpu, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated ablation names")
    parser.add_argument("--skip", default="", help="comma-separated ablation names")
    parser.add_argument("--limit", type=float, default=60.0, help="seconds a grid may take")
    parser.add_argument("extra", nargs="*", help="more `ablate run` options, after --")
    args = parser.parse_args()
    names = [n for n in (args.only.split(",") if args.only else shipped())
             if n and n not in args.skip.split(",")]
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"{os.cpu_count()} CPUs\n")
    print("| ablation | cells (distinct) | wall s | CPU s | exit |")
    print("|---|---:|---:|---:|---:|")
    slow = []
    for name in names:
        cells = load_ablation(name).cells(quick=True)
        distinct = len({c.key for c in cells})
        wall, cpu, code = run_quick(name, args.extra)
        print(f"| {name} | {len(cells)} ({distinct}) | {wall:.1f} | {cpu:.1f} | {code} |",
              flush=True)
        if wall > args.limit or code:
            slow.append(name)
    load = os.getloadavg()
    print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if slow:
        print(f"over {args.limit:.0f} s or failed: {', '.join(slow)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
