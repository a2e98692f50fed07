"""Ablation files and run configs: expansion, stable keys, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from alexnet.ablation import QUICK_WIDTH_SCALE, known_ablations, load_ablation
from alexnet.config import build_config, parse_set
from alexnet.errors import ConfigError

SHIPPED = ["augmentation", "dropout", "normalization", "paper", "pca_lighting", "pooling",
           "relu_vs_tanh", "towers"]


def write(tmp_path: Path, text: str, name: str = "mine.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


GOOD = """\
name: mine
title: a test ablation
claims: [relu_speed]
base:
  profile: quick
  set:
    model.name: convnet4
axes:
  activation:
    relu: {model.activation: relu}
    tanh: {model.activation: tanh}
  norm:
    lrn: {model.norm: lrn}
    none: {model.norm: none}
reference: {activation: relu}
seeds: [0, 1, 2]
"""


def test_every_shipped_ablation_loads_and_expands_with_and_without_quick():
    assert set(SHIPPED) <= set(known_ablations())
    for name in SHIPPED:
        ab = load_ablation(name)
        full, quick = ab.cells(), ab.cells(quick=True)
        assert len(full) == len(quick) > 0
        assert {c.arm_label for c in full} == {c.arm_label for c in quick}
        assert all(c.config.data.source == "synthetic" for c in quick)


def test_paper_includes_every_claim_ablation():
    paper = load_ablation("paper")
    assert {m.name for m in paper.members()} == set(SHIPPED) - {"paper"}
    assert {"relu_speed", "lrn", "overlap_pool", "two_towers"} <= set(paper.claims)


@pytest.mark.parametrize("quick", [False, True])
def test_depth_ablation_removes_one_middle_conv_per_arm(quick):
    from alexnet.claims import CLAIMS

    depth = load_ablation("depth")
    assert depth.claims == ["depth"] and CLAIMS["depth"].ablation == "depth"
    assert depth.reference == {"depth": CLAIMS["depth"].arm} == {"depth": "full"}
    cells = depth.cells(quick=quick)
    removed = {c.arms["depth"]: c.config.model.remove_conv for c in cells}
    assert removed == {"full": "none", "no_conv2": "conv2", "no_conv3": "conv3",
                       "no_conv4": "conv4"}
    assert sorted(c.seed for c in cells if c.arms["depth"] == "no_conv3") == [0, 1, 2]
    # Apart from the removed layer (and the seed) every arm is the same run.
    assert len({c.grid_key for c in cells}) == 1
    assert all(c.config.model.name == "alexnet_cifar" for c in cells)


def test_ensemble_ablation_is_five_seeds_of_the_base_configuration():
    from alexnet.claims import CLAIMS

    ensemble = load_ablation("ensemble")
    assert ensemble.claims == ["ensemble"] and CLAIMS["ensemble"].ablation == "ensemble"
    assert "Table 2" in ensemble.title
    cells = ensemble.cells()
    assert [c.seed for c in cells] == [0, 1, 2, 3, 4]
    assert {c.arm_label for c in cells} == {"ensemble=members"}
    base = build_config("cifar")
    for cell in cells:
        assert cell.config.model_copy(update={"seed": 0}) == base
    assert len({c.key for c in cells}) == 5


def test_expansion_is_the_product_of_axes_and_seeds(tmp_path):
    ab = load_ablation(str(write(tmp_path, GOOD)))
    cells = ab.cells()
    assert len(cells) == 2 * 2 * 3
    assert len({c.key for c in cells}) == 12  # every cell distinct
    tanh = [c for c in cells if c.arms == {"activation": "tanh", "norm": "none"}]
    assert [c.seed for c in tanh] == [0, 1, 2]
    assert all(c.config.model.activation == "tanh" and c.config.model.norm == "none"
               for c in tanh)
    assert ab.reference == {"activation": "relu", "norm": "lrn"}  # first arm by default


def test_quick_keeps_the_axes_and_scales_width(tmp_path):
    towers = load_ablation("towers")
    quick = {c.arms["towers"]: c.config for c in towers.cells(quick=True, seeds=[0])}
    assert quick["two"].model.towers == 2 and quick["one"].model.towers == 1
    assert quick["one"].model.width == pytest.approx(0.5 * QUICK_WIDTH_SCALE)
    assert quick["two"].model.width == pytest.approx(QUICK_WIDTH_SCALE)
    relu = load_ablation("relu_vs_tanh").cells(quick=True, seeds=[0])[0]
    assert relu.config.model.width == pytest.approx(QUICK_WIDTH_SCALE)  # scaled once


def test_key_is_stable_across_processes_and_ignores_runtime():
    cfg = build_config("quick", {"model.activation": "tanh"})
    code = ("from alexnet.config import build_config;"
            "print(build_config('quick', {'model.activation': 'tanh'}).key())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    assert other == cfg.key()
    assert build_config("quick", {"model.activation": "tanh", "runtime.device": "cpu",
                                  "data.root": "/elsewhere"}).key() == cfg.key()
    for change in ({"optim.lr": 0.03}, {"seed": 1}, {"data.flip": False},
                   {"model.activation": "relu"}, {"train.epochs": 5}):
        assert build_config("quick", {"model.activation": "tanh", **change}).key() != cfg.key()


def test_key_fields_are_json_with_sorted_keys():
    cfg = build_config("quick")
    from alexnet.config import key_fields

    text = json.dumps(key_fields(cfg), sort_keys=True)
    assert "runtime" not in text and "model.activation" in text


@pytest.mark.parametrize("text, expected", [
    ("name: x\ntitle: t\naxes: {a: {b: {model.activation: relu}}\n", "YAML syntax error"),
    (GOOD.replace("seeds:", "seedz:"), "unknown key 'seedz'; did you mean 'seeds'?"),
    (GOOD.replace("model.norm: none", "model.nrom: none"),
     "unknown key 'model.nrom'; did you mean 'model.norm'?"),
    (GOOD.replace("model.activation: tanh", "model.activation: sigmoidx"),
     "'relu', 'tanh'"),
    (GOOD.replace("seeds: [0, 1, 2]", "seeds: [zero]"), "seeds.0"),
    (GOOD.replace("    lrn: {model.norm: lrn}\n    none: {model.norm: none}\n", ""),
     "axis 'norm' is empty"),
    (GOOD.replace("    none: {model.norm: none}", "    lrn: {model.norm: none}"),
     "duplicate key 'lrn'"),
    (GOOD.replace("reference: {activation: relu}", "reference: {activation: relx}"),
     "unknown arm 'relx' for axis 'activation'; allowed: relu, tanh"),
    (GOOD.replace("claims: [relu_speed]", "claims: [relu_sped]"), "unknown claim 'relu_sped'"),
    (GOOD.replace("profile: quick", "profile: quik"), "unknown profile 'quik'"),
])
def test_bad_ablation_files_give_one_line_with_file_and_line(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_ablation(str(path))
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    assert str(path) in message


def test_errors_name_the_line(tmp_path):
    path = write(tmp_path, GOOD.replace("model.norm: none", "model.nrom: none"))
    with pytest.raises(ConfigError, match=rf"{path.name}:14:"):
        load_ablation(str(path))


def test_unknown_ablation_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        load_ablation("relu_vs_tahn")
    assert "did you mean 'relu_vs_tanh'?" in str(info.value)
    assert "normalization" in str(info.value)


def test_parse_set_reads_yaml_scalars_and_rejects_unknown_keys():
    assert parse_set(["optim.lr=0.02", "data.flip=false", "model.norm=none"]) == {
        "optim.lr": 0.02, "data.flip": False, "model.norm": "none"}
    with pytest.raises(ConfigError, match="did you mean 'optim.lr'"):
        parse_set(["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_set(["optim.lr"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="train.epochs"):
        build_config("quick", {"train.epochs": "many"})
