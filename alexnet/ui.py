"""What `ablate ui` shows: MLflow's UI opened on an ablation's training runs, grouped by arm.

How MLflow 3 (3.17's UI) decides what an experiment page shows:

- GenAI or training: the sidebar's workflow switch ("GenAI" / "Model training"), read from
  the URL parameter ``workflowType`` (``genai`` | ``machine_learning``), else from the
  browser's own saved choice, else GenAI. No server setting or experiment tag changes that
  default; the experiment tag ``mlflow.experimentKind`` is read only by UIs built without
  the switch. So our experiments carry the tag and every URL we print carries the parameter.
- Grouping, chart layout and filter: the runs page's view state. The page saves it in the
  browser, or in a *saved view*: an experiment tag ``mlflow.sharedViewState.<id>`` holding
  ``{name, createdAt, updatedAt, state}``, opened by the URL parameter
  ``viewStateShareKey=<id>`` and listed in the page's "Views" menu. Each grid gets one: its
  cells only, grouped by the ``arm`` tag, the per-epoch curves in the first chart section.
  (``compareRunsMode=CHART`` in the URL opens the chart view rather than the table.)

The server itself (`ablate ui`) and MLflow's telemetry switch are in ``ui_server``.
"""

from __future__ import annotations

import base64
import json
import time
import zlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

if TYPE_CHECKING:
    from alexnet.ablation import Ablation, Cell
    from alexnet.config import RunConfig

KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"  # the UI's "Machine learning" experiment type
NOTE_TAG = "mlflow.note.content"  # the description shown under the experiment's name
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_URL_PARAM = "viewStateShareKey"
OUR_VIEWS = "ablate-"  # the ids of the views this module writes start with this
DEFLATED = "deflate;"  # how the UI marks a compressed view state

# What each chart section shows first: the per-epoch metrics (step = epoch), in the order
# a reader wants them. Every other metric (final_*, best_*, system/*) falls into MLflow's own
# "Model metrics" and "System metrics" sections after these.
CURVES = ("val_error", "train_error", "val_loss", "train_loss", "val_error_top5", "lr",
          "images_per_second", "epoch_seconds")
CURVES_SECTION = "Per-epoch curves"

# CIFAR's training archives hold 50,000 images; the validation split is carved from them.
_CIFAR_TRAIN_IMAGES = 50_000


# --- the experiment ------------------------------------------------------------------------


def experiment_tags(ablation: Ablation) -> dict[str, str]:
    """The tags an ablation's experiment is created with: its type and its description."""
    return {KIND_TAG: TRAINING_KIND, NOTE_TAG: experiment_note(ablation)}


def experiment_note(ablation: Ablation) -> str:
    """Markdown: the ablation's title, what it varies, its description and the paper's claims."""
    from alexnet.claims import CLAIMS

    lines = [f"**{ablation.title}**", ""]
    for axis, arms in ablation.axes.items():
        reference = ablation.reference.get(axis)
        names = ", ".join(f"{a} (reference)" if a == reference else a for a in arms)
        lines.append(f"Axis `{axis}`: {names}.  ")
    if ablation.description:
        lines += ["", " ".join(ablation.description.split())]
    if ablation.claims:
        lines += ["", "Claims of the paper it tests:"]
        for claim_id in ablation.claims:
            claim = CLAIMS[claim_id]
            lines.append(f"- `{claim.id}` (Section {claim.section}): {claim.statement}; "
                         f"paper: {claim.paper_text}")
    return "\n".join(lines)


# --- a grid: its run's name and its saved view -----------------------------------------------


def grid_run_name(cells: Sequence[Cell]) -> str:
    """What tells one grid from another in the runs list, e.g.
    ``relu_vs_tanh · cifar10 45k · convnet4 w1 · 30 ep`` or ``relu_vs_tanh · quick · ...``,
    with ``· tuned`` when a sweep chose each arm's lr and weight decay."""
    if not cells:
        raise ValueError("a grid has at least one cell")
    configs = [c.config for c in cells]
    parts = [_joined(c.ablation for c in cells)]
    parts.append("quick" if all(c.quick for c in cells)
                 else _joined(_data_label(cfg) for cfg in configs))
    parts.append(f"{_joined(cfg.model.name for cfg in configs)} "
                 f"w{_joined(f'{cfg.model.width:g}' for cfg in configs)}")
    parts.append(f"{_joined(str(cfg.train.epochs) for cfg in configs)} ep")
    if any(c.tuned for c in cells):
        parts.append("tuned")
    return " · ".join(parts)


def _joined(values: Iterable[str]) -> str:
    """One value, or the distinct ones joined by "/" (arms may differ in width or model)."""
    return "/".join(dict.fromkeys(values))


def _data_label(cfg: RunConfig) -> str:
    """The data source and how many training images the cells saw (after the validation
    split and data.max_train)."""
    data = cfg.data
    if data.source == "synthetic":
        count: int | None = data.synthetic.train_size
    elif data.source in ("cifar10", "cifar100"):
        count = _CIFAR_TRAIN_IMAGES - round(data.val_fraction * _CIFAR_TRAIN_IMAGES)
    else:  # an image folder's size is known only once it is listed
        count = None
    if data.max_train is not None:
        count = data.max_train if count is None else min(count, data.max_train)
    return data.source if count is None else f"{data.source} {_thousands(count)}"


def _thousands(n: int) -> str:
    return f"{n / 1000:.3g}k" if n >= 1000 else str(n)


def grid_view_tags(cells: Sequence[Cell], now_ms: int | None = None) -> dict[str, str]:
    """Experiment tags holding one saved view per grid among ``cells`` (normally one): its
    cells grouped by arm, per-epoch curves first. Set them when a grid starts; setting them
    again (a resumed or extended grid) makes that grid the one ``ablate ui`` opens."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    grids: dict[str, list[Cell]] = {}
    for cell in cells:
        grids.setdefault(cell.grid_key, []).append(cell)
    tags = {}
    for grid_key, members in grids.items():
        envelope = {"name": grid_run_name(members), "createdAt": now_ms, "updatedAt": now_ms,
                    "state": _deflate(view_state(grid_key))}
        tags[VIEW_TAG_PREFIX + view_id(grid_key)] = json.dumps(envelope, ensure_ascii=False)
    return tags


def _deflate(state: dict[str, Any]) -> str:
    """The state as MLflow's UI stores a large one: "deflate;" + base64 of zlib data, about
    1,000 characters instead of 5,000, well inside the limit on an experiment tag's value."""
    text = json.dumps(state, separators=(",", ":"))
    return DEFLATED + base64.b64encode(zlib.compress(text.encode())).decode()


def read_view(tag_value: str) -> tuple[str, dict[str, Any]]:
    """(name, state) of a saved view's tag value, compressed or not."""
    envelope = json.loads(tag_value)
    state = envelope["state"]
    if state.startswith(DEFLATED):
        state = zlib.decompress(base64.b64decode(state[len(DEFLATED):])).decode()
    return envelope["name"], json.loads(state)


def view_id(grid_key: str) -> str:
    return OUR_VIEWS + grid_key


def view_state(grid_key: str) -> dict[str, Any]:
    """The runs page's state for one grid, in the fields MLflow's UI saves and restores
    (its search facets and ``uiState``; fields left out keep the page's defaults)."""
    sections = [_section("ablate-curves", CURVES_SECTION, generated=False),
                _section("ablate-model-metrics", "Model metrics"),  # MLflow's own names:
                _section("ablate-system-metrics", "System metrics")]  # new metrics go there
    return {
        "searchFilter": f"tags.`ablate.kind` = 'cell' AND tags.`ablate.grid_key` = '{grid_key}'",
        "groupBy": {"aggregateFunction": "average",
                    "groupByKeys": [{"mode": "tag", "groupByData": "arm"}]},
        "useGroupedValuesInCharts": True,  # one line per arm: the mean over its seeds
        "runsHiddenMode": "SHOW_ALL",  # the default draws only the first 10 rows
        "hideEmptyCharts": True,
        "isAccordionReordered": True,  # keep our section order
        "compareRunSections": sections,
        "compareRunCharts": [_curve(metric, sections[0]["uuid"]) for metric in CURVES],
    }


def _section(uuid: str, name: str, *, generated: bool = True) -> dict[str, Any]:
    return {"uuid": uuid, "name": name, "display": True, "isReordered": False,
            "deleted": False, "isGenerated": generated}


def _curve(metric: str, section: str) -> dict[str, Any]:
    """A line chart of ``metric`` against the step (the epoch), with every field MLflow's
    line-chart card carries."""
    return {"uuid": f"ablate-curve-{metric}", "type": "LINE", "metricSectionId": section,
            "metricKey": metric, "displayName": metric, "isGenerated": True, "deleted": False,
            "runsCountToCompare": 100, "lineSmoothness": 0, "xAxisScaleType": "linear",
            "scaleType": "linear", "range": {}, "xAxisKey": "step", "selectedXAxisMetricKey": "",
            "yAxisKey": "metric", "yAxisExpressions": [], "ignoreOutliers": False,
            "useGlobalXaxisKey": True, "useGlobalLineSmoothing": True}


def newest_view(tags: dict[str, str]) -> str | None:
    """The id of the most recently written grid view among an experiment's tags."""
    best: tuple[int, str] | None = None
    for key, value in tags.items():
        if not key.startswith(VIEW_TAG_PREFIX + OUR_VIEWS):
            continue
        try:
            updated = int(json.loads(value)["updatedAt"])
        except (ValueError, KeyError, TypeError):
            continue  # not one of ours after all, or edited by hand: ignore it
        if best is None or updated > best[0]:
            best = (updated, key[len(VIEW_TAG_PREFIX):])
    return best[1] if best else None


def experiment_url(base_url: str, experiment_id: str, view: str | None = None) -> str:
    """The experiment's training runs: in the chart view through ``view`` when given."""
    query = {"workflowType": "machine_learning"}
    if view is not None:
        query.update({"compareRunsMode": "CHART", VIEW_URL_PARAM: view})
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{urlencode(query)}"
