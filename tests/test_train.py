"""Training one run: learning, determinism, resume, divergence, 10-crop evaluation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

from alexnet.config import build_config
from alexnet.models.layers import LocallyConnected2d
from alexnet.train import cpu_has_native_bf16, load_checkpoint, train_run, use_channels_last

TINY = {"data.synthetic.train_size": 512, "data.synthetic.val_size": 256, "train.epochs": 3,
        "runtime.device": "cpu"}


def numbers(result):
    """Everything but wall-clock timings."""
    return [(h.epoch, h.train_loss, h.train_error, h.val_loss, h.val_error, h.val_error_top5,
             h.lr) for h in result.history]


def test_quick_profile_learns_synthetic_data_well_above_chance():
    cfg = build_config("quick", {"runtime.device": "cpu"})
    result = train_run(cfg)
    assert result.status == "finished"
    assert len(result.history) == cfg.train.epochs
    assert result.history[-1].val_error < 0.5  # chance is 0.9 with ten classes
    assert result.history[-1].train_loss < result.history[0].train_loss


def test_same_config_and_seed_gives_the_same_metrics_and_another_seed_does_not():
    cfg = build_config("quick", TINY)
    a, b = train_run(cfg), train_run(cfg)
    assert numbers(a) == numbers(b)
    c = train_run(build_config("quick", {**TINY, "seed": 1}))
    assert numbers(c) != numbers(a)


class Interrupt(Exception):
    pass


def test_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    cfg = build_config("quick", {**TINY, "model.dropout": 0.5})  # dropout draws from the RNG
    whole = train_run(cfg)
    ckpt = tmp_path / "cell.pt"

    def stop_in_epoch_2(m):
        if m.epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_run(cfg, checkpoint_path=ckpt, on_epoch=stop_in_epoch_2)
    assert load_checkpoint(ckpt, cfg.key())["epoch"] == 1
    seen = []
    resumed = train_run(cfg, checkpoint_path=ckpt, on_epoch=seen.append)
    assert [m.epoch for m in seen] == [2, 3]  # only the epochs it had not finished
    assert numbers(resumed) == numbers(whole)


def test_checkpoint_of_another_config_is_ignored(tmp_path):
    cfg = build_config("quick", {**TINY, "train.epochs": 1})
    ckpt = tmp_path / "cell.pt"
    train_run(cfg, checkpoint_path=ckpt)
    other = build_config("quick", {**TINY, "train.epochs": 1, "optim.lr": 0.05})
    assert load_checkpoint(ckpt, other.key()) is None
    assert len(train_run(other, checkpoint_path=ckpt).history) == 1


def test_divergence_is_reported_not_raised():
    cfg = build_config("quick", {**TINY, "optim.lr": 1e6, "model.init": "paper"})
    result = train_run(cfg)
    assert result.status == "diverged"
    assert result.reason.startswith("diverged at epoch 1")
    assert result.history == []


def test_plateau_schedule_divides_by_ten_at_most_max_decays_times():
    cfg = build_config("quick", {**TINY, "train.epochs": 8, "schedule.kind": "plateau",
                                 "schedule.patience": 0, "schedule.max_decays": 2,
                                 "optim.lr": 1e-6})  # too small to improve: decays each epoch
    lrs = [h.lr for h in train_run(cfg).history]
    assert lrs[0] == pytest.approx(1e-6)
    assert min(lrs) == pytest.approx(1e-8)  # two divisions, never a third
    assert len({round(lr, 12) for lr in lrs}) == 3


def test_ten_crop_evaluation_scores_the_averaged_softmax():
    base = build_config("quick", {**TINY, "train.epochs": 1})
    ten = build_config("quick", {**TINY, "train.epochs": 1, "data.ten_crop": True})
    one, many = train_run(base), train_run(ten)
    assert 0.0 <= many.history[0].val_error <= 1.0
    # training is identical; only evaluation differs
    assert one.history[0].train_loss == many.history[0].train_loss
    assert one.history[0].val_loss != many.history[0].val_loss


def test_epochs_to_target_and_stop_at_target():
    cfg = build_config("quick", {**TINY, "train.epochs": 6, "train.target_train_error": 0.85,
                                 "train.stop_at_target": True})
    result = train_run(cfg)
    assert result.epochs_to_target is not None
    assert len(result.history) == result.epochs_to_target
    assert result.history[-1].train_error <= 0.85
    assert result.final["epochs_to_target"] == result.epochs_to_target


@pytest.mark.gpu
def test_cuda_run_uses_bf16_and_matches_shapes():
    result = train_run(build_config("quick", {**TINY, "runtime.device": "cuda"}))
    assert result.status == "finished" and result.device.startswith("cuda")
    assert torch.cuda.is_available()


# --- precision and layout on the CPU (benchmarks/cpu_speed.py measures the speed) --------


def weighted_layer_outputs(cfg) -> dict[str, set]:
    """The dtypes and layouts that the conv, locally connected and linear layers gave and
    were given in the training steps of a whole ``train_run`` (forwards with autograd on:
    not evaluation, not the model's shape probe): a global hook sees inside the real step."""
    seen: dict[str, set] = {"dtype": set(), "channels_last_input": set()}

    def record(module, inputs, output):
        if torch.is_grad_enabled() and isinstance(module, (nn.Conv2d, nn.Linear,
                                                            LocallyConnected2d)):
            seen["dtype"].add(output.dtype)
            if isinstance(module, nn.Conv2d):
                seen["channels_last_input"].add(
                    inputs[0].is_contiguous(memory_format=torch.channels_last))

    handle = register_module_forward_hook(record)
    try:
        assert train_run(cfg).status == "finished"
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("model", ["convnet4", "alexnet_cifar"])
def test_default_cpu_run_uses_bf16_autocast_where_the_cpu_has_native_bf16(model):
    cfg = build_config("quick", {**TINY, "train.epochs": 1, "model.name": model})
    assert cfg.runtime.amp == "auto"
    seen = weighted_layer_outputs(cfg)
    assert seen["dtype"] == {torch.bfloat16 if cpu_has_native_bf16() else torch.float32}
    assert seen["channels_last_input"] == {use_channels_last(torch.device("cpu"), cfg)}
    off = build_config("quick", {**TINY, "train.epochs": 1, "model.name": model,
                                 "runtime.amp": "off", "runtime.channels_last": False})
    assert weighted_layer_outputs(off) == {"dtype": {torch.float32},
                                           "channels_last_input": {False}}


def test_default_cpu_run_is_bit_for_bit_repeatable(tmp_path):
    cfg = build_config("quick", {**TINY, "train.epochs": 2})  # runtime: the defaults
    a = train_run(cfg, checkpoint_path=tmp_path / "a.pt")
    b = train_run(cfg, checkpoint_path=tmp_path / "b.pt")
    assert numbers(a) == numbers(b)
    weights_a = load_checkpoint(tmp_path / "a.pt", cfg.key())["model"]
    weights_b = load_checkpoint(tmp_path / "b.pt", cfg.key())["model"]
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
