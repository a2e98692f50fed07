"""Training one run: learning, determinism, resume, divergence, 10-crop evaluation, and the
held-out test split scored once at the end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

from alexnet.config import build_config
from alexnet.data import folder as folder_mod
from alexnet.data import open_data
from alexnet.errors import ConfigError
from alexnet.models.layers import LocallyConnected2d
from alexnet.train import (
    Checkpoint,
    autocast_for,
    cpu_has_native_bf16,
    evaluate,
    train_run,
    use_channels_last,
)

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
    ckpt = Checkpoint(tmp_path / "cell.pt")

    def stop_in_epoch_2(m):
        if m.epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_run(cfg, checkpoint=ckpt, on_epoch=stop_in_epoch_2)
    assert ckpt.load(cfg.key())["epoch"] == 1
    seen = []
    resumed = train_run(cfg, checkpoint=ckpt, on_epoch=seen.append)
    assert [m.epoch for m in seen] == [2, 3]  # only the epochs it had not finished
    assert numbers(resumed) == numbers(whole)


def test_checkpoint_of_another_config_is_ignored_with_a_warning(tmp_path, caplog):
    cfg = build_config("quick", {**TINY, "train.epochs": 1})
    ckpt = Checkpoint(tmp_path / "cell.pt")
    train_run(cfg, checkpoint=ckpt)
    other = build_config("quick", {**TINY, "train.epochs": 1, "optim.lr": 0.05})
    assert ckpt.load(other.key()) is None
    assert "belongs to another run config" in caplog.text
    assert len(train_run(other, checkpoint=ckpt).history) == 1


class Payload:
    """Unpickling this runs code: what a checkpoint planted by someone else could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_planted_pickle_is_never_executed_and_the_run_starts_afresh(tmp_path, caplog):
    cfg = build_config("quick", {**TINY, "train.epochs": 2})
    marker = tmp_path / "payload-ran"
    path = tmp_path / "cell.pt"
    torch.save({"format": 1, "cell_key": cfg.key(), "evil": Payload(marker)}, path)
    result = train_run(cfg, checkpoint=Checkpoint(path))
    assert not marker.exists()
    assert [h.epoch for h in result.history] == [1, 2]  # trained from the start
    warned = [r for r in caplog.records if "is never loaded" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0].getMessage()


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
    """The error of the softmax averaged over torchvision's ten crops (corners, centre and
    their mirrors, Section 4.1) of the padded canvas, computed here independently."""
    from torchvision.transforms.v2 import functional as TF

    from alexnet.data.augment import normalize

    base = build_config("quick", {**TINY, "train.epochs": 1})
    ten = build_config("quick", {**TINY, "train.epochs": 1, "data.ten_crop": True})
    models = []
    one = train_run(base)
    many = train_run(ten, on_end=models.append)
    # training is identical; only evaluation differs
    assert one.history[0].train_loss == many.history[0].train_loss
    assert one.history[0].val_loss != many.history[0].val_loss
    data = open_data(ten.data, "cpu")
    pad, crop = ten.data.crop_padding, ten.data.crop_size
    canvas = torch.nn.functional.pad(data.val_images, (pad,) * 4)
    model = models[0].eval()
    cpu = torch.device("cpu")
    layout = torch.channels_last if use_channels_last(cpu, ten) else torch.contiguous_format
    with torch.no_grad(), autocast_for(cpu, ten):  # the precision and layout evaluation uses
        probs = torch.stack([
            model(normalize(view, data.stats).contiguous(memory_format=layout)).float()
            .softmax(1) for view in TF.ten_crop(canvas, [crop, crop])]).mean(0)
    expected = (probs.argmax(1) != data.val_labels).double().mean().item()
    assert many.history[0].val_error == pytest.approx(expected, abs=1e-9)
    assert evaluate(model, data, torch.device("cpu"), ten, False)[1] == pytest.approx(expected)


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


# --- the held-out test split ---------------------------------------------------------------


def image_folder(root: Path, splits: dict[str, int]) -> Path:
    """``root/<split>/<class>/*.png``: two classes of tiny 12x12 images, one dark, one
    bright, with noise; ``splits`` maps a split to its images per class."""
    rng = np.random.default_rng(0)
    for split, n in splits.items():
        for name, level in (("dark", 70), ("bright", 180)):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(level + rng.normal(0, 40, (12, 12, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


def folder_run(root: Path, tmp_path: Path, **overrides):
    return build_config("quick", {
        "data.source": "imagefolder", "data.root": str(root),
        "data.cache_dir": str(tmp_path / "cache"), "data.val_fraction": 0.25,
        "train.epochs": 2, "train.batch_size": 4, "runtime.device": "cpu", **overrides})


class Watched:
    """What a run reads, in order: each epoch's report, each call for validation or test
    batches, and each test image decoded (through the real decoder)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[str] = []
        real = folder_mod.load_image

        def load_image(path: str) -> torch.Tensor:
            if Path(path).parts[-3] == "test":
                self.events.append("decode test image")
            return real(path)

        monkeypatch.setattr(folder_mod, "load_image", load_image)

    def data(self, cfg):
        data = open_data(cfg.data, torch.device("cpu"), num_workers=0)
        for name, event in (("eval_batches", "val"), ("test_batches", "test")):
            def call(batch_size, real=getattr(data, name), event=event):
                self.events.append(event)
                return real(batch_size)
            setattr(data, name, call)  # the real method, called through and counted
        return data

    def on_epoch(self, m) -> None:
        self.events.append(f"epoch {m.epoch}")

    def count(self, event: str) -> int:
        return self.events.count(event)


@pytest.mark.parametrize("in_memory", [True, False])
def test_test_split_is_read_once_after_the_last_epoch(tmp_path, monkeypatch, in_memory):
    root = image_folder(tmp_path / "images", {"train": 8, "test": 3})
    cfg = folder_run(root, tmp_path, **{"data.in_memory": in_memory})
    watched = Watched(monkeypatch)
    result = train_run(cfg, data=watched.data(cfg), on_epoch=watched.on_epoch)
    events = watched.events
    last_epoch = events.index("epoch 2")
    assert events[last_epoch - 1] == "val" and watched.count("val") == 2
    # Nothing of test/ before the last epoch's validation and report; then one read.
    assert events[last_epoch + 1:] == ["test"] + ["decode test image"] * 6
    assert 0.0 <= result.test_error <= 1.0 and result.test_loss > 0
    assert result.test_error_top5 == 0.0  # two classes: the true one is always in the top 5
    final = result.final
    assert (final["test_error"], final["test_loss"]) == (result.test_error, result.test_loss)


def test_score_test_off_reads_nothing_of_the_test_split(tmp_path, monkeypatch):
    root = image_folder(tmp_path / "images", {"train": 8, "test": 3})
    cfg = folder_run(root, tmp_path)
    watched = Watched(monkeypatch)
    result = train_run(cfg, data=watched.data(cfg), on_epoch=watched.on_epoch,
                       score_test=False)
    assert result.status == "finished" and len(result.history) == 2
    assert watched.count("test") == watched.count("decode test image") == 0
    assert result.test_error is None and not any(k.startswith("test_") for k in result.final)


def test_a_folder_without_test_gives_no_test_metrics(tmp_path):
    root = image_folder(tmp_path / "images", {"train": 8, "val": 2})
    result = train_run(folder_run(root, tmp_path))
    assert result.status == "finished" and result.history[-1].val_error >= 0.0
    assert result.test_error is None and not any(k.startswith("test_") for k in result.final)


def test_early_stop_and_resume_with_no_epochs_left_score_the_final_model(tmp_path,
                                                                         monkeypatch):
    root = image_folder(tmp_path / "images", {"train": 8, "test": 3})
    cfg = folder_run(root, tmp_path, **{"train.epochs": 4, "train.target_train_error": 0.99,
                                        "train.stop_at_target": True})
    ckpt = Checkpoint(tmp_path / "cell.pt")
    watched = Watched(monkeypatch)
    stopped = train_run(cfg, data=watched.data(cfg), on_epoch=watched.on_epoch,
                        checkpoint=ckpt)
    assert len(stopped.history) == stopped.epochs_to_target == 1  # stopped at its target
    assert watched.events[-8:] == ["epoch 1", "test"] + ["decode test image"] * 6
    assert stopped.test_error is not None
    # Killed after its last checkpoint, before it was logged: the resumed run has no epoch
    # left to train, and scores the same final model to the same numbers.
    watched.events.clear()
    resumed = train_run(cfg, data=watched.data(cfg), on_epoch=watched.on_epoch,
                        checkpoint=ckpt)
    assert watched.events[0] == "test" and watched.count("epoch 2") == 0
    assert (resumed.test_loss, resumed.test_error) == (stopped.test_loss, stopped.test_error)


def test_a_diverged_run_is_not_scored_on_the_test_split(tmp_path, monkeypatch):
    root = image_folder(tmp_path / "images", {"train": 8, "test": 3})
    cfg = folder_run(root, tmp_path, **{"optim.lr": 1e6, "model.init": "paper"})
    watched = Watched(monkeypatch)
    result = train_run(cfg, data=watched.data(cfg))
    assert result.status == "diverged"
    assert watched.count("test") == 0 and "test_error" not in result.final


def test_a_batch_larger_than_the_training_split_stops_before_training():
    cfg = build_config("quick", {**TINY, "data.synthetic.train_size": 24,
                                 "train.batch_size": 32})
    seen = []
    with pytest.raises(ConfigError, match=r"batch_size=32 .*\(24 images\).*batch_size=24"):
        train_run(cfg, on_epoch=seen.append)
    assert seen == []


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


def test_default_cpu_run_is_bit_for_bit_repeatable():
    cfg = build_config("quick", {**TINY, "train.epochs": 2})  # runtime: the defaults
    weights = []

    def keep(model):
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    a = train_run(cfg, on_end=keep)
    b = train_run(cfg, on_end=keep)
    assert numbers(a) == numbers(b)
    weights_a, weights_b = weights
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
