"""The report's text pieces: numbers, tables, runs and scale as GitHub markdown.

Shared by the per-ablation document (``ablation_md``) and the paper summary
(``paper_md``); the claims' own text is in ``claims_md``. Units: errors in % with one
decimal, deltas in percentage points (pp) with two, ratios with two and a ×. Tables go
through pandas' ``to_markdown`` (needs ``tabulate``).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pandas as pd

from alexnet.claims import Claim
from alexnet.report.compare import ClaimResult
from alexnet.report.grids import Grid
from alexnet.report.stats import Interval

MINUS = "\u2212"  # a real minus: "-0.42" next to "+0.42" in a table reads as a hyphen
NONE = "—"
REPRO = "Mishkin et al. 2016"
PAPER_SCALE = ("The paper's figures are for the full AlexNet on ImageNet (1.2 M images at "
               "227 px, about 90 epochs), except the ReLU speed-up and the 13% → 11% LRN "
               "figure (CIFAR-10); Mishkin et al. used ImageNet at 128 px. At a smaller scale "
               "a delta can differ in size, even in sign, without saying anything about the "
               "paper's own setting.")
AGREES = ("\"Agrees with\": whose published figure the measurement agrees with — in size "
          "(the figure lies inside the 95% interval) or in direction only (the interval "
          "excludes no effect on the figure's side).")
CROSSING = ("Epochs to the training-error target are interpolated linearly between the last "
            "epoch above the line and the first at or below it (training error is logged "
            "once per epoch, so a whole-epoch count has a resolution of one epoch); nothing "
            "is assumed before epoch 1, so a run already below the line after its first "
            "epoch counts as at most 1 epoch, a bound like a run that never reached it.")


# --- numbers ----------------------------------------------------------------------------


def signed(v: float | None, decimals: int = 2) -> str:
    if v is None or not math.isfinite(v):
        return NONE
    text = f"{v:+.{decimals}f}"
    return text.replace("-", MINUS)


def mean_sd(mean: float, sd: float, decimals: int = 1) -> str:
    if not math.isfinite(mean):
        return NONE
    text = f"{mean:.{decimals}f}".replace("-", MINUS)  # a negative gap, in the table's minus
    return text if not math.isfinite(sd) else f"{text} ± {sd:.{decimals}f}"


def ratio(v: float) -> str:
    return f"{v:.2f}×" if math.isfinite(v) else NONE


def measured_text(r: ClaimResult) -> str:
    iv = r.interval
    if not iv.n:
        return NONE
    if r.kind == "ratio":
        mark = {"lower": "≥ ", "upper": "≤ "}.get(r.bound or "", "")
        return mark + ratio(iv.estimate)
    return f"{signed(iv.estimate)} pp"


def interval_text(r: ClaimResult | Interval, kind: str = "delta") -> str:
    iv = r.interval if isinstance(r, ClaimResult) else r
    kind = r.kind if isinstance(r, ClaimResult) else kind
    if iv.n == 0:
        return NONE
    if not iv.has_interval:
        return "none (one seed)"
    if kind == "ratio":
        return f"[{iv.low:.2f}, {iv.high:.2f}]"
    return f"[{signed(iv.low)}, {signed(iv.high)}]"


def paper_text(c: Claim) -> str:
    if c.paper_delta is None:
        return "in words only"
    if c.metric == "epochs_to_target_ratio":
        return f"{c.paper_delta:g}×"
    return f"{signed(c.paper_delta, 1)} pp"


def reproduction_text(r: ClaimResult) -> str:
    c = r.claim
    if r.reproduction_value is not None:
        return f"{signed(r.reproduction_value, 1)} pp"
    if c.reproduction_delta is not None:  # a different comparison: shown, not compared
        return f"{signed(c.reproduction_delta, 1)} pp top-1 (not this measure)"
    return NONE


def compute_time(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds <= 0:
        return NONE
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes = seconds / 60
    if minutes < 120:
        return f"{minutes:.1f} min"
    return f"{minutes / 60:.1f} h"


# --- tables ------------------------------------------------------------------------------


def table(df: pd.DataFrame) -> str:
    """A GitHub table; numbers are formatted by the caller, so everything is text here."""
    if df.empty:
        return "_(none)_"
    return df.astype(str).to_markdown(index=False, disable_numparse=True)


def arm_rows(arms: pd.DataFrame, target_pct: float) -> pd.DataFrame:
    """stats.arm_table → the per-arm table as shown (test columns where runs have them)."""
    rows = []
    with_test = bool(arms["test1_mean"].notna().any()) if not arms.empty else False
    split = arms["split"].iloc[0] if not arms.empty else "val"
    for a in arms.to_dict("records"):
        label = a["arm"] + (" (tuned)" if a["tuned"] else " (partly tuned)"
                            if a["partly_tuned"] else "")
        failed = str(a["failed"]) + (f" ({a['diverged']} diverged)" if a["diverged"] else "")
        if a["killed"]:
            failed += f" + {a['killed']} interrupted"
        row = {"arm": label, "lr": a["lr"] or NONE, "weight decay": a["weight_decay"] or NONE,
               "seeds": a["seeds"],
               "top-1 val error (%)": mean_sd(a["top1_mean"], a["top1_sd"]),
               "top-5 val error (%)": mean_sd(a["top5_mean"], a["top5_sd"])}
        if with_test:
            row["top-1 test error (%)"] = mean_sd(a["test1_mean"], a["test1_sd"])
            row["top-5 test error (%)"] = mean_sd(a["test5_mean"], a["test5_sd"])
        row.update({
            "train error (%)": mean_sd(a["train_mean"], a["train_sd"]),
            f"{split} − train gap (pp)": mean_sd(a["gap_mean"], a["gap_sd"]),
            f"epochs to {target_pct:g}% train error": _epochs_cell(a),
            "time/epoch (s)": mean_sd(a["epoch_s_mean"], a["epoch_s_sd"], 2),
            "failed": failed,
            "in progress": a["running"],
        })
        rows.append(row)
    return pd.DataFrame(rows)


def _epochs_cell(a: dict) -> str:
    n, reached, first = a["seeds"], a["ett_reached"], a["ett_first"]
    if n == 0:
        return NONE
    if reached == 0:
        return f"never (0 of {n})"
    text = mean_sd(a["ett_mean"], a["ett_sd"])
    said = [f"{reached} of {n}", f"{n - reached} never"] if reached < n else []
    if first:
        said.append(f"{first} within epoch 1")
    return text + (f" ({'; '.join(said)})" if said else "")


def problem_lines(problems: pd.DataFrame, *, with_experiment: bool = False) -> list[str]:
    lines = []
    for p in problems.to_dict("records"):
        reason = p.get("failure_reason")
        why = f": {_one_line(reason)}" if isinstance(reason, str) and reason else ""
        where = f"`{p['experiment']}` " if with_experiment else ""
        if p["what"] == "in progress":
            why = _heartbeat(p.get("ablate.heartbeat_ms"))
        if p.get("rerun_finished") is True:
            why += " (a later run of this arm and seed finished and is used instead)"
        lines.append(f"- {where}{p['arm']}, seed {p['seed']}: {p['what']} ({p['status']}, run "
                     f"`{p['run_id']}`){why}")
    return lines


def _heartbeat(ms: object) -> str:
    """How long ago a running run last logged: a stale one is a crashed process."""
    import time

    try:
        age = time.time() - int(str(ms)) / 1000
    except ValueError:
        return ""
    return f": last heartbeat {compute_time(max(age, 0.1))} ago"


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def left_out(problems: pd.DataFrame, notes: list[str], heading: str = "###",
             with_experiment: bool = False) -> list[str]:
    if problems.empty and not notes:
        return []
    out = [f"{heading} Runs left out of the numbers", ""]
    out += problem_lines(problems, with_experiment=with_experiment)
    out += [f"- {n}" for n in notes]
    return out + [""]


def other_runs(name: str, others: list[Grid], heading: str = "###") -> list[str]:
    """The experiment's other grids, never pooled with the one shown: how to report them."""
    if not others:
        return []
    rows = []
    for g in others:
        counts = g.runs["status"].value_counts()
        latest = g.parents["run_id"].iloc[-1] if not g.parents.empty else None
        rows.append({
            "grid key": f"`{g.key}`",
            "tuned": "yes" if g.tuned else "no",
            "scale": scale_text(g.runs),
            "arms": g.runs["arm"].nunique(),
            "seeds": ", ".join(str(s) for s in sorted(set(g.runs["seed"].dropna()))) or NONE,
            "cell runs": ", ".join(f"{n} {s.lower()}" for s, n in counts.items()),
            "complete": "yes" if g.complete else f"no ({g.done} of {g.planned} cells)",
            "report it with": f"`ablate report {name} --grid {latest}`" if latest else
            "(no grid run recorded)"})
    return [f"{heading} Other runs in the store, not used", "",
            "Runs of this experiment at another scale or recipe (another grid key: data, "
            "subset, model, width, epochs, or tuned against untuned). They are never pooled "
            "with the runs above.", "", table(pd.DataFrame(rows)), ""]


def image(path: str, alt: str) -> str:
    return f"![{alt}]({path})"


# --- what was run ------------------------------------------------------------------------


def values(df: pd.DataFrame, column: str) -> list[str]:
    if column not in df:
        return []
    return list(dict.fromkeys(str(v) for v in df[column].dropna()
                              if str(v) not in ("", "None")))


def dataset_text(df: pd.DataFrame) -> str:
    """e.g. "CIFAR-10 (a 5000-image training subset), 32 px"."""
    names = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "synthetic": "synthetic images",
             "imagefolder": "image folder"}
    parts = []
    for source in values(df, "params.data.source") or ["?"]:
        sub = df[df["params.data.source"].astype(str) == source] if source != "?" else df
        text = names.get(source, source)
        max_train = values(sub, "params.data.max_train")
        if source == "synthetic":
            train = "/".join(values(sub, "params.data.synthetic.train_size")) or "?"
            val = "/".join(values(sub, "params.data.synthetic.val_size")) or "?"
            text += f" ({train} training, {val} validation)"
        elif max_train:
            text += f" (a {'/'.join(max_train)}-image training subset)"
        else:
            text += " (full training set)"
        if source == "imagefolder" and values(sub, "params.data.root"):
            # The folder's name, not its absolute path: a committed report is read on other
            # machines, where the dataset fingerprint says whether it is the same data.
            text += f" `{Path(values(sub, 'params.data.root')[0]).name}`"
        crop = values(sub, "params.data.crop_size")
        if crop:
            text += f", {'/'.join(crop)} px"
        parts.append(text)
    return "; ".join(parts)


def model_text(df: pd.DataFrame) -> str:
    names = ", ".join(values(df, "params.model.name")) or "?"
    widths = ", ".join(values(df, "params.model.width"))
    return f"{names}" + (f", width {widths}" if widths else "")


def scale_text(df: pd.DataFrame, target_pct: float | None = None) -> str:
    epochs = ", ".join(values(df, "params.train.epochs")) or "?"
    if "True" in values(df, "params.train.stop_at_target"):
        epochs += f" (stopping at {target_pct or 25:g}% training error)"
    return f"{dataset_text(df)}; {model_text(df)}; {epochs} epochs"


def display_uri(uri: str) -> str:
    """A store inside the working directory as a relative path: the same on every machine."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        with contextlib.suppress(ValueError):
            return prefix + str(Path(uri[len(prefix):]).relative_to(Path.cwd()))
    return uri
