"""The run config: everything one training run needs, validated once.

A dotted key (``model.activation``) addresses any field; profiles are named bases of
defaults; ablation arms and ``--set`` are dotted overrides on top of a profile.
"""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from alexnet.errors import ConfigError
from alexnet.safe_yaml import SyntaxProblem, brief, load_yaml

# Bump when the meaning of an existing field changes, so that old cell keys stop matching.
CONFIG_SCHEMA_VERSION = 1

Source = Literal["synthetic", "cifar10", "cifar100", "imagefolder"]


def _axis_tables() -> dict[str, dict[str, object]]:
    """The models' tables of name -> factory, one per axis (timm's create_act pattern): what
    an arm may be called and what it builds are written once, there. Imported when a config
    is first validated, so that importing this module does not import torch."""
    from alexnet.models.alexnet import REMOVABLE_CONVS
    from alexnet.models.layers import ACTIVATIONS, NORMS, POOLS
    from alexnet.models.registry import MODELS
    from alexnet.models.weight_init import INITS

    return {"name": MODELS, "activation": ACTIVATIONS, "norm": NORMS, "pool": POOLS,
            "init": INITS, "remove_conv": REMOVABLE_CONVS}


def _one_of(axis: str) -> AfterValidator:
    """A name that must be a key of the models' table for ``axis``."""

    def check(name: str) -> str:
        allowed = list(_axis_tables()[axis])
        if name not in allowed:
            expected = ", ".join(repr(a) for a in allowed[:-1]) + f" or {allowed[-1]!r}"
            raise PydanticCustomError("literal_error", "Input should be {expected}",
                                      {"expected": expected})
        return name

    return AfterValidator(check)


ModelName = Annotated[str, _one_of("name")]
Activation = Annotated[str, _one_of("activation")]
Norm = Annotated[str, _one_of("norm")]
Pool = Annotated[str, _one_of("pool")]
Init = Annotated[str, _one_of("init")]
RemoveConv = Annotated[str, _one_of("remove_conv")]


class _Section(BaseModel):
    # No inf or nan anywhere: a non-finite lr or dropout is a typo, and the cell key is
    # strict JSON, which cannot hold one.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    name: ModelName = "alexnet_cifar"
    activation: Activation = "relu"
    norm: Norm = "lrn"
    pool: Pool = "overlap"  # overlap = 3/2 (Section 3.4), nonoverlap = 2/2
    dropout: float = Field(0.5, ge=0.0, lt=1.0)  # on fc6 and fc7 (Section 4.2)
    init: Init = "paper"  # paper = N(0, 0.01), biases 1 in conv2/4/5 and hidden fc (Section 5)
    towers: Literal[1, 2] = 1  # 2 = groups=2 in conv2, conv4, conv5 (Section 3.2)
    width: float = Field(1.0, gt=0.0, le=8.0)  # multiplies every conv and hidden fc width
    remove_conv: RemoveConv = "none"  # drop one middle conv layer (Section 7's depth claim)


# Upper bounds where a larger number can only be a typo (an extra zero that would fill the
# memory or run for months), each far above what the paper or any profile uses.
MAX_EPOCHS = 10_000  # the paper trains about 90
MAX_BATCH = 65_536  # the paper uses 128
MAX_SYNTHETIC_IMAGES = 1_000_000  # CIFAR-10 has 50,000 training images
MAX_SYNTHETIC_GIB = 8  # the generated uint8 images, held in memory


class SyntheticConfig(_Section):
    seed: int = 0  # the generated images depend on this alone, not on the run's seed
    num_classes: int = Field(10, ge=2, le=1000)
    train_size: int = Field(2000, ge=10, le=MAX_SYNTHETIC_IMAGES)
    val_size: int = Field(500, ge=10, le=MAX_SYNTHETIC_IMAGES)
    image_size: int = Field(32, ge=8, le=256)
    noise: float = Field(0.35, ge=0.0)  # larger = harder to separate

    @model_validator(mode="after")
    def _fits_in_memory(self) -> SyntheticConfig:
        gib = (self.train_size + self.val_size) * 3 * self.image_size**2 / 2**30
        if gib > MAX_SYNTHETIC_GIB:
            raise ValueError(f"train_size + val_size images of 3x{self.image_size}x"
                             f"{self.image_size} take {gib:.1f} GiB; the limit is "
                             f"{MAX_SYNTHETIC_GIB} GiB: fewer images or a smaller image_size")
        return self


class DataConfig(_Section):
    source: Source = "synthetic"
    # cifar: where torchvision keeps (or downloads) the archives; imagefolder: the tree
    # holding train/<class>/... . Not part of the cell key: the same data on another
    # machine lives under another path.
    root: str | None = None
    download: bool = True  # cifar10/100 only; offline and absent gives a clear error
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # carved from train when there is no val/
    split_seed: int = 0  # fixed across run seeds so every arm is scored on the same images
    max_train: int | None = Field(None, ge=10)  # stratified subset of train, for CPU-sized runs
    image_size: int = Field(32, ge=8)  # stored size: short side resized, centre-cropped
    crop_size: int = Field(32, ge=8)  # the model's input (227 from 256, Section 4.1)
    crop_padding: int = Field(4, ge=0)  # padded random crops at 32x32
    random_crop: bool = True
    flip: bool = True
    pca_lighting: bool = True  # Section 4.1, eigen-decomposition of this training set
    pca_std: float = Field(0.1, ge=0.0)
    ten_crop: bool = False  # evaluation: average softmax over 10 crops (Section 4.1)
    in_memory: bool = True  # False streams through ImageFolder + DataLoader workers
    cache_dir: str | None = None  # default: $ALEXNET_CACHE or ~/.cache/alexnet-ablate
    synthetic: SyntheticConfig = SyntheticConfig()


class OptimConfig(_Section):
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)  # coupled L2, as torch.optim.SGD does


class ScheduleConfig(_Section):
    # plateau: divide by 10 when validation error stops improving, at most three
    # times (Section 5); constant is what Figure 1's speed comparison needs.
    kind: Literal["plateau", "cosine", "step", "constant"] = "plateau"
    factor: float = Field(0.1, gt=0.0, lt=1.0)
    patience: int = Field(3, ge=0)
    max_decays: int = Field(3, ge=0)
    step_epochs: int = Field(30, ge=1)


class TrainConfig(_Section):
    epochs: int = Field(90, ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(128, ge=1, le=MAX_BATCH)
    eval_batch_size: int = Field(500, ge=1, le=MAX_BATCH)
    target_train_error: float = Field(0.25, gt=0.0, lt=1.0)  # Figure 1's line
    stop_at_target: bool = False  # end the run once training error reaches the target


class RuntimeConfig(_Section):
    """How a run executes: changes speed, not the experiment, so not in the cell key."""

    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    # auto = bf16 autocast on CUDA, and on a CPU with native bf16 (AVX-512 BF16 or AMX);
    # fp32 elsewhere, where CPU bf16 is emulated and slower than fp32 (train.use_bf16).
    amp: Literal["auto", "bf16", "off"] = "auto"
    channels_last: bool = True  # measured faster on CUDA and on the CPU (train.py)
    # torch.compile stays an explicit choice: on the CPU its warm-up (tens of seconds, again
    # for evaluation and every new batch shape) bought no steady gain over eager bf16 +
    # channels_last for the 32x32 nets (benchmarks/cpu_speed.py --with-compile).
    compile: bool = False
    threads: int | None = Field(None, ge=1)  # CPU threads for this run
    num_workers: int = Field(4, ge=0)  # DataLoader workers on the streaming path
    checkpoint: bool = True  # save at the end of every epoch, to resume
    log_model: bool = True  # a finished cell logs its MLflow model (`ablate serve`)


class RunConfig(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    seed: int = 0

    def flat(self) -> dict[str, Any]:
        """Every value under its dotted key, e.g. {"model.activation": "relu", ...}."""
        return flatten(self.model_dump(mode="json"))

    def key(self) -> str:
        """A stable hash of everything that affects training (see ``key_fields``)."""
        payload = {"schema": CONFIG_SCHEMA_VERSION, **key_fields(self)}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# Fields that change where or how fast a run happens but not what it computes.
_NOT_IN_KEY_PREFIXES = ("runtime.", "data.root", "data.download", "data.cache_dir",
                        "data.in_memory")


# Fields added after cell keys were first written, left out while at their default value:
# a new option must not change the key of every run already in a store.
_NEW_AT_DEFAULT = {"model.remove_conv": "none"}


def key_fields(cfg: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.flat().items() if not k.startswith(_NOT_IN_KEY_PREFIXES)
            and _NEW_AT_DEFAULT.get(k, object()) != v}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in tree.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def valid_keys() -> list[str]:
    return list(RunConfig().flat())


# --- profiles: named bases of defaults -------------------------------------------------

PROFILES: dict[str, dict[str, Any]] = {
    # Embedded synthetic data and a tiny net: a grid of a dozen cells in well under a
    # minute on a 2-core CPU (benchmarks/quick_grids.py). Adam, not the paper's SGD: with
    # SGD this net sits on a plateau near chance for a couple of hundred steps (longer
    # without normalization), while 36 Adam steps of 64 images take every arm of every
    # shipped ablation to 5-50% validation error (the half-width single tower to ~60%),
    # against 90% for chance. Batches of 64, not 32: 1.4x the images/s on a CPU for as good
    # an error; 768 training images keep the 44 distinct cells of `paper` within a minute.
    "quick": {
        "model.name": "alexnet_cifar",
        "model.width": 0.125,
        "data.source": "synthetic",
        "data.synthetic.train_size": 768,
        "data.synthetic.val_size": 256,
        "data.image_size": 32,
        "data.crop_size": 32,
        "data.crop_padding": 4,
        "optim.name": "adam",
        "optim.lr": 0.001,
        "optim.weight_decay": 5e-4,
        "train.epochs": 3,
        "train.batch_size": 64,
        "schedule.kind": "constant",
        "model.init": "kaiming",
    },
    # CIFAR-10 at its own 32x32 geometry (no upsampling to 227: 50x the compute).
    # Kaiming init departs from Section 5: with N(0, 0.01) this deep net sits at chance
    # for many epochs on small data (PAPER.md's "known trap"); set model.init=paper to see it.
    "cifar": {
        "model.name": "alexnet_cifar",
        "model.init": "kaiming",
        "data.source": "cifar10",
        "data.image_size": 32,
        "data.crop_size": 32,
        "data.crop_padding": 4,
        "optim.lr": 0.01,
        "train.epochs": 30,
        "train.batch_size": 128,
        "schedule.kind": "plateau",
        "schedule.patience": 2,
    },
    # The paper's recipe (Section 5) on an image folder such as ImageNet at 227 from 256.
    "imagenet": {
        "model.name": "alexnet",
        "model.towers": 2,
        "data.source": "imagefolder",
        "data.image_size": 256,
        "data.crop_size": 227,
        "data.crop_padding": 0,
        "data.in_memory": False,
        "optim.lr": 0.01,
        "optim.momentum": 0.9,
        "optim.weight_decay": 5e-4,
        "train.epochs": 90,
        "train.batch_size": 128,
        "schedule.kind": "plateau",
        "schedule.max_decays": 3,
    },
}

# --quick makes any ablation small enough for a laptop: it takes the quick profile's data,
# length of training and optimizer (not the weight decay: some claims need none), and
# scales every width by QUICK_WIDTH_SCALE instead of setting one (so that arms differing in
# width, one tower with half the kernels, keep their ratio). The axes (activation, norm,
# ...) are kept: arms still win over the quick settings.
QUICK_KEYS = ("data.", "train.epochs", "train.batch_size", "optim.name", "optim.lr")
QUICK_WIDTH_SCALE = 0.125


def with_quick(profile: str, base: dict[str, Any], arm: dict[str, Any]) -> dict[str, Any]:
    """``base`` then ``arm`` over the profile, at --quick's size (see QUICK_KEYS)."""
    quick = {k: v for k, v in PROFILES["quick"].items() if k.startswith(QUICK_KEYS)}
    flat = {**base, **quick, **arm}
    width = flat.get("model.width", PROFILES.get(profile, {}).get("model.width", 1.0))
    return {**flat, "model.width": width * QUICK_WIDTH_SCALE}


# --- building a run config from a profile and dotted overrides --------------------------


def suggest_key(key: str) -> str:
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    if close:
        return f"did you mean '{close[0]}'?"
    sections = sorted({k.split(".")[0] for k in valid_keys()})
    starts = ", ".join(s + "." for s in sections if s != "seed")
    return f"valid keys start with {starts} or are 'seed'"


@functools.cache
def _valid_key_set() -> frozenset[str]:
    return frozenset(valid_keys())  # built once: every override of every cell is checked


def check_key(key: str, where: str) -> None:
    if key not in _valid_key_set():
        raise ConfigError(f"{where}: unknown key {brief(key)}; {suggest_key(key)}")


def validate_override(key: str, value: Any, where: str) -> Any:
    """One dotted override checked on its own, so that its error names where it was given
    (a file's line, ``--set``) rather than the cell it ends up in. Returns the value as
    the config holds it ("0.5" -> 0.5). Checks that need several keys at once are left to
    ``build_config``."""
    check_key(key, where)
    try:
        cfg = RunConfig.model_validate(unflatten({key: value}))
    except ValidationError as err:
        mine = [e for e in err.errors()
                if f'{".".join(map(str, e["loc"]))}.'.startswith(f"{key}.")]
        if mine:
            raise ConfigError(f"{where}: {key}: {mine[0]['msg']} (got {brief(value)})"
                              ) from None
        return value
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def apply_overrides(
    base: dict[str, Any], overrides: dict[str, Any], where: str
) -> dict[str, Any]:
    """Return a copy of the flat mapping ``base`` with dotted ``overrides`` applied."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        check_key(key, where)
        out[key] = value
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def describe_validation_error(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    got = first.get("input")
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{where}: {key}: {first['msg']} (got {brief(got)}){more}"


def build_config(
    profile: str = "quick", overrides: dict[str, Any] | None = None, where: str = "config"
) -> RunConfig:
    """A validated RunConfig: the profile's defaults, then the dotted overrides in order."""
    if profile not in PROFILES:
        raise ConfigError(
            f"{where}: unknown profile '{profile}'; choose one of {', '.join(PROFILES)}"
        )
    flat = apply_overrides(PROFILES[profile], overrides or {}, where)
    try:
        return RunConfig.model_validate(unflatten(flat))
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, where)) from None


def with_values(cfg: RunConfig, values: dict[str, Any], where: str) -> RunConfig:
    """``cfg`` with dotted ``values`` replaced, validated again like any built config."""
    try:
        return RunConfig.model_validate(unflatten({**cfg.flat(), **values}))
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, where)) from None


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs; values are read as YAML scalars (0.1, true, tanh, null)
    and each is validated here, before anything opens a store."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {brief(item)}: expected key=value, e.g. "
                              "--set optim.lr=0.02")
        key = key.strip()
        check_key(key, "--set")
        if key in out:
            raise ConfigError(f"--set {key} is given twice; give each key once")
        try:
            value = load_yaml(raw, f"--set {key}") if raw.strip() else None
        except SyntaxProblem:
            value = raw  # not YAML: a plain string, such as a path with a colon in it
        out[key] = validate_override(key, value, "--set")
    return out
