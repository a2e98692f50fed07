"""Ablation files: YAML → validated Ablation → cells (arm combination × seed).

Every problem is a ConfigError of one line naming the file, the line where it can be
found, the key, and what is allowed, raised before anything runs or is logged.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from alexnet.claims import CLAIMS
from alexnet.config import (
    PROFILES,
    RunConfig,
    build_config,
    check_key,
    key_fields,
    quick_overrides,
)
from alexnet.errors import ConfigError

PACKAGE_ABLATIONS = Path(__file__).parent / "ablations"
# --quick shrinks every width by this factor instead of setting one width, so arms that
# differ in width (one tower with half the kernels) keep their ratio.
QUICK_WIDTH_SCALE = 0.125


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
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    include: list[str] = Field(default_factory=list)  # `paper`: several ablations in one

    @field_validator("axes", mode="before")
    @classmethod
    def _arms_may_be_empty_mappings(cls, v: Any) -> Any:
        # `norm:` with nothing under it is an empty axis (reported later), not a type error;
        # `relu:` with nothing under it is an arm with no overrides.
        if not isinstance(v, dict):
            return v
        return {a: {arm: (o or {}) for arm, o in arms.items()} if isinstance(arms, dict)
                else (arms or {}) for a, arms in v.items()}


@dataclass(frozen=True)
class Cell:
    ablation: str
    arms: dict[str, str]  # axis -> arm
    seed: int
    config: RunConfig
    claims: tuple[str, ...] = ()
    tuned: dict[str, float] = field(default_factory=dict)  # lr / wd chosen by a sweep
    varied: tuple[str, ...] = ()  # the dotted keys the ablation's arms set

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
        out = []
        axis_names = list(self.axes)
        varied = tuple(sorted({k for arms in self.axes.values() for o in arms.values()
                               for k in o}))
        for combo in itertools.product(*(self.axes[a].items() for a in axis_names)):
            arms = {a: arm for a, (arm, _) in zip(axis_names, combo, strict=True)}
            for seed in seeds if seeds is not None else self.seeds:
                flat = dict(self.base)
                if quick:
                    flat.update(quick_overrides())
                for _, arm_set in combo:
                    flat.update(arm_set)
                if quick:
                    flat["model.width"] = flat.get("model.width", 1.0) * QUICK_WIDTH_SCALE
                flat.update(overrides or {})
                flat["seed"] = seed
                cfg = build_config(self.profile, flat, where=f"{where} (arm {_label(arms)})")
                out.append(Cell(self.name, arms, seed, cfg, tuple(self.claims), varied=varied))
        return out


def _label(arms: dict[str, str]) -> str:
    return ",".join(f"{a}={v}" for a, v in arms.items())


# --- loading ---------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a duplicate arm must be an error."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"{loader.name}:{key_node.start_mark.line + 1}: duplicate key '{key}' "
                f"(first at line {seen[key] + 1}); each arm and key may appear once")
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _construct_mapping)


def _line_of(text: str, path: tuple[Any, ...]) -> int | None:
    """The 1-based line of the YAML node at ``path`` (keys and list indexes), if found."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    line = None
    for part in path:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(part)]
            if not match:
                return line
            line = match[0][0].start_mark.line + 1
            node = match[0][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) \
                and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _where(path: Path, text: str, loc: tuple[Any, ...]) -> str:
    line = _line_of(text, loc)
    return f"{path}:{line}" if line else str(path)


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
    text = path.read_text()
    try:
        with path.open() as fh:  # from a file, so that marks carry its name
            raw = yaml.load(fh, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: YAML syntax error: {err.problem or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML syntax error: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with name, title, axes, ...")
    spec = _validate_file(path, text, raw)
    for i, claim in enumerate(spec.claims):
        if claim not in CLAIMS:
            raise ConfigError(f"{_where(path, text, ('claims', i))}: unknown claim '{claim}'; "
                              f"known: {', '.join(CLAIMS)}")
    if spec.include:
        if spec.name in _seen:
            raise ConfigError(f"{path}: includes itself through {' → '.join(_seen)}")
        members = [load_ablation(n, (*_seen, spec.name)) for n in spec.include]
        return Ablation(spec.name, spec.title, spec.description,
                        sorted({c for m in members for c in m.claims}), spec.base.profile, {},
                        {}, {}, spec.seeds, path, members)
    ablation = _build(path, text, spec)
    ablation.cells()  # validates every arm's resolved config now, not halfway through a grid
    return ablation


def _validate_file(path: Path, text: str, raw: dict[str, Any]) -> AblationFile:
    try:
        return AblationFile.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            valid = _allowed_keys(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
            raise ConfigError(f"{_where(path, text, loc)}: unknown key '{loc[-1]}'; {hint}") \
                from None
        dotted = ".".join(str(p) for p in loc)
        raise ConfigError(f"{_where(path, text, loc)}: {dotted}: {e['msg']} "
                          f"(got {e.get('input')!r})") from None


def _allowed_keys(parent: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Base if parent == ("base",) else AblationFile
    return list(model.model_fields)


def _build(path: Path, text: str, spec: AblationFile) -> Ablation:
    if spec.base.profile not in PROFILES:
        raise ConfigError(f"{_where(path, text, ('base', 'profile'))}: unknown profile "
                          f"'{spec.base.profile}'; choose one of {', '.join(PROFILES)}")
    for key in spec.base.set:
        check_key(key, _where(path, text, ("base", "set", key)))
    if not spec.axes:
        raise ConfigError(f"{path}: no axes; add at least one axis with two or more arms")
    if not spec.seeds:
        raise ConfigError(f"{_where(path, text, ('seeds',))}: seeds is empty; list at least one")
    for axis, arms in spec.axes.items():
        if not arms:
            raise ConfigError(f"{_where(path, text, ('axes', axis))}: axis '{axis}' is empty; "
                              "give it at least one arm")
        for arm, overrides in arms.items():
            for key in overrides:
                check_key(key, _where(path, text, ("axes", axis, arm, key)))
    for axis, arm in spec.reference.items():
        if axis not in spec.axes:
            raise ConfigError(f"{_where(path, text, ('reference', axis))}: reference names axis "
                              f"'{axis}'; the axes are {', '.join(spec.axes)}")
        if arm not in spec.axes[axis]:
            raise ConfigError(f"{_where(path, text, ('reference', axis))}: unknown arm '{arm}' "
                              f"for axis '{axis}'; allowed: {', '.join(spec.axes[axis])}")
    # The reference arm defaults to each axis's first arm.
    reference = {a: spec.reference.get(a, next(iter(arms))) for a, arms in spec.axes.items()}
    return Ablation(spec.name, spec.title, spec.description, spec.claims, spec.base.profile,
                    dict(spec.base.set), spec.axes, reference, spec.seeds, path)
