"""The model zoo: the paper's numbers, the axes, the custom layers, the summary table."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from rich.table import Table
from torch import nn

from alexnet.config import ModelConfig
from alexnet.errors import ConfigError
from alexnet.models import (
    MODELS,
    LocallyConnected2d,
    build_model,
    count_params,
    describe_model,
    get_activation,
    get_norm,
    get_pool,
    input_size,
    render_table,
)
from alexnet.models.weight_init import fan_in

# Small enough that a 227x227 alexnet forward + backward takes milliseconds.
TINY_WIDTH = {"alexnet": 0.125, "alexnet_cifar": 0.125, "convnet4": 0.25}


def meta_model(name: str, **options: object) -> nn.Module:
    # Full-size nets on the meta device: real shapes and parameter counts, no memory, no
    # time spent drawing 60 M random numbers.
    with torch.device("meta"):
        return build_model(name, **options)


def layer(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


def weighted_layers(model: nn.Module) -> dict[str, nn.Module]:
    kinds = (nn.Conv2d, nn.Linear, LocallyConnected2d)
    return {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if isinstance(m, kinds)}


# --- the paper's network ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("towers", "norm", "expected"),
    [(2, "lrn", 60_965_224), (1, "lrn", 62_378_344), (2, "none", 60_965_224)],
)
def test_alexnet_parameter_count_is_the_papers(towers: int, norm: str, expected: int) -> None:
    model = meta_model("alexnet", towers=towers, norm=norm)
    assert count_params(model) == expected


def test_batchnorm_adds_two_parameters_per_conv_channel() -> None:
    model = meta_model("alexnet", towers=2, norm="bn")
    assert count_params(model) == 60_965_224 + 2 * (96 + 256 + 384 + 384 + 256)


def test_models_do_not_need_torchvision() -> None:
    # torchvision's alexnet is a different network; ours must not come from it.
    code = (
        "import sys; from alexnet.models import build_model; build_model('alexnet_cifar', 10,"
        " width=0.125); assert 'torchvision' not in sys.modules, 'torchvision imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_build_model_is_importable_from_the_package_top() -> None:
    from alexnet import build_model as top_level

    assert top_level is build_model
    model = top_level("alexnet_cifar", num_classes=7, width=0.125, norm="bn")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    # ...without making `import alexnet` (every CLI command) pay for importing torch.
    code = "import sys, alexnet; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("pool", ["overlap", "nonoverlap"])
def test_alexnet_shapes_at_227(pool: str) -> None:
    model = meta_model("alexnet", towers=2, pool=pool)
    shapes = {r.name: r.output_shape for r in describe_model(model, 227)}
    assert shapes["features.conv1"] == (1, 96, 55, 55)
    assert shapes["features.pool1"] == (1, 96, 27, 27)
    assert shapes["features.pool2"] == (1, 256, 13, 13)
    assert shapes["features.conv3"] == (1, 384, 13, 13)
    assert shapes["features.conv4"] == (1, 384, 13, 13)
    assert shapes["features.pool5"] == (1, 256, 6, 6)
    assert shapes["classifier.fc8"] == (1, 1000)
    assert layer(model, "classifier.fc6").in_features == 256 * 6 * 6


@pytest.mark.parametrize("towers", [1, 2])
def test_towers_group_conv2_conv4_conv5_only(towers: int) -> None:
    model = meta_model("alexnet", towers=towers)
    groups = {n: m.groups for n, m in weighted_layers(model).items() if n.startswith("conv")}
    assert groups == {"conv1": 1, "conv2": towers, "conv3": 1, "conv4": towers, "conv5": towers}


@pytest.mark.parametrize(
    ("norm", "order"),
    [
        # Section 3.3: LRN after the ReLU of conv1 and conv2, before their pooling.
        (
            "lrn",
            "conv1 act1 lrn1 pool1 conv2 act2 lrn2 pool2 conv3 act3 conv4 act4 conv5 act5 pool5",
        ),
        (
            "bn",
            "conv1 bn1 act1 pool1 conv2 bn2 act2 pool2 conv3 bn3 act3 conv4 bn4 act4 "
            "conv5 bn5 act5 pool5",
        ),
        ("none", "conv1 act1 pool1 conv2 act2 pool2 conv3 act3 conv4 act4 conv5 act5 pool5"),
    ],
)
def test_alexnet_layer_order(norm: str, order: str) -> None:
    model = meta_model("alexnet", norm=norm)
    assert " ".join(name for name, _ in model.features.named_children()) == order
    classifier = " ".join(name for name, _ in model.classifier.named_children())
    assert classifier == "drop6 fc6 act6 drop7 fc7 act7 fc8"


def test_convnet4_layer_order_and_shapes() -> None:
    model = build_model("convnet4", 10, norm="lrn")
    names = " ".join(name for name, _ in model.features.named_children())
    assert names == "conv1 act1 pool1 lrn1 conv2 act2 lrn2 pool2 local3 act3 local4 act4"
    shapes = {r.name: r.output_shape for r in describe_model(model, 32)}
    assert shapes["features.pool1"] == (1, 64, 15, 15)
    assert shapes["features.pool2"] == (1, 64, 7, 7)
    assert shapes["features.local4"] == (1, 32, 7, 7)
    assert shapes["classifier.fc"] == (1, 10)


# --- local response normalization (Section 3.3) -----------------------------------------


def paper_lrn_loop(a: torch.Tensor, k=2.0, n=5, alpha=1e-4, beta=0.75) -> torch.Tensor:
    """b_i = a_i / (k + alpha * sum_{j=max(0, i-n/2)}^{min(N-1, i+n/2)} a_j^2)^beta."""
    channels = a.shape[1]
    out = torch.empty_like(a)
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        total = (a[:, lo : hi + 1] ** 2).sum(dim=1)
        out[:, i] = a[:, i] / (k + alpha * total) ** beta
    return out


def test_lrn_is_the_papers_formula() -> None:
    torch.manual_seed(0)
    # Large activations, so that a 5x slip in alpha would change the result visibly.
    a = torch.rand(2, 11, 4, 4, dtype=torch.float64) * 60
    lrn = get_norm("lrn", 11)
    expected = paper_lrn_loop(a)
    torch.testing.assert_close(lrn(a), expected, rtol=1e-10, atol=1e-10)
    wrong = nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0)
    assert not torch.allclose(wrong(a), expected, rtol=1e-3)


# --- initialization (Section 5) ----------------------------------------------------------


def test_paper_init_alexnet() -> None:
    torch.manual_seed(0)
    model = build_model("alexnet", 1000, init="paper", towers=2, width=0.25)
    layers = weighted_layers(model)
    assert set(layers) == {"conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"}
    for name, m in layers.items():
        assert m.weight.std().item() == pytest.approx(0.01, rel=0.05), name
        assert abs(m.weight.mean().item()) < 1e-3, name
        bias = 1.0 if name in {"conv2", "conv4", "conv5", "fc6", "fc7"} else 0.0
        assert torch.equal(m.bias, torch.full_like(m.bias, bias)), name


def test_paper_init_convnet4_biases_zero() -> None:
    torch.manual_seed(0)
    model = build_model("convnet4", 10, init="paper")
    for name, m in weighted_layers(model).items():
        assert m.weight.std().item() == pytest.approx(0.01, rel=0.05), name
        assert torch.count_nonzero(m.bias) == 0, name


def conv_fan_in(m: nn.Module) -> int:
    """in_channels / groups * k * k, from the layer's own attributes."""
    if isinstance(m, nn.Linear):
        return m.in_features
    if isinstance(m, LocallyConnected2d):
        return m.in_channels * m.kernel_size**2
    return m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]


@pytest.mark.parametrize(
    ("name", "activation", "gain"),
    [
        ("alexnet", "relu", math.sqrt(2)),
        ("alexnet_cifar", "tanh", 5 / 3),
        ("convnet4", "relu", math.sqrt(2)),
        ("convnet4", "gelu", math.sqrt(2)),  # no torch gain for gelu: ReLU's
    ],
)
def test_kaiming_init(name: str, activation: str, gain: float) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10, init="kaiming", activation=activation, width=0.25)
    for lname, m in weighted_layers(model).items():
        expected_fan_in = conv_fan_in(m)
        assert fan_in(m) == expected_fan_in, lname
        # The logits layer is followed by no activation: gain 1 there.
        std = (1.0 if lname in {"fc8", "fc"} else gain) / math.sqrt(expected_fan_in)
        assert m.weight.std().item() == pytest.approx(std, rel=0.1), lname
        assert torch.count_nonzero(m.bias) == 0, lname


@pytest.mark.parametrize("init", ["paper", "kaiming"])
def test_batchnorm_starts_as_identity(init: str) -> None:
    model = build_model("alexnet_cifar", 10, norm="bn", init=init, width=0.125)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 5
    for bn in bns:
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


# --- every arm builds, runs forward and backward -----------------------------------------

ARMS = [
    *(("activation", a) for a in ["relu", "tanh", "gelu", "leaky_relu", "elu", "sigmoid"]),
    *(("norm", n) for n in ["lrn", "bn", "none"]),
    *(("pool", p) for p in ["overlap", "nonoverlap"]),
    ("dropout", 0.0),
    ("dropout", 0.5),
    ("init", "paper"),
    ("init", "kaiming"),
    ("towers", 1),
    ("towers", 2),
    ("width", 0.3),  # an awkward multiplier: channel counts must still round sensibly
]


# convnet4 has no towers=2 arm (its ConfigError is in test_bad_options).
CASES = [(n, a, v) for n in MODELS for a, v in ARMS if (n, a, v) != ("convnet4", "towers", 2)]


CASE_IDS = [f"{n}-{a}={v}" for n, a, v in CASES]


@pytest.mark.parametrize(("name", "axis", "value"), CASES, ids=CASE_IDS)
def test_every_arm_runs_forward_and_backward(name: str, axis: str, value: object) -> None:
    torch.manual_seed(0)
    options = {"width": TINY_WIDTH[name], axis: value}
    if axis == "width":
        options["width"] = value * TINY_WIDTH[name] * 4
        options["towers"] = 2 if name != "convnet4" else 1
    model = build_model(name, 10, **options)
    model.train()
    size = input_size(name)
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    if name != "convnet4" and options.get("towers") == 2:
        for n, m in weighted_layers(model).items():
            if n.startswith("conv"):
                assert m.out_channels % 2 == 0, n


def test_flatten_size_is_computed_per_pool_arm() -> None:
    w = 0.125
    over = build_model("alexnet_cifar", 10, pool="overlap", width=w)
    non = build_model("alexnet_cifar", 10, pool="nonoverlap", width=w)
    assert layer(over, "classifier.fc6").in_features == 32 * 3 * 3
    assert layer(non, "classifier.fc6").in_features == 32 * 4 * 4
    for model in (over, non):
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_width_scales_every_conv_and_hidden_fc() -> None:
    model = meta_model("alexnet", towers=2, width=0.5)
    layers = weighted_layers(model)
    assert [layers[f"conv{i}"].out_channels for i in range(1, 6)] == [48, 128, 192, 192, 128]
    assert layers["fc6"].out_features == layers["fc7"].out_features == 2048
    assert layers["fc8"].out_features == 1000


@pytest.mark.parametrize(("field", "table"), [
    ("name", "alexnet.models.registry:MODELS"),
    ("activation", "alexnet.models.layers:ACTIVATIONS"),
    ("norm", "alexnet.models.layers:NORMS"),
    ("pool", "alexnet.models.layers:POOLS"),
    ("init", "alexnet.models.weight_init:INITS"),
    ("remove_conv", "alexnet.models.alexnet:REMOVABLE_CONVS"),
])
def test_the_config_accepts_exactly_the_names_the_models_build(field: str, table: str) -> None:
    """One table per axis: adding a line to it is all it takes to add an arm."""
    import importlib

    from pydantic import ValidationError

    module, attr = table.split(":")
    names = list(getattr(importlib.import_module(module), attr))
    for name in names:
        assert getattr(ModelConfig(**{field: name}), field) == name
    with pytest.raises(ValidationError) as err:
        ModelConfig(**{field: "not_a_" + field})
    message = err.value.errors()[0]["msg"]
    assert all(repr(name) in message for name in names)


def test_input_sizes() -> None:
    assert {n: input_size(n) for n in MODELS} == {"alexnet": 227, "alexnet_cifar": 32,
                                                   "convnet4": 32}


# --- the depth axis: one middle conv layer removed (Section 7) ------------------------------

REMOVABLE = ["conv2", "conv3", "conv4"]


def paper_conv_params(towers: int, stem_kernel: int, removed: str = "none") -> int:
    """The conv layers' parameters at width 1, from the paper's shapes (Section 3.5):
    out * (in / groups) * k * k weights plus out biases; the conv after a removed one takes
    the maps of the conv before it."""
    shapes = [  # (name, out channels, kernel, groups)
        ("conv1", 96, stem_kernel, 1),
        ("conv2", 256, 5, towers),
        ("conv3", 384, 3, 1),
        ("conv4", 384, 3, towers),
        ("conv5", 256, 3, towers),
    ]
    total, maps = 0, 3
    for name, out, k, groups in shapes:
        if name != removed:
            total += out * (maps // groups) * k * k + out
            maps = out
    return total


def conv_order(model: nn.Module) -> list[str]:
    return [n for n, _ in model.features.named_children() if n.startswith("conv")]


@pytest.mark.parametrize(("name", "stem_kernel"), [("alexnet", 11), ("alexnet_cifar", 5)])
@pytest.mark.parametrize("towers", [1, 2])
@pytest.mark.parametrize("removed", REMOVABLE)
def test_removing_a_conv_drops_exactly_its_parameters_and_the_next_convs_extra_inputs(
    name: str, stem_kernel: int, towers: int, removed: str
) -> None:
    full = meta_model(name, towers=towers)
    shallow = meta_model(name, towers=towers, remove_conv=removed)
    drop = paper_conv_params(towers, stem_kernel) - paper_conv_params(
        towers, stem_kernel, removed
    )
    assert drop > 0
    assert count_params(full) - count_params(shallow) == drop
    # pool2 stays, so fc6 sees the same maps and only the conv stack changes.
    assert layer(shallow, "classifier.fc6").in_features == layer(full, "classifier.fc6").in_features


def test_the_full_net_is_unchanged_and_each_shallower_one_is_the_papers_minus_one_layer() -> None:
    assert count_params(meta_model("alexnet", towers=2, remove_conv="none")) == 60_965_224
    # Worked by hand from the shapes: conv2 (307,456) goes and conv3's input shrinks from
    # 256 to 96 maps (-552,960); conv3 (885,120) goes and conv4, grouped, takes 256 maps
    # instead of 384 (-221,184); conv4 (663,936) goes and conv5 keeps its 384 inputs.
    expected = {"conv2": 60_104_808, "conv3": 59_858_920, "conv4": 60_301_288}
    for removed, params in expected.items():
        assert count_params(meta_model("alexnet", towers=2, remove_conv=removed)) == params


@pytest.mark.parametrize("name", ["alexnet", "alexnet_cifar"])
@pytest.mark.parametrize("towers", [1, 2])
@pytest.mark.parametrize("removed", REMOVABLE)
def test_shallower_net_runs_and_chains_its_convs(name: str, towers: int, removed: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10, towers=towers, width=TINY_WIDTH[name], remove_conv=removed)
    convs = conv_order(model)
    assert convs == [c for c in ["conv1", "conv2", "conv3", "conv4", "conv5"] if c != removed]
    modules = dict(model.features.named_children())
    index = int(removed[-1])
    before, after = modules[f"conv{index - 1}"], modules[f"conv{index + 1}"]
    assert after.in_channels == before.out_channels
    assert after.in_channels % after.groups == 0
    # The removed layer takes what is its own (activation, conv2's LRN) but no pooling.
    assert not {f"act{index}", f"lrn{index}"} & set(modules)
    assert {"pool1", "pool2", "pool5"} <= set(modules)
    size = input_size(name)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("removed", REMOVABLE)
def test_paper_bias_one_rule_still_applies_to_the_convs_that_remain(removed: str) -> None:
    model = build_model("alexnet_cifar", 10, init="paper", width=0.125, remove_conv=removed)
    layers = weighted_layers(model)
    assert removed not in layers
    for name, m in layers.items():
        bias = 1.0 if name in {"conv2", "conv4", "conv5", "fc6", "fc7"} else 0.0
        assert torch.equal(m.bias, torch.full_like(m.bias, bias)), name


# --- the locally connected layer ----------------------------------------------------------


def naive_local(layer: LocallyConnected2d, x: torch.Tensor) -> torch.Tensor:
    k, s, p, n = layer.kernel_size, layer.stride, layer.padding, layer.output_size
    xp = nn.functional.pad(x, (p, p, p, p))
    out = torch.empty(x.shape[0], layer.out_channels, n, n, dtype=x.dtype)
    for i in range(n):
        for j in range(n):
            patch = xp[:, :, i * s : i * s + k, j * s : j * s + k].reshape(x.shape[0], -1)
            w = layer.weight[i * n + j]  # this position's own filter: (out, in*k*k)
            out[:, :, i, j] = patch @ w.T + layer.bias[:, i, j]
    return out


@pytest.mark.parametrize(("stride", "padding"), [(1, 1), (2, 0)])
def test_locally_connected_matches_naive(stride: int, padding: int) -> None:
    torch.manual_seed(0)
    local = LocallyConnected2d(3, 4, 3, input_size=5, stride=stride, padding=padding).double()
    nn.init.normal_(local.bias)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(local(x), naive_local(local, x))


def test_locally_connected_weights_are_unshared() -> None:
    local = LocallyConnected2d(2, 3, 3, input_size=4, padding=1)
    assert local.weight.shape == (16, 3, 2 * 9)  # one filter bank per output position
    with pytest.raises(ValueError, match="4x4"):
        local(torch.randn(1, 2, 5, 5))


# --- bad options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options", "words"),
    [
        ("vgg", {}, ["alexnet", "alexnet_cifar", "convnet4"]),
        ("alexnet", {"depth": 3}, ["activation", "norm", "pool", "width"]),
        ("alexnet", {"activation": "swish"}, ["relu", "tanh", "gelu", "sigmoid"]),
        ("alexnet", {"norm": "layer"}, ["lrn", "bn", "none"]),
        ("alexnet", {"pool": "avg"}, ["overlap", "nonoverlap"]),
        ("alexnet", {"init": "xavier"}, ["paper", "kaiming"]),
        ("alexnet", {"towers": 3}, ["1", "2"]),
        ("alexnet", {"width": 0}, ["width", "greater than 0"]),
        ("alexnet", {"dropout": 1.0}, ["dropout", "less than 1"]),
        ("convnet4", {"towers": 2}, ["towers applies to alexnet and alexnet_cifar"]),
        ("convnet4", {"remove_conv": "conv3"}, ["remove_conv applies to alexnet and"]),
        ("alexnet", {"remove_conv": "conv5"}, ["none", "conv2", "conv3", "conv4"]),
        ("alexnet", {"remove_conv": "conv1"}, ["remove_conv"]),
    ],
)
def test_bad_options(name: str, options: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        build_model(name, 10, **options)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    ("factory", "words"),
    [
        (lambda: get_activation("swish"), ["relu", "leaky_relu", "elu"]),
        (lambda: get_norm("group", 8), ["lrn", "bn", "none"]),
        (lambda: get_pool("avg"), ["overlap", "nonoverlap"]),
    ],
)
def test_factories_reject_unknown_names(factory, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        factory()
    assert all(word in str(err.value) for word in words)


def test_pool_factory_geometry() -> None:
    overlap, non = get_pool("overlap"), get_pool("nonoverlap")
    assert (overlap.kernel_size, overlap.stride) == (3, 2)
    assert (non.kernel_size, non.stride) == (2, 2)


# --- the summary table ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_describe_model_rows_add_up(name: str) -> None:
    model = build_model(name, 10, width=TINY_WIDTH[name], norm="bn")
    model.train()
    rows = describe_model(model, input_size(name), batch=2)
    total = count_params(model)
    assert sum(r.params for r in rows) == total == sum(p.numel() for p in model.parameters())
    assert rows[0].output_shape == (2, 3, input_size(name), input_size(name))
    assert rows[-1].output_shape == (2, 10)
    assert model.training  # restored after the eval-mode pass
    table = render_table(rows, total)
    assert isinstance(table, Table)
    assert table.row_count == len(rows)
    assert table.columns[-1].footer == f"{total:,}"


# --- they learn -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "activation", "width", "lr"),
    [
        ("convnet4", "relu", 0.25, 0.01),
        ("convnet4", "tanh", 0.25, 0.01),
        ("alexnet_cifar", "relu", 0.125, 0.003),
    ],
)
def test_fits_a_small_separable_problem(
    name: str, activation: str, width: float, lr: float
) -> None:
    # Figure 1 trains convnet4 with ReLU and with tanh from a modern init; both must learn.
    # Full-batch steps on 32 noisy copies of 4 random images: about a second on a CPU.
    torch.manual_seed(0)
    classes, n = 4, 32
    prototypes = torch.randn(classes, 3, 32, 32)
    labels = torch.arange(n) % classes
    x = prototypes[labels] + 0.5 * torch.randn(n, 3, 32, 32)
    model = build_model(
        name, classes, activation=activation, init="kaiming", dropout=0.0, width=width
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.9, (loss.item(), accuracy)


def test_lrn_gives_torchs_result_and_gradient() -> None:
    torch.manual_seed(0)
    a = (torch.rand(3, 12, 5, 5, dtype=torch.float64) * 30).requires_grad_()
    ours, theirs = get_norm("lrn", 12), nn.LocalResponseNorm(size=5, alpha=5e-4, beta=0.75, k=2.0)
    torch.testing.assert_close(ours(a), theirs(a), rtol=1e-12, atol=1e-12)
    (g_ours,) = torch.autograd.grad(ours(a).square().sum(), a)
    (g_theirs,) = torch.autograd.grad(theirs(a).square().sum(), a)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-10)
