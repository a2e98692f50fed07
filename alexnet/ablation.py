"""Ablation files: YAML → validated Ablation → cells (arm combination × seed).

Every problem is a ConfigError of one line naming the file, the line where it can be
found, the key, and what is allowed, raised before anything runs or is logged. The YAML is
read within limits (size, nesting, aliases; see safe_yaml), and the grid it describes is
bounded too, so no file makes loading hang.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from alexnet.claims import CLAIMS
from alexnet.config import (
    PROFILES,
    RunConfig,
    build_config,
    key_fields,
    validate_override,
    with_quick,
)
from alexnet.errors import ConfigError
from alexnet.safe_yaml import MAX_BYTES, brief, load_yaml

PACKAGE_ABLATIONS = Path(__file__).parent / "ablations"
# Seeds as numpy and every RNG accept them; more cells than this is a typo (an axis too
# many, a seed count with extra zeros), not a grid anyone means to run.
MAX_SEED = 2**32 - 1
MAX_CELLS = 10_000
MAX_MEMBERS = 100  # ablations one file may include, counted through nested includes
# Ablation, axis and arm names become MLflow experiment names, tag keys (axis.<name>) and
# labels split on "," and "=": letters, digits, _ . - only.
NAME = re.compile(r"\w[\w.\-]{0,63}", re.ASCII)


class Base(BaseModel):
    model_config = ConfigDict(extra="forbid")
    profile: str = "cifar"
    set: dict[str, Any] = Field(default_factory=dict)


class AblationFile(BaseModel):
    """The schema of ablations/*.yaml."""

    model_config = ConfigDict(extra="forbid")
    name: str
    title: str
    description: str = ""
    claims: list[str] = Field(default_factory=list)
    base: Base = Field(default_factory=Base)
    axes: dict[str, dict[str, dict[str, Any]]] = Field(default_factory=dict)
    reference: dict[str, str] = Field(default_factory=dict)
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(
        default_factory=lambda: [0, 1, 2])
    include: list[str] = Field(default_factory=list)  # `paper`: several ablations in one

    @field_validator("axes", mode="before")
    @classmethod
    def _arms_may_be_empty_mappings(cls, v: Any) -> Any:
        # `norm:` with nothing under it is an empty axis (reported later), not a type error;
        # `relu:` with nothing under it is an arm with no overrides. `relu: 0` stays an error.
        if not isinstance(v, dict):
            return v
        return {a: {arm: {} if o is None else o for arm, o in arms.items()}
                if isinstance(arms, dict) else {} if arms is None else arms
                for a, arms in v.items()}


@dataclass(frozen=True)
class Cell:
    ablation: str
    arms: dict[str, str]  # axis -> arm
    seed: int
    config: RunConfig
    claims: tuple[str, ...] = ()
    tuned: dict[str, float] = field(default_factory=dict)  # lr / wd chosen by a sweep
    varied: tuple[str, ...] = ()  # the dotted keys the ablation's arms set
    quick: bool = False  # made with --quick

    @cached_property
    def key(self) -> str:
        return self.config.key()

    @cached_property
    def grid_key(self) -> str:
        """What every cell of one grid shares: the resolved config minus what the arms and
        the seed vary (and a tuned cell's lr and weight decay, which a sweep chose per arm).
        Runs with different grid keys differ in scale or recipe, so a report never pools
        them."""
        skip = {*self.varied, "seed"}
        if self.tuned:
            skip |= {"optim.lr", "optim.weight_decay"}
        shared = {k: v for k, v in key_fields(self.config).items() if k not in skip}
        text = json.dumps({"tuned": bool(self.tuned), **shared}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def arm_label(self) -> str:
        return ",".join(f"{axis}={arm}" for axis, arm in self.arms.items())


@dataclass
class Ablation:
    name: str
    title: str
    description: str
    claims: list[str]
    profile: str
    base: dict[str, Any]
    axes: dict[str, dict[str, dict[str, Any]]]
    reference: dict[str, str]
    seeds: list[int]
    path: Path
    include: list[Ablation] = field(default_factory=list)

    def members(self) -> list[Ablation]:
        """The ablations that actually run: itself, or the ones it includes."""
        return [m for inc in self.include for m in inc.members()] if self.include else [self]

    def cells(self, *, quick: bool = False, seeds: list[int] | None = None,
              overrides: dict[str, Any] | None = None) -> list[Cell]:
        """The product of the axes × seeds, each with its fully resolved run config.

        Order of precedence: profile < base.set < --quick < arm < command-line overrides.
        """
        if self.include:
            return [c for m in self.members() for c in m.cells(quick=quick, seeds=seeds,
                                                              overrides=overrides)]
        where = str(self.path)
        seeds = self.seeds if seeds is None else seeds
        count = math.prod(len(arms) for arms in self.axes.values()) * len(seeds)
        if count > MAX_CELLS:
            raise ConfigError(f"{where}: {count:,} cells (arm combinations x seeds); the "
                              f"limit is {MAX_CELLS:,}: fewer axes, arms or seeds")
        check_seeds(seeds, "seeds")
        out = []
        axis_names = list(self.axes)
        varied = tuple(sorted({k for arms in self.axes.values() for o in arms.values()
                               for k in o}))
        for combo in itertools.product(*(self.axes[a].items() for a in axis_names)):
            arms = {a: arm for a, (arm, _) in zip(axis_names, combo, strict=True)}
            for seed in seeds:
                arm = {k: v for _, arm_set in combo for k, v in arm_set.items()}
                flat = with_quick(self.profile, self.base, arm) if quick else {
                    **self.base, **arm}
                flat.update(overrides or {})
                flat["seed"] = seed
                cfg = build_config(self.profile, flat, where=f"{where} (arm {_label(arms)})")
                out.append(Cell(self.name, arms, seed, cfg, tuple(self.claims), varied=varied,
                                quick=quick))
        return out


def select_arms(cells: list[Cell], wanted: list[str] | None) -> list[Cell]:
    """One cell per arm (its first seed's); ``wanted`` names arms as ``activation=tanh`` or
    just ``tanh`` (every arm combination holding it)."""
    arms: dict[tuple[str, str], Cell] = {}
    for c in cells:
        arms.setdefault((c.ablation, c.arm_label), c)
    chosen = set(arms) if not wanted else set()
    for w in wanted or []:
        hits = {k for k, c in arms.items()
                if w in (c.arm_label, f"{c.ablation}/{c.arm_label}", *c.arms.values())}
        if not hits:
            labels = ", ".join(dict.fromkeys(c.arm_label for c in cells))
            values = ", ".join(dict.fromkeys(v for c in cells for v in c.arms.values()))
            raise ConfigError(f"--arm {w!r}: no such arm in {cells[0].ablation}; allowed: "
                              f"{labels} (or just {values})")
        chosen |= hits
    return [c for k, c in arms.items() if k in chosen]


def _label(arms: dict[str, str]) -> str:
    return ",".join(f"{a}={v}" for a, v in arms.items())


def check_seeds(seeds: list[int], where: str) -> None:
    """Each seed once (the same seed twice is the same cell twice), within 0..MAX_SEED."""
    seen: set[int] = set()
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"{where}: seed {brief(seed)} is not a whole number in "
                              f"0..{MAX_SEED}")
        if seed in seen:
            raise ConfigError(f"{where}: seed {seed} is given twice; list each seed once")
        seen.add(seed)


# --- loading ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """An ablation file and the line of each of its keys and list items, so that a message
    names the line: indexed once, as a lookup per key would read the file once per key."""

    path: Path
    lines: dict[tuple[Any, ...], int]

    @classmethod
    def index(cls, path: Path, text: str) -> _Source:
        lines: dict[tuple[Any, ...], int] = {}
        # Only called on text that safe_yaml has read, so its size and nesting are bounded;
        # a node reached twice (an alias) is indexed at its first place only.
        todo: list[tuple[tuple[Any, ...], yaml.Node]] = [((), yaml.compose(text, yaml.SafeLoader))]
        seen: set[int] = set()
        while todo:
            loc, node = todo.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    if isinstance(k, yaml.ScalarNode):
                        lines.setdefault((*loc, k.value), k.start_mark.line + 1)
                        todo.append(((*loc, k.value), v))
            elif isinstance(node, yaml.SequenceNode):
                for i, v in enumerate(node.value):
                    lines.setdefault((*loc, i), v.start_mark.line + 1)
                    todo.append(((*loc, i), v))
        return cls(path, lines)

    def at(self, *loc: Any) -> str:
        """``path:line`` of the deepest part of ``loc`` found (pydantic's loc or our own)."""
        parts = tuple(p if isinstance(p, int) else str(p) for p in loc)
        for end in range(len(parts), 0, -1):
            if parts[:end] in self.lines:
                return f"{self.path}:{self.lines[parts[:end]]}"
        return str(self.path)


def search_dirs() -> list[Path]:
    """./ablations first, then the copies shipped inside the installed package."""
    return [Path.cwd() / "ablations", PACKAGE_ABLATIONS]


def known_ablations() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in reversed(search_dirs()):  # the working directory's copy wins
        if folder.is_dir():
            for p in sorted(folder.glob("*.yaml")):
                found[p.stem] = p
    return dict(sorted(found.items()))


def find_ablation(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"ablation file {p} does not exist")
        return p
    known = known_ablations()
    if name_or_path in known:
        return known[name_or_path]
    close = difflib.get_close_matches(name_or_path, list(known), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError(f"unknown ablation '{name_or_path}'; {hint}known: {', '.join(known)} "
                      "(or pass a path to a .yaml file)")


def load_ablation(name_or_path: str, _seen: tuple[str, ...] = ()) -> Ablation:
    """Find, parse and validate an ablation; every arm's config is validated here too."""
    path = find_ablation(name_or_path)
    text = _read_text(path)
    raw = load_yaml(text, str(path))
    if not isinstance(raw, dict):
        got = "empty" if raw is None else f"a {type(raw).__name__}, not a mapping"
        raise ConfigError(f"{path}: the file is {got}; an ablation is a mapping with name, "
                          "title, axes, ...")
    src = _Source.index(path, text)
    spec = _validate_file(src, raw)
    for i, claim in enumerate(spec.claims):
        if claim not in CLAIMS:
            raise ConfigError(f"{src.at('claims', i)}: unknown claim "
                              f"{brief(claim)}; known: {', '.join(CLAIMS)}")
    _check_name("ablation name", spec.name, src.at("name"))
    if spec.include:
        return _include(src, spec, _seen)
    ablation = _build(src, spec)
    ablation.cells()  # validates every arm's resolved config now, not halfway through a grid
    return ablation


def _read_text(path: Path) -> str:
    """The file as text; a binary, Latin-1 or huge file is one line naming it."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_BYTES + 1)  # never more: the file might be enormous
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err}); check the path "
                          "and its permissions") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_BYTES:,} bytes; an ablation file is "
                          "about 1 KB (is this the right file?)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                          f"{err.start}); save it as UTF-8") from None


def _include(src: _Source, spec: AblationFile, seen: tuple[str, ...]) -> Ablation:
    """An ablation made of others (`paper`): each member loads and validates on its own."""
    where = src.at("include")
    if spec.axes:
        raise ConfigError(f"{src.at('axes')}: an ablation either includes "
                          "others or has axes; move the axes to a file of their own")
    if spec.name in seen:
        raise ConfigError(f"{src.path}: includes itself through {' → '.join(seen)}")
    if len(spec.include) > MAX_MEMBERS:
        raise ConfigError(f"{where}: includes {len(spec.include):,} ablations; the limit is "
                          f"{MAX_MEMBERS}")
    listed: set[str] = set()
    for name in spec.include:
        if name in listed:
            raise ConfigError(f"{where}: includes {brief(name)} twice; list it once")
        listed.add(name)
    members = [load_ablation(n, (*seen, spec.name)) for n in spec.include]
    count = sum(len(m.members()) for m in members)  # each member is within the limit
    if count > MAX_MEMBERS:
        raise ConfigError(f"{where}: includes {count:,} ablations through its includes; the "
                          f"limit is {MAX_MEMBERS}")
    return Ablation(spec.name, spec.title, spec.description,
                    sorted({c for m in members for c in m.claims}), spec.base.profile, {},
                    {}, {}, spec.seeds, src.path, members)


def _validate_file(src: _Source, raw: dict[str, Any]) -> AblationFile:
    try:
        return AblationFile.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            valid = _allowed_keys(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
            raise ConfigError(f"{src.at(*loc)}: unknown key {brief(loc[-1])}; "
                              f"{hint}") from None
        dotted = ".".join(str(p) for p in loc)
        raise ConfigError(f"{src.at(*loc)}: {dotted}: {e['msg']} "
                          f"(got {brief(e.get('input'))})") from None


def _allowed_keys(parent: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Base if parent == ("base",) else AblationFile
    return list(model.model_fields)


def _build(src: _Source, spec: AblationFile) -> Ablation:
    if spec.base.profile not in PROFILES:
        raise ConfigError(f"{src.at('base', 'profile')}: unknown profile "
                          f"{brief(spec.base.profile)}; choose one of {', '.join(PROFILES)}")
    # Each override is validated where it is written, so that an error names its line; the
    # validated value is kept ("0.5" -> 0.5), which --quick's width scaling relies on.
    base = {key: validate_override(key, value, src.at("base", "set", key))
            for key, value in spec.base.set.items()}
    if not spec.axes:
        raise ConfigError(f"{src.path}: no axes; add at least one axis with two or more arms")
    if not spec.seeds:
        raise ConfigError(f"{src.at('seeds')}: seeds is empty; list at least one")
    check_seeds(spec.seeds, src.at("seeds"))
    axes: dict[str, dict[str, dict[str, Any]]] = {}
    for axis, arms in spec.axes.items():
        _check_name("axis name", axis, src.at("axes", axis))
        if not arms:
            raise ConfigError(f"{src.at('axes', axis)}: axis '{axis}' is empty; "
                              "give it at least one arm")
        axes[axis] = {}
        for arm, overrides in arms.items():
            _check_name("arm name", arm, src.at("axes", axis, arm))
            axes[axis][arm] = {
                key: validate_override(key, value, src.at("axes", axis, arm, key))
                for key, value in overrides.items()}
    for axis, arm in spec.reference.items():
        if axis not in spec.axes:
            raise ConfigError(f"{src.at('reference', axis)}: reference names axis "
                              f"{brief(axis)}; the axes are {', '.join(spec.axes)}")
        if arm not in spec.axes[axis]:
            raise ConfigError(f"{src.at('reference', axis)}: unknown arm "
                              f"{brief(arm)} for axis '{axis}'; allowed: "
                              f"{', '.join(spec.axes[axis])}")
    # The reference arm defaults to each axis's first arm.
    reference = {a: spec.reference.get(a, next(iter(arms))) for a, arms in spec.axes.items()}
    return Ablation(spec.name, spec.title, spec.description, spec.claims, spec.base.profile,
                    base, axes, reference, spec.seeds, src.path)


def _check_name(kind: str, name: str, where: str) -> None:
    if not NAME.fullmatch(name):
        raise ConfigError(f"{where}: {kind} {brief(name)} may hold only letters, digits, "
                          "_ . and - (at most 64, starting with a letter or digit)")
