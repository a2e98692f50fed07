"""Ablation files and run configs: expansion, stable keys, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from alexnet.ablation import known_ablations, load_ablation
from alexnet.claims import CLAIMS
from alexnet.config import QUICK_WIDTH_SCALE, build_config, parse_set
from alexnet.errors import ConfigError

SHIPPED = ["augmentation", "depth", "dropout", "ensemble", "normalization", "paper",
           "pca_lighting", "pooling", "relu_vs_tanh", "towers"]


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
    assert set(paper.claims) == set(CLAIMS)  # every claim of the paper has its ablation
    assert all(CLAIMS[c].ablation in {m.name for m in paper.members()} for c in CLAIMS)


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


def test_on_off_yes_no_are_text_and_only_true_false_are_booleans(tmp_path):
    """YAML 1.2's booleans, not YAML 1.1's: `--set runtime.amp=off` means the amp mode named
    off, and an arm may be called off without quotes."""
    assert parse_set(["runtime.amp=off", "data.flip=False", "data.random_crop=true"]) == {
        "runtime.amp": "off", "data.flip": False, "data.random_crop": True}
    path = tmp_path / "onoff.yaml"
    path.write_text("name: onoff\ntitle: on and off\nbase: {profile: quick}\naxes:\n  dropout:\n"
                    "    on: {model.dropout: 0.5}\n    off: {model.dropout: 0.0}\n"
                    "reference: {dropout: on}\nseeds: [0]\n")
    assert sorted(c.arms["dropout"] for c in load_ablation(str(path)).cells()) == ["off", "on"]


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="train.epochs"):
        build_config("quick", {"train.epochs": "many"})


# --- inputs that must never hang, construct anything or print more than one line --------

def alias_bomb(levels: int = 9) -> str:
    """Ten lines whose aliases stand for 9**levels strings (a 'billion laughs')."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\nname: bomb\ntitle: t\nseeds: *l{levels}\n"


def test_alias_bomb_is_refused_fast_with_one_short_line(tmp_path):
    path = write(tmp_path, alias_bomb())
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_ablation(str(path))
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"took {elapsed:.1f} s"  # the failure mode is a hang; 2 s is generous
    message = str(info.value)
    assert "\n" not in message and len(message) < 250
    assert "lol" not in message  # nothing of the expanded input is echoed
    assert "more than 10,000 values" in message and str(path) in message


BAD_INPUT = {
    "recursive_alias": ("x: &x [*x]\n", "refers to the node that contains it"),
    "deep_nesting": ("description: " + "[" * 3000 + "]" * 3000 + "\n", "nested more than 16"),
    "python_tag": ("description: !!python/object/apply:os.system [echo hi]\n",
                   "tag '!!python/object/apply:os.system' is not allowed"),
    "explicit_int_tag": ("seeds: [!!int abc]\n", "tag '!!int' is not allowed"),
    "huge_integer": ("seeds: [" + "9" * 5000 + "]\n", "cannot read '999"),
    "two_documents": ("seeds: [0]\n---\nseeds: [1]\n", "YAML syntax error"),
    "complex_key": ("? [a, b]\n: 1\n", "a key is a list or mapping"),
    "key_with_newline": ('"seeds\\nx": [1]\n', r"key 'seeds\nx' is not a name"),
    "duplicate_top_key": ("seeds: [0]\nseeds: [1]\n", "duplicate key 'seeds'"),
    "nul_character": ("description: a\0b\n", "character #x0000"),
    "inf_in_arm": ("axes: {a: {x: {optim.lr: .inf}}}\n", "optim.lr: Input should be a finite"),
    "nan_in_base": ("base: {profile: quick, set: {model.dropout: .nan}}\naxes: {a: {x: {}}}\n",
                    "model.dropout: Input should be a finite number"),
    "list_for_a_number": ("axes: {a: {x: {optim.lr: [0.1, 0.2]}}}\n", "valid number"),
    "falsy_arm": ("axes: {a: {x: 0}}\n", "axes.a.x: Input should be a valid dictionary"),
    "epochs_too_many": ("axes: {a: {x: {train.epochs: 1000000}}}\n",
                        "train.epochs: Input should be less than or equal to 10000"),
    "batch_too_large": ("axes: {a: {x: {train.batch_size: 10000000}}}\n",
                        "train.batch_size: Input should be less than or equal to 65536"),
    "synthetic_too_large": ("axes: {a: {x: {data.synthetic.train_size: 100000000}}}\n",
                            "data.synthetic.train_size: Input should be less than or equal"),
    "synthetic_too_much_memory": (
        "axes: {a: {x: {data.synthetic.train_size: 500000, data.synthetic.image_size: 256}}}\n",
        "the limit is 8 GiB"),
    "seed_twice": ("axes: {a: {x: {}}}\nseeds: [0, 0]\n", "seed 0 is given twice"),
    "seed_too_large": ("axes: {a: {x: {}}}\nseeds: [99999999999999999999]\n",
                       "less than or equal to 4294967295"),
    "axis_name": ("axes: {'a=b': {x: {}}}\n", "axis name 'a=b' may hold only"),
    "arm_name": ("axes: {a: {'x,y': {}}}\n", "arm name 'x,y' may hold only"),
    "ablation_name": ("name: ../../elsewhere\ntitle: t\naxes: {a: {x: {}}}\n", "ablation name"),
    "too_many_cells": ("axes:\n" + "".join(f"  a{i}: {{x: {{}}, y: {{}}}}\n" for i in range(14))
                       + "seeds: [0]\n", "16,384 cells"),
    "include_twice": ("include: [towers, towers]\n", "includes 'towers' twice"),
    "include_and_axes": ("include: [towers]\naxes: {a: {x: {}}}\n", "either includes others"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_in_an_ablation_file_is_one_line_naming_the_file(tmp_path, case):
    text, expected = BAD_INPUT[case]
    path = tmp_path / "bad.yaml"
    header = "" if text.startswith(("seeds: [0]\nseeds", "name:")) else "name: bad\ntitle: t\n"
    path.write_text(header + text)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_ablation(str(path))
    assert time.perf_counter() - start < 5.0
    message = str(info.value)
    assert expected in message
    assert "\n" not in message and len(message) < 300
    assert str(path) in message


@pytest.mark.parametrize("data, expected", [
    (b"", "the file is empty"),
    (b"# only a comment\n", "the file is empty"),
    (b"- relu\n- tanh\n", "the file is a list, not a mapping"),
    (b"just text\n", "the file is a str, not a mapping"),
    ("name: caf\u00e9\ntitle: t\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 9)"),
    (bytes(range(256)), "not UTF-8 text"),
    (b"name: x\ndescription: " + b"x" * 100_000 + b"\n", "larger than 65,536 bytes"),
])
def test_files_that_are_not_an_ablation_are_one_line_naming_the_file(tmp_path, data, expected):
    path = tmp_path / "bad.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        load_ablation(str(path))
    message = str(info.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_a_folder_named_like_an_ablation_is_one_line(tmp_path):
    (tmp_path / "odd.yaml").mkdir()
    with pytest.raises(ConfigError, match="does not exist"):
        load_ablation(str(tmp_path / "odd.yaml"))


def test_merge_keys_share_overrides_and_explicit_keys_win(tmp_path):
    path = write(tmp_path, """\
        name: merged
        title: t
        base: {profile: quick}
        axes:
          activation:
            relu: &shared {model.activation: relu, optim.lr: 0.02}
            tanh: {<<: *shared, model.activation: tanh}
        seeds: [0]
        """)
    cells = {c.arms["activation"]: c.config for c in load_ablation(str(path)).cells()}
    assert cells["tanh"].model.activation == "tanh" and cells["tanh"].optim.lr == 0.02
    assert cells["relu"].model.activation == "relu"


def test_values_are_kept_as_validated_so_quick_scales_a_quoted_width(tmp_path):
    path = write(tmp_path, GOOD.replace("model.name: convnet4",
                                        "model.name: convnet4\n    model.width: '0.5'"))
    cells = load_ablation(str(path)).cells(quick=True, seeds=[0])
    assert [c.config.model.width for c in cells] == [0.5 * QUICK_WIDTH_SCALE] * len(cells)


def test_dates_stay_text():
    assert parse_set(["data.root=2024-01-01"]) == {"data.root": "2024-01-01"}


def test_cells_refuse_repeated_or_out_of_range_seeds(tmp_path):
    ab = load_ablation(str(write(tmp_path, GOOD)))
    with pytest.raises(ConfigError, match="seed 1 is given twice"):
        ab.cells(seeds=[0, 1, 1])
    with pytest.raises(ConfigError, match="not a whole number in 0..4294967295"):
        ab.cells(seeds=[-1])
    with pytest.raises(ConfigError, match="cells .* the limit is 10,000"):
        ab.cells(seeds=list(range(5000)))


@pytest.mark.parametrize("item, expected", [
    ("optim.lr=inf", "--set: optim.lr: Input should be a finite number (got 'inf')"),
    ("optim.lr=-inf", "finite number"),
    ("optim.lr=nan", "finite number"),
    ("optim.lr=.inf", "finite number (got inf)"),
    ("optim.lr=.nan", "finite number (got nan)"),
    ("optim.lr=1e400", "finite number"),
    ("optim.lr=[0.1, 0.2]", "optim.lr: Input should be a valid number (got [0.1, 0.2])"),
    ("train.epochs=1000000", "train.epochs: Input should be less than or equal to 10000"),
    ("train.eval_batch_size=999999999", "less than or equal to 65536"),
    ("model.width=!!python/object/apply:os.system [ls]", "is not allowed"),
    ("optim.lr=" + "9" * 5000, "--set optim.lr: cannot read '999"),
    ("data.root=a\0b", "--set data.root: character #x0000"),
    ("optim.lr={" + alias_bomb().replace("\n", ", ") + "}", "more than 10,000 values"),
    ("a\nb=1", r"unknown key 'a\nb'"),
])
def test_bad_set_values_are_one_line_naming_the_key(item, expected):
    with pytest.raises(ConfigError) as info:
        parse_set([item])
    message = str(info.value)
    assert expected in message
    assert "\n" not in message and len(message) < 250


def test_a_set_key_given_twice_is_refused():
    with pytest.raises(ConfigError, match="--set optim.lr is given twice"):
        parse_set(["optim.lr=0.1", "optim.lr=0.2"])


def test_set_values_come_back_validated_and_a_non_yaml_value_stays_text():
    assert parse_set(["model.width=0.5", "data.root=[x", "model.towers=2"]) == {
        "model.width": 0.5, "data.root": "[x", "model.towers": 2}


def test_non_finite_numbers_are_refused_by_the_config_itself():
    for value in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(ConfigError, match="optim.lr: Input should be a finite number"):
            build_config("quick", {"optim.lr": value})
    cfg = build_config("quick")
    with pytest.raises(ValueError, match="finite"):
        cfg.optim.lr = float("nan")  # assignment is validated too
