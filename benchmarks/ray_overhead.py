"""What running cells as Ray tasks costs on one machine, against the local process pool.

    python benchmarks/ray_overhead.py [--rounds 3] [--ablation relu_vs_tanh] [--jobs 2]

Times whole commands, as a user waits for them, each into a new store: `ablate run NAME
--quick --jobs N` (N processes), `ablate run NAME --quick --executor ray` (a Ray cluster of
this machine, started and stopped by the command: N CPUs, one cell per CPU), and the same on a
Ray cluster already running (`ray start --head`, then `--ray-address`). The modes take turns
in every round, so that a machine shared with other work slows them alike; the medians and
their ratio to the pool's are printed as a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

BIN = Path(sys.executable).parent


def timed(args: list[str], env: dict[str, str]) -> float:
    with tempfile.TemporaryDirectory(prefix="ray-overhead-") as cwd:
        start = time.perf_counter()
        out = subprocess.run([str(BIN / "ablate"), *args], cwd=cwd, env=env, text=True,
                             capture_output=True)
        seconds = time.perf_counter() - start
        if out.returncode != 0:
            sys.exit(f"ablate {' '.join(args)} failed ({out.returncode}):\n{out.stdout[-2000:]}"
                     f"{out.stderr[-2000:]}")
        return seconds


@contextlib.contextmanager
def running_cluster(cpus: int, env: dict[str, str]) -> Iterator[str]:
    """`ray start --head` in a session of its own; its address. Ended with its session."""
    folder = tempfile.mkdtemp(prefix="rayb-", dir="/tmp")  # Ray's socket paths are short
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--port", "0",
                             "--num-cpus", str(cpus), "--num-gpus", "0", "--temp-dir", folder,
                             "--include-dashboard", "false", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    current = Path(folder, "ray_current_cluster")
    try:
        while not (current.exists() and current.read_text().strip()):
            if head.poll() is not None:
                sys.exit("ray start --head failed")
            time.sleep(0.5)
        yield current.read_text().strip()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ablation", default="relu_vs_tanh")
    parser.add_argument("--jobs", type=int, default=2, help="pool processes = Ray CPUs")
    args = parser.parse_args()

    token = Path(tempfile.mkdtemp(prefix="rayb-token-")) / "auth_token"
    token.write_text(secrets.token_hex(32))  # the running cluster's, for it and its drivers
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token)}
    grid = ["run", args.ablation, "--quick"]
    with running_cluster(args.jobs, env) as address:
        modes = {
            f"local process pool (`--jobs {args.jobs}`)": [*grid, "--jobs", str(args.jobs)],
            "Ray, a cluster of this machine started by the command (`--executor ray`)":
                [*grid, "--executor", "ray"],
            "Ray, a cluster already running (`--executor ray --ray-address ...`)":
                [*grid, "--executor", "ray", "--ray-address", address],
        }
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for r in range(args.rounds):
            order = list(modes)[r % len(modes):] + list(modes)[:r % len(modes)]
            for mode in order:
                times[mode].append(timed(modes[mode], env))
                print(f"round {r + 1}: {mode}: {times[mode][-1]:.1f} s", file=sys.stderr)
    pool = statistics.median(next(iter(times.values())))
    print(f"| executor | wall time, median of {args.rounds} (s) | all rounds (s) | vs pool |")
    print("|---|---:|---|---:|")
    for mode, values in times.items():
        median = statistics.median(values)
        print(f"| {mode} | {median:.1f} | {', '.join(f'{v:.1f}' for v in values)} | "
              f"{median / pool:.2f}x |")


if __name__ == "__main__":
    main()
