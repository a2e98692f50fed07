"""`ablate demo`: a local web page (Streamlit, the ``demo`` extra) where a dropped image is
classified by every arm of one or more ablations, side by side (ReLU beside tanh, LRN beside
none). The page itself is ``demo_app.py``; this module picks the runs (bad input fails here,
before anything starts) and runs ``streamlit run`` on 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alexnet import store
from alexnet.errors import AblateError, StoreError
from alexnet.serving.runs import CellRun, file_arms, find_cell_run, open_client

APP = Path(__file__).with_name("demo_app.py")
INSTALL_HINT = "pip install 'alexnet-ablate[demo]'"


def demo_groups(uri: str, ablations: list[str], seed: int | None) -> list[dict[str, Any]]:
    """Each ablation's arms that have a finished run: [{ablation, arms: [{label, seed,
    run_id, source_id}]}]. No ablation named: every ablation in the store."""
    from alexnet import tracking

    c = open_client(uri, ablations[0] if ablations else "NAME")
    names = ablations or sorted(
        e.name for e in c.search_experiments(max_results=50000)
        if tracking.cell_runs(c, [e.experiment_id]))
    if not names:
        raise StoreError(f"no finished cell in {store.redact(uri)}; run an ablation first "
                         "(ablate run relu_vs_tanh --quick)")
    groups = []
    for name in names:
        exp = c.get_experiment_by_name(name)
        runs = tracking.cell_runs(c, [exp.experiment_id]) if exp is not None else []
        labels = list(dict.fromkeys(r.data.tags.get("arm") for r in runs
                                    if r.info.status == "FINISHED"))
        if not labels:
            raise StoreError(f"ablation {name} has no finished run in {store.redact(uri)}; "
                             f"run `ablate run {name} --quick` first")
        arms: list[CellRun] = []
        for label in sorted(labels, key=_order(name)):
            try:
                arms.append(find_cell_run(c, uri, name, label, seed))
            except StoreError:
                if seed is None:
                    raise
        if not arms:
            raise StoreError(f"no arm of {name} has a finished run of seed {seed}; pass "
                             "another --seed or none (each arm's lowest)")
        groups.append({"ablation": name, "arms": [
            {"label": a.arm, "seed": a.seed, "run_id": a.run_id, "source_id": a.source_id}
            for a in arms]})
    return groups


def _order(ablation: str) -> Callable[[str], tuple[int, str]]:
    """The ablation file's arm order (its reference first, as it lists them), where found."""
    known = file_arms(ablation)
    return lambda label: (known.index(label) if label in known else len(known), label)


def check_installed() -> None:
    if importlib.util.find_spec("streamlit") is None:
        raise AblateError(f"`ablate demo` needs Streamlit, which is not installed: "
                          f"{INSTALL_HINT}")


def demo_command(uri: str, groups: list[dict[str, Any]], host: str, port: int) -> list[str]:
    """``streamlit run`` on our page: no browser opened, no usage statistics sent, no file
    watcher; the page's input (store and runs) after ``--``."""
    return [sys.executable, "-m", "streamlit", "run", str(APP),
            "--server.address", host, "--server.port", str(port), "--server.headless", "true",
            "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
            "--global.developmentMode", "false", "--client.toolbarMode", "minimal",
            "--", json.dumps({"uri": uri, "groups": groups})]


def serve_demo(uri: str, ablations: list[str], seed: int | None, host: str, port: int,
               echo: Callable[[str], None] = print) -> int:
    """`ablate demo`: check everything, say where the page is, run it until Ctrl-C."""
    from alexnet.ui_server import browser_host, check_port_free, run_server, server_env

    check_installed()
    check_port_free(host, port)
    groups = demo_groups(uri, ablations, seed)
    env = server_env()
    env["STREAMLIT_BROWSER_GATHER_USAGE_STATS"] = "false"
    for g in groups:
        echo(f"{g['ablation']}: " + ", ".join(f"{a['label']} seed {a['seed']}"
                                              for a in g["arms"]))
    echo(f"Demo page at http://{browser_host(host)}:{port}  (Ctrl-C stops it)")
    sys.stdout.flush()
    return run_server(demo_command(uri, groups, host, port), env, what="the demo page")
