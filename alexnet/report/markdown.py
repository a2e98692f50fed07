"""The report's text: numbers from ``stats`` formatted as GitHub markdown.

Units: errors in % with one decimal, deltas in percentage points (pp) with two, ratios
with two and a ×. Tables go through pandas' ``to_markdown`` (needs ``tabulate``).
"""

from __future__ import annotations

import contextlib
import math
import shlex
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from alexnet.claims import Claim
from alexnet.report.stats import ClaimResult, Interval

if TYPE_CHECKING:
    from alexnet.report.load import Runs

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


# --- numbers ----------------------------------------------------------------------------


def signed(v: float | None, decimals: int = 2) -> str:
    if v is None or not math.isfinite(v):
        return NONE
    text = f"{v:+.{decimals}f}"
    return text.replace("-", MINUS)


def mean_sd(mean: float, sd: float, decimals: int = 1) -> str:
    if not math.isfinite(mean):
        return NONE
    if not math.isfinite(sd):
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {sd:.{decimals}f}"


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


# --- claims ------------------------------------------------------------------------------


def measure_name(r: ClaimResult) -> str:
    c = r.claim
    if r.kind == "ratio":
        return f"epochs to {r.target_pct:g}% train error, {c.baseline} ÷ {c.arm}"
    if c.metric == "gap":
        return "val − train error gap (pp)"
    return "top-1 val error (pp)"


def verdict_cell(r: ClaimResult) -> str:
    if r.missing:
        return f"not measured: {r.missing}"
    return r.verdict


def agreement_cell(r: ClaimResult) -> str:
    if r.missing or not r.interval.has_interval:
        return NONE
    found = r.agreement()
    return "; ".join(f"{who} ({how})" for who, how in found.items()) if found else "neither"


def claim_sentence(r: ClaimResult) -> str:
    """The one-line answer, e.g. "Claim relu_speed: reproduced at this scale (...)"."""
    c = r.claim
    head = f"**Claim {c.id}** (§{c.section})"
    if r.missing:
        return f"{head}: not measured — {r.missing}."
    iv = r.interval
    arm, base = f"{c.axis}={c.arm}", f"{c.axis}={c.baseline}"
    seeds = "one seed, so no interval" if iv.n == 1 else f"{iv.n} paired seeds"
    held = f", other axes at {_held(r.held)}" if r.held else ""
    if r.kind == "ratio":
        bound = {"lower": "at least ", "upper": "at most "}.get(r.bound or "", "")
        where = f" {interval_text(r)}" if iv.has_interval else ""
        if iv.estimate >= 1:
            speed = f"{bound}{ratio(iv.estimate)}{where} faster"
        else:
            speed = f"{bound}{ratio(iv.estimate)}{where} as fast, i.e. slower,"
        what = (f"{arm} reached {r.target_pct:g}% training error {speed} than {base}, "
                f"{seeds}{held}; paper {paper_text(c)}")
    else:
        name = "validation − training error gap" if c.metric == "gap" else "top-1 error"
        where = f" {interval_text(r)}" if iv.has_interval else ""
        what = (f"{name}, {arm} − {base}: {signed(iv.estimate)} pp{where}, {seeds}{held}; "
                f"paper {paper_text(c)}")
        if r.top5 is not None and r.top5.n:
            what += (f"; top-5 {signed(r.top5.estimate)} pp"
                     f"{' ' + interval_text(r.top5) if r.top5.has_interval else ''}, paper "
                     f"{signed(c.paper_delta_top5, 1)} pp")
        if r.reproduction_value is not None:
            what += f"; {REPRO} {signed(r.reproduction_value, 1)} pp"
    return f"{head}: {r.verdict} at this scale ({what}). {agreement_sentence(r)}".rstrip()


def agreement_sentence(r: ClaimResult) -> str:
    """Where the measurement agrees with the paper, with the reproduction, or neither."""
    if not r.interval.has_interval:
        return ""
    c = r.claim
    found = r.agreement()
    parts = []
    if c.paper_delta is None:
        parts.append("The paper states the effect in words only; "
                     + ("the measured direction agrees." if "paper" in found else
                        "this measurement does not confirm its direction."))
    figures = [("paper", f"The paper's {paper_text(c)}", c.paper_delta)]
    if r.reproduction_value is not None:
        figures.append(("Mishkin et al.", f"{REPRO}'s {signed(r.reproduction_value, 1)} pp",
                        r.reproduction_value))
    for who, name, value in figures:
        if value is None:
            continue
        how = found.get(who)
        if how == "size":
            also = ", which also holds no effect" if r.interval.contains(r.null) else ""
            parts.append(f"{name} lies inside the interval{also}.")
        elif how == "direction":
            parts.append(f"{name} lies outside the interval, on the same side of no effect "
                         "(same direction, different size).")
        else:
            parts.append(f"{name} disagrees (outside the interval, not the same direction).")
    return " ".join(parts)


def _held(held: dict[str, str]) -> str:
    return ", ".join(f"{a}={r}" for a, r in held.items())


def delta_table(results: Iterable[ClaimResult], *, with_ablation: bool = False) -> str:
    rows = []
    for r in results:
        c = r.claim
        row = {"claim": c.id, "paper §": c.section}
        if with_ablation:
            row["ablation"] = f"`{r.experiment}`" if r.experiment else NONE
        held = f" ({_held(r.held)})" if r.held else ""
        row.update({
            "measured as": measure_name(r),
            "arm vs baseline": f"{c.axis}: {c.arm} vs {c.baseline}{held}",
            "paired seeds": len(r.seeds) if not r.missing else 0,
            "paper": paper_text(c),
            REPRO: reproduction_text(r),
            "measured": measured_text(r),
            "95% interval": interval_text(r),
            "verdict": verdict_cell(r),
            "agrees with": agreement_cell(r),
        })
        rows.append(row)
    return table(pd.DataFrame(rows))


def claim_notes(results: Iterable[ClaimResult]) -> list[str]:
    """The paper's words, the reproduction's, and what was left out, per claim."""
    lines = []
    for r in results:
        c = r.claim
        parts = [c.statement, f"paper: {c.paper_text}"]
        if c.reproduction:
            parts.append(f"{REPRO}: {c.reproduction}")
        parts += r.notes
        lines.append(f"- **{c.id}** — " + "; ".join(parts) + ".")
    return lines


# --- tables ------------------------------------------------------------------------------


def table(df: pd.DataFrame) -> str:
    """A GitHub table; numbers are formatted by the caller, so everything is text here."""
    if df.empty:
        return "_(none)_"
    return df.astype(str).to_markdown(index=False, disable_numparse=True)


def arm_rows(arms: pd.DataFrame, target_pct: float) -> pd.DataFrame:
    """stats.arm_table → the per-arm table as shown."""
    rows = []
    for a in arms.to_dict("records"):
        label = a["arm"] + (" (tuned)" if a["tuned"] else " (partly tuned)"
                            if a["partly_tuned"] else "")
        n = a["seeds"]
        if n == 0:
            ett = NONE
        elif a["ett_reached"] == 0:
            ett = f"never (0 of {n})"
        elif a["ett_reached"] < n:
            ett = (f"{mean_sd(a['ett_mean'], a['ett_sd'])} ({a['ett_reached']} of {n}; "
                   f"{n - a['ett_reached']} never)")
        else:
            ett = mean_sd(a["ett_mean"], a["ett_sd"])
        failed = str(a["failed"]) + (f" ({a['diverged']} diverged)" if a["diverged"] else "")
        if a["killed"]:
            failed += f" + {a['killed']} interrupted"
        rows.append({
            "arm": label,
            "lr": a["lr"] or NONE,
            "weight decay": a["weight_decay"] or NONE,
            "seeds": n,
            "top-1 error (%)": mean_sd(a["top1_mean"], a["top1_sd"]),
            "top-5 error (%)": mean_sd(a["top5_mean"], a["top5_sd"]),
            "train error (%)": mean_sd(a["train_mean"], a["train_sd"]),
            "val − train gap (pp)": mean_sd(a["gap_mean"], a["gap_sd"]),
            f"epochs to {target_pct:g}% train error": ett,
            "time/epoch (s)": mean_sd(a["epoch_s_mean"], a["epoch_s_sd"], 2),
            "failed": failed,
            "in progress": a["running"],
        })
    return pd.DataFrame(rows)


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


# --- what was run ------------------------------------------------------------------------


def _values(df: pd.DataFrame, col: str) -> list[str]:
    if col not in df:
        return []
    return list(dict.fromkeys(str(v) for v in df[col].dropna() if str(v) not in ("", "None")))


def dataset_text(df: pd.DataFrame) -> str:
    """e.g. "CIFAR-10 (a 5000-image training subset), 32 px"."""
    names = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "synthetic": "synthetic images",
             "imagefolder": "image folder"}
    parts = []
    for source in _values(df, "params.data.source") or ["?"]:
        sub = df[df["params.data.source"].astype(str) == source] if source != "?" else df
        text = names.get(source, source)
        max_train = _values(sub, "params.data.max_train")
        if source == "synthetic":
            train = "/".join(_values(sub, "params.data.synthetic.train_size")) or "?"
            val = "/".join(_values(sub, "params.data.synthetic.val_size")) or "?"
            text += f" ({train} training, {val} validation)"
        elif max_train:
            text += f" (a {'/'.join(max_train)}-image training subset)"
        else:
            text += " (full training set)"
        if source == "imagefolder" and _values(sub, "params.data.root"):
            # The folder's name, not its absolute path: a committed report is read on other
            # machines, where the dataset fingerprint says whether it is the same data.
            text += f" `{Path(_values(sub, 'params.data.root')[0]).name}`"
        crop = _values(sub, "params.data.crop_size")
        if crop:
            text += f", {'/'.join(crop)} px"
        parts.append(text)
    return "; ".join(parts)


def model_text(df: pd.DataFrame) -> str:
    names = ", ".join(_values(df, "params.model.name")) or "?"
    widths = ", ".join(_values(df, "params.model.width"))
    return f"{names}" + (f", width {widths}" if widths else "")


def epochs_text(df: pd.DataFrame, target_pct: float | None = None) -> str:
    epochs = ", ".join(_values(df, "params.train.epochs")) or "?"
    text = epochs
    if "True" in _values(df, "params.train.stop_at_target"):
        text += f", stopping once training error reaches {target_pct or 25:g}%"
    if "epochs_completed" in df and df["epochs_completed"].notna().any():
        done = df["epochs_completed"].dropna()
        text += f" (completed: {int(done.min())}–{int(done.max())})" if done.min() != done.max() \
            else f" (completed: {int(done.min())})"
    return text


def scale_text(df: pd.DataFrame, target_pct: float | None = None) -> str:
    epochs = ", ".join(_values(df, "params.train.epochs")) or "?"
    if "True" in _values(df, "params.train.stop_at_target"):
        epochs += f" (stopping at {target_pct or 25:g}% training error)"
    return f"{dataset_text(df)}; {model_text(df)}; {epochs} epochs"


def _seeds(used: pd.DataFrame, cells: pd.DataFrame) -> str:
    done = sorted({int(s) for s in used["seed"].dropna()}) if not used.empty else []
    others = sorted({int(s) for s in cells["seed"].dropna()} - set(done))
    text = ", ".join(map(str, done)) or NONE
    if others:
        text += f" (also started, none finished: {', '.join(map(str, others))})"
    return text


def display_uri(uri: str) -> str:
    """A store inside the working directory as a relative path: the same on every machine."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        with contextlib.suppress(ValueError):
            return prefix + str(Path(uri[len(prefix):]).relative_to(Path.cwd()))
    return uri


def rerun_command(name: str, shown: pd.DataFrame, grids: pd.DataFrame) -> str:
    """The command the latest grid ran, with machine paths shortened to path/to/NAME; the
    plain ``ablate run NAME`` where the grid did not record one."""
    commands = grids.sort_values("start_time")["command"].dropna() \
        if "command" in grids and not grids.empty else pd.Series(dtype=str)
    if commands.empty:
        quick = " --quick" if "synthetic" in _values(shown, "params.data.source") else ""
        return f"ablate run {name}{quick}"
    words = shlex.split(commands.iloc[-1])
    return shlex.join(f"path/to/{Path(w).name}" if Path(w).is_absolute() else w for w in words)


def setup_rows(name: str, title: str | None, uri: str, exp_id: str, cells: pd.DataFrame,
               used: pd.DataFrame, grids: pd.DataFrame, target_pct: float) -> pd.DataFrame:
    """The "what was run" table: enough to rerun it, all read from the runs."""
    shown = used if not used.empty else cells
    statuses = cells["status"].value_counts()
    counts = ", ".join(f"{n} {s.lower()}" for s, n in statuses.items())
    commits = _values(cells, "git_commit")
    seconds = pd.to_numeric(cells.get("train_seconds"), errors="coerce").sum() \
        if "train_seconds" in cells else math.nan
    rerun = f"`{rerun_command(name, shown, grids)}`"
    if commits:
        rerun = f"`git checkout {commits[0].removesuffix('-dirty')}`, then {rerun}"
    rows = [
        ("ablation", f"`{name}`" + (f" — {title}" if title else "")),
        ("dataset", dataset_text(shown)),
        ("dataset fingerprint", ", ".join(f"`{v}`" for v in _values(cells, "dataset_fingerprint"))
         or NONE),
        ("model", model_text(shown)),
        ("epochs", epochs_text(shown, target_pct)),
        ("seeds", _seeds(used, cells)),
        ("device", ", ".join(_values(cells, "device")) or NONE),
        ("total compute time", compute_time(seconds) + " (sum of every run's training time)"),
        ("MLflow experiment", f"`{name}` (id {exp_id}) at `{display_uri(uri)}`"),
        ("grid runs", ", ".join(f"`{r}`" for r in grids["run_id"]) or NONE),
        ("cell runs", f"{len(cells)} ({counts}); run ids below"),
        ("git commit", ", ".join(f"`{c}`" for c in commits) or NONE),
        ("reproduce", f"{rerun}; every resolved config value is a param of each run "
                      "(`ablate ui` to browse)"),
    ]
    return pd.DataFrame(rows, columns=["", "value"])


def run_list(cells: pd.DataFrame, used: pd.DataFrame) -> str:
    """Every cell run, collapsed: which one each number comes from."""
    ids = set(used["run_id"])
    df = cells.sort_values(["arm", "seed", "start_time"])
    rows = pd.DataFrame({
        "arm": df["arm"], "seed": df["seed"].astype(str), "status": df["status"],
        "tuned": df["tuned"].map({True: "yes", False: ""}),
        "in the tables": df["run_id"].map(lambda r: "yes" if r in ids else ""),
        "run id": df["run_id"].map(lambda r: f"`{r}`")})
    return ("<details><summary>All cell runs</summary>\n\n" + table(rows)
            + "\n\n</details>")


def image(path: str, alt: str) -> str:
    return f"![{alt}]({path})"


# --- whole documents ---------------------------------------------------------------------


def ablation_report(*, name: str, title: str | None, uri: str, exp_id: str, cells: pd.DataFrame,
                    used: pd.DataFrame, grids: pd.DataFrame, arms: pd.DataFrame,
                    problems: pd.DataFrame, results: list[ClaimResult], notes: list[str],
                    figures: dict[str, str], reference: dict[str, str],
                    target_pct: float) -> str:
    out = [f"# Ablation `{name}`" + (f": {title}" if title else ""), ""]
    if results:
        out += [f"- {claim_sentence(r)}" for r in results] + [""]
    else:
        out += ["This ablation tests none of the paper's claims: per-arm results only.", ""]
    scale = scale_text(used if not used.empty else cells, target_pct)
    out += [f"> **Scale.** These runs: {scale}. {PAPER_SCALE}", ""]
    out += ["## What was run", "", table(setup_rows(name, title, uri, exp_id, cells, used,
                                                     grids, target_pct)), ""]
    out += ["## Results per arm", "",
            "Mean ± standard deviation over seeds of the final epoch's numbers (one seed: "
            "no standard deviation). Errors in %, gap = validation − training error in "
            "percentage points. Learning rate and weight decay as each arm's runs used them; "
            "\"tuned\" marks values chosen by `ablate sweep`.", "",
            table(arm_rows(arms, target_pct)), ""]
    if len(reference) > 1:
        out += ["Reference arms (claims compare one axis with the others held here): "
                + _held(reference) + ".", ""]
    out += _left_out(problems, notes)
    if results:
        out += ["## Error deltas against the paper", "",
                "Measured = arm − baseline, paired by seed (seeds present in both arms only), "
                "with a 95% t-interval; for the speed claim the ratio of epochs, baseline ÷ "
                "arm, with a t-interval on per-seed log ratios. Verdict: reproduced = the "
                "paper's sign and an interval excluding no effect; contradicted = the opposite "
                "sign, excluding it; inconclusive otherwise. " + AGREES, "",
                delta_table(results), "", *claim_notes(results), ""]
    out += ["## Figures", ""]
    for path, alt in figures.items():
        out += [image(path, alt), ""]
    out += ["## Runs", "", run_list(cells, used), ""]
    return "\n".join(out)


def _left_out(problems: pd.DataFrame, notes: list[str], heading: str = "###",
              with_experiment: bool = False) -> list[str]:
    if problems.empty and not notes:
        return []
    out = [f"{heading} Runs left out of the numbers", ""]
    out += problem_lines(problems, with_experiment=with_experiment)
    out += [f"- {n}" for n in notes]
    return out + [""]


def paper_report(*, uri: str, results: list[ClaimResult], experiments: pd.DataFrame,
                 problems: pd.DataFrame, notes: list[str], figure: str) -> str:
    out = ["# The paper's claims, measured", "",
           "Every ablation in the store that tests a claim of Krizhevsky et al. (2012), one "
           "row per claim. Per-arm numbers and curves: `ablate report <ablation>`.", ""]
    out += [f"- {claim_sentence(r)}" for r in results] + [""]
    out += [f"> **Scale.** {PAPER_SCALE} The scale of each ablation is in the table below.",
            ""]
    out += ["## Error deltas against the paper", "",
            "Measured = arm − baseline, paired by seed, with a 95% t-interval (the speed claim: "
            "the ratio of epochs, baseline ÷ arm). " + AGREES, "",
            delta_table(results, with_ablation=True), "", *claim_notes(results), "",
            image(figure, "measured against the paper's deltas"), ""]
    out += ["## Ablations in the store", "", f"Tracking URI: `{display_uri(uri)}`.", "",
            table(experiments), ""]
    out += _left_out(problems, notes, "##", with_experiment=True)
    return "\n".join(out)


def store_rows(runs: Runs, used: pd.DataFrame) -> pd.DataFrame:
    """The paper report's list of ablations: what each ran, at what scale, with what."""
    rows = []
    for exp in runs.experiments:
        cells = runs.cells[runs.cells["experiment"] == exp]
        mine = used[used["experiment"] == exp] if not used.empty else used
        shown = mine if not mine.empty else cells
        seconds = pd.to_numeric(cells["train_seconds"], errors="coerce").sum() \
            if "train_seconds" in cells else math.nan
        counts = cells["status"].value_counts()
        rows.append({
            "ablation": f"`{exp}`",
            "claims": ", ".join(runs.claims.get(exp, [])) or NONE,
            "dataset": dataset_text(shown),
            "model": model_text(shown),
            "epochs": ", ".join(_values(shown, "params.train.epochs")) or NONE,
            "seeds": ", ".join(str(s) for s in sorted(set(shown["seed"].dropna()))) or NONE,
            "cell runs": ", ".join(f"{n} {s.lower()}" for s, n in counts.items()),
            "device": ", ".join(_values(cells, "device")) or NONE,
            "compute": compute_time(seconds),
            "git commit": ", ".join(f"`{c[:12]}`" for c in _values(cells, "git_commit"))
            or NONE,
        })
    return pd.DataFrame(rows)
