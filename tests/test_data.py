"""The data pipeline: sources, split, cache, on-device augmentation, streaming path.

Everything here runs on data the tests generate (tiny image folders, a fake CIFAR release,
the synthetic source); only the ``data``-marked test reads the real CIFAR-10 images.
"""

from __future__ import annotations

import os
import pickle
import shutil
import urllib.error
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from alexnet.config import DataConfig, SyntheticConfig
from alexnet.data import Data, epoch_seed, open_data
from alexnet.data import cifar as cifar_mod
from alexnet.data import folder as folder_mod
from alexnet.data.augment import Augment, centre_crop, draw_epoch, lighting_offsets
from alexnet.data.base import steps_for
from alexnet.data.split import carve_val, class_quotas
from alexnet.data.stats import compute_stats
from alexnet.data.synthetic import generate
from alexnet.errors import ConfigError, DataError

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]
CIFAR10_ROOT = Path(os.environ.get("ALEXNET_CIFAR10_ROOT",
                                   REPO / ".." / "shared" / "data" / "cifar10")).resolve()

# --- fixtures and helpers ------------------------------------------------------------------


def write_images(class_dir: Path, n: int, seed: int, size=(14, 12), ext=".png") -> None:
    """``n`` small images whose colour depends on the class, with some texture."""
    class_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 215, 3)
    for i in range(n):
        pixels = np.clip(base + rng.normal(0, 30, (size[1], size[0], 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(class_dir / f"{i:03d}{ext}")


def make_folder(root: Path, counts: dict[str, int], val: dict[str, int] | None = None,
                size=(14, 12), test: dict[str, int] | None = None) -> Path:
    for k, (name, n) in enumerate(counts.items()):
        write_images(root / "train" / name, n, seed=k, size=size)
    for k, (name, n) in enumerate((val or {}).items()):
        write_images(root / "val" / name, n, seed=100 + k, size=size)
    for k, (name, n) in enumerate((test or {}).items()):
        write_images(root / "test" / name, n, seed=200 + k, size=size)
    return root


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    # Non-square 14x12 images: decoding must resize the short side and centre-crop.
    return make_folder(tmp_path / "images", {"ant": 10, "bee": 10, "cat": 10})


def folder_cfg(root: Path, tmp_path: Path, **kw) -> DataConfig:
    defaults = dict(source="imagefolder", root=str(root), cache_dir=str(tmp_path / "cache"),
                    image_size=10, crop_size=8, crop_padding=2, val_fraction=0.2)
    return DataConfig(**{**defaults, **kw})


def synth_cfg(**kw) -> DataConfig:
    syn = SyntheticConfig(train_size=96, val_size=24, image_size=16, num_classes=4)
    defaults = dict(image_size=16, crop_size=16, crop_padding=2, synthetic=syn)
    return DataConfig(**{**defaults, **kw})


def first_batch(data: Data, batch_size=32, seed=0, epoch=0):
    return next(iter(data.train_batches(epoch, batch_size, seed)))


def normalized(images: torch.Tensor, data: Data) -> torch.Tensor:
    s = data.stats
    return (images.float() / 255 - s.mean.view(3, 1, 1)) / s.std.view(3, 1, 1)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))


# --- synthetic source ------------------------------------------------------------------------


def test_synthetic_is_deterministic_in_its_own_seed():
    cfg = SyntheticConfig(train_size=40, val_size=20, image_size=16, num_classes=4)
    a, b = generate(cfg), generate(cfg)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = generate(cfg.model_copy(update={"seed": 1}))
    assert not torch.equal(a["train_images"], other["train_images"])
    # The validation images do not move when the training set grows.
    bigger = generate(cfg.model_copy(update={"train_size": 80}))
    assert torch.equal(a["val_images"], bigger["val_images"])
    assert a["train_images"].dtype == torch.uint8
    assert torch.bincount(a["train_labels"]).tolist() == [10, 10, 10, 10]


# --- training batches ------------------------------------------------------------------------


def test_train_batches_shapes_dtypes_and_steps():
    data = open_data(synth_cfg(), CPU)
    assert (data.num_classes, data.train_size, data.val_size, data.input_size) == (4, 96, 24, 16)
    assert len(data.fingerprint) == 16 and int(data.fingerprint, 16) >= 0
    batches = list(data.train_batches(0, 40, seed=0))
    # 96 = 2 x 40 + 16: a tail under half a batch is dropped.
    assert len(batches) == data.steps_per_epoch(40) == 2
    x, y = batches[0]
    assert x.shape == (40, 3, 16, 16) and x.dtype == torch.float32 and x.device == CPU
    assert y.shape == (40,) and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < 4
    assert [len(b[1]) for b in data.train_batches(0, 64, seed=0)] == [64, 32]  # kept: >= half


def test_steps_rule():
    assert steps_for(100, 10) == 10
    assert steps_for(104, 10) == 10  # tail of 4 < 5 dropped
    assert steps_for(105, 10) == 11  # tail of 5 kept
    assert steps_for(3, 10) == 1  # the only batch is never dropped


def test_train_batches_depend_on_seed_and_epoch_only():
    data = open_data(synth_cfg(), CPU)
    x1, y1 = first_batch(data, seed=3, epoch=5)
    torch.manual_seed(123)  # the global RNG plays no part
    x2, y2 = first_batch(data, seed=3, epoch=5)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, first_batch(data, seed=3, epoch=6)[0])
    assert not torch.equal(x1, first_batch(data, seed=4, epoch=5)[0])


def test_all_augmentation_off_gives_normalized_images_in_shuffled_order():
    cfg = synth_cfg(random_crop=False, flip=False, pca_lighting=False)
    data = open_data(cfg, CPU)
    x, y = first_batch(data, batch_size=32, seed=1, epoch=2)
    order = epoch_order(data.train_size, seed=1, epoch=2)[:32]
    assert torch.equal(y, data.train_labels[order])
    torch.testing.assert_close(x, normalized(data.train_images[order], data))
    assert abs(float(torch.cat([b for b, _ in data.train_batches(0, 96, 0)]).mean())) < 0.05


def test_each_augmentation_switches_on_alone():
    off = dict(random_crop=False, flip=False, pca_lighting=False)
    base = first_batch(open_data(synth_cfg(**off), CPU))[0]

    data = open_data(synth_cfg(**{**off, "flip": True}), CPU)
    x = first_batch(data)[0]
    same = (x == base).flatten(1).all(1)
    mirrored = (x == base.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 0 < int(mirrored.sum()) < len(x)

    data = open_data(synth_cfg(**{**off, "random_crop": True}), CPU)
    x = first_batch(data)[0]
    assert x.shape == base.shape and not torch.equal(x, base)

    data = open_data(synth_cfg(**{**off, "pca_lighting": True}), CPU)
    x = first_batch(data)[0]
    shift = x - base  # lighting adds one colour per image: constant over its pixels
    per_image = shift.mean((2, 3), keepdim=True)
    torch.testing.assert_close(shift, per_image.expand_as(shift), atol=1e-5, rtol=0)
    assert float(per_image.abs().max()) > 0


def test_random_crop_matches_padded_window():
    cfg = synth_cfg(random_crop=True, flip=False, pca_lighting=False, crop_size=12)
    data = open_data(cfg, CPU)
    x, _ = first_batch(data, batch_size=8, seed=0, epoch=0)
    g = torch.Generator().manual_seed(epoch_seed(0, 0))
    order = torch.randperm(data.train_size, generator=g)[:8]
    draws = draw_epoch(data.train_size, data.aug, g)
    padded = torch.nn.functional.pad(data.train_images[order], (2, 2, 2, 2))
    for i in range(8):
        top, left = draws.offsets[i].tolist()
        window = padded[i, :, top:top + 12, left:left + 12]
        torch.testing.assert_close(x[i], normalized(window, data))


# --- PCA lighting (Section 4.1) ------------------------------------------------------------


def test_pca_stats_match_eigh_of_the_training_pixel_covariance():
    data = open_data(synth_cfg(), CPU)
    pixels = data.train_images.movedim(1, 0).reshape(3, -1).double() / 255
    cov = torch.cov(pixels, correction=0)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    s = data.stats
    torch.testing.assert_close(s.mean.double(), pixels.mean(1), atol=1e-6, rtol=0)
    torch.testing.assert_close(s.std.double(), pixels.std(1, correction=0), atol=1e-6, rtol=0)
    torch.testing.assert_close(s.eigvals.double(), eigvals.flip(0), atol=1e-6, rtol=0)
    # Eigenvectors are defined up to sign: compare |cosine| column by column.
    cosine = (s.eigvecs.double() * eigvecs.flip(1)).sum(0).abs()
    torch.testing.assert_close(cosine, torch.ones(3, dtype=torch.float64), atol=1e-4, rtol=0)
    assert bool((s.eigvals[:-1] >= s.eigvals[1:]).all())


def test_lighting_offset_is_eigvecs_times_alpha_times_eigvals():
    stats = open_data(synth_cfg(), CPU).stats
    aug = Augment(16, 16, 0, True, True, True, pca_std=0.1)
    alpha = draw_epoch(20000, aug, torch.Generator().manual_seed(0)).alpha
    assert alpha.shape == (20000, 3)
    torch.testing.assert_close(alpha.std(0), torch.full((3,), 0.1), atol=0.005, rtol=0)
    offsets = lighting_offsets(alpha, stats)
    assert offsets.shape == (20000, 3)
    torch.testing.assert_close(offsets[7], stats.eigvecs @ (alpha[7] * stats.eigvals))
    # Cov(offset) = V diag(0.1^2 lambda^2) V^T: the colour shifts follow the data's PCA.
    expected = stats.eigvecs @ torch.diag((0.1 * stats.eigvals) ** 2) @ stats.eigvecs.T
    torch.testing.assert_close(torch.cov(offsets.T), expected, atol=2e-6, rtol=0.1)


def test_compute_stats_in_chunks_equals_one_pass():
    images = torch.randint(0, 256, (50, 3, 5, 5), dtype=torch.uint8)
    a, b = compute_stats(images, chunk=7), compute_stats(images, chunk=1000)
    for u, v in zip(a.as_tuple(), b.as_tuple(), strict=True):
        torch.testing.assert_close(u, v)


# --- evaluation ------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", [0, 2])
def test_ten_crop_layout(padding: int):
    cfg = synth_cfg(crop_size=12, crop_padding=padding)
    centre = open_data(cfg, CPU)
    ten = open_data(cfg.model_copy(update={"ten_crop": True}), CPU)
    (xc, yc), (xt, yt) = next(iter(centre.eval_batches(5))), next(iter(ten.eval_batches(5)))
    assert xt.shape == (5, 10, 3, 12, 12) and torch.equal(yc, yt)
    torch.testing.assert_close(xt[:, 4], xc)  # crop 4 is the centre crop
    torch.testing.assert_close(xt[:, 5:], xt[:, :5].flip(-1))  # 5-9 mirror 0-4
    canvas = torch.nn.functional.pad(ten.val_images[:5], (padding,) * 4)
    torch.testing.assert_close(xt[:, 0], normalized(canvas[..., :12, :12], ten))
    torch.testing.assert_close(xt[:, 3], normalized(canvas[..., -12:, -12:], ten))


def test_eval_batches_cover_the_validation_split_in_order():
    data = open_data(synth_cfg(), CPU)
    batches = list(data.eval_batches(10))
    assert [len(y) for _, y in batches] == [10, 10, 4]
    assert torch.equal(torch.cat([y for _, y in batches]), data.val_labels)
    torch.testing.assert_close(batches[0][0], normalized(centre_crop(data.val_images[:10], 16),
                                                         data))


def test_crop_larger_than_canvas_is_a_config_error():
    with pytest.raises(ConfigError, match="crop_size"):
        open_data(synth_cfg(crop_size=20), CPU)


# --- image folder ----------------------------------------------------------------------------


def test_imagefolder_carves_a_stratified_val_split(tiny_folder: Path, tmp_path: Path):
    data = open_data(folder_cfg(tiny_folder, tmp_path), CPU)
    assert data.classes == ["ant", "bee", "cat"]
    assert (data.train_size, data.val_size) == (24, 6)
    assert torch.bincount(data.val_labels).tolist() == [2, 2, 2]
    assert data.train_images.shape == (24, 3, 10, 10) and data.train_images.dtype == torch.uint8
    # Seeded by split_seed: the same split every time, another with another seed.
    again = open_data(folder_cfg(tiny_folder, tmp_path), CPU)
    assert torch.equal(again.val_images, data.val_images)
    other = open_data(folder_cfg(tiny_folder, tmp_path, split_seed=1), CPU)
    assert not torch.equal(other.val_images, data.val_images)


def test_max_train_is_a_stratified_subset(tiny_folder: Path, tmp_path: Path):
    data = open_data(folder_cfg(tiny_folder, tmp_path, max_train=12), CPU)
    assert torch.bincount(data.train_labels).tolist() == [4, 4, 4]
    assert data.val_size == 6  # val is carved first, untouched by max_train


def test_split_quotas_are_proportional():
    assert class_quotas(torch.tensor([10, 10, 10]), 6).tolist() == [2, 2, 2]
    assert class_quotas(torch.tensor([50, 30, 20]), 10).tolist() == [5, 3, 2]
    assert int(class_quotas(torch.tensor([7, 5, 3]), 4).sum()) == 4
    train, val = carve_val(torch.arange(40) % 4, 0.25, seed=0)
    assert len(val) == 10 and not set(train.tolist()) & set(val.tolist())


def test_imagefolder_uses_val_dir_when_present(tmp_path: Path):
    root = make_folder(tmp_path / "images", {"ant": 6, "bee": 6}, val={"ant": 3, "bee": 2})
    data = open_data(folder_cfg(root, tmp_path, val_fraction=0.5), CPU)
    assert (data.train_size, data.val_size, data.test_size) == (12, 5, 0)
    assert data.val_labels.tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="no test split"):
        data.test_batches(4)


def test_imagefolder_errors_name_the_path(tmp_path: Path):
    cfg = lambda root: folder_cfg(root, tmp_path)  # noqa: E731
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere.*--data-root"):
        open_data(cfg(missing), CPU)

    no_train = tmp_path / "no_train"
    (no_train / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no train/ folder in .*no_train"):
        open_data(cfg(no_train), CPU)

    empty = make_folder(tmp_path / "empty", {"a": 3})
    (empty / "train" / "b").mkdir()
    with pytest.raises(DataError, match=r"train/b holds no images"):
        open_data(cfg(empty), CPU)

    mismatched = make_folder(tmp_path / "mism", {"a": 3, "b": 3}, val={"a": 1, "c": 1})
    with pytest.raises(DataError, match=r"classes of .*mism/val differ") as err:
        open_data(cfg(mismatched), CPU)
    assert "'b'" in str(err.value) and "'c'" in str(err.value)

    broken = make_folder(tmp_path / "broken", {"a": 3, "b": 3})
    (broken / "train" / "b" / "bad.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match=r"cannot read image .*train/b/bad\.jpg") as err:
        open_data(cfg(broken), CPU)
    assert "\n" not in str(err.value)


# --- the held-out test split ---------------------------------------------------------------


class DecodeLog:
    """Every image file decoded, recorded on its way through the real decoder."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        real = folder_mod.load_image

        def load_image(path: str) -> torch.Tensor:
            self.paths.append(path)
            return real(path)

        monkeypatch.setattr(folder_mod, "load_image", load_image)

    def split(self, name: str) -> list[str]:
        return [p for p in self.paths if Path(p).parts[-3] == name]  # root/<split>/<class>/f


def with_test_split(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "images", {"ant": 6, "bee": 6}, val={"ant": 2, "bee": 2},
                       test={"ant": 3, "bee": 2})


@pytest.mark.parametrize("in_memory", [True, False])
def test_test_split_is_read_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            in_memory: bool):
    root = with_test_split(tmp_path)
    decoded = DecodeLog(monkeypatch)
    data = open_data(folder_cfg(root, tmp_path, in_memory=in_memory), CPU, num_workers=0)
    assert (data.train_size, data.val_size, data.test_size) == (12, 4, 5)
    list(data.train_batches(0, 6, seed=0))
    list(data.eval_batches(4))
    assert decoded.paths and decoded.split("test") == []  # counted, never opened
    batches = list(data.test_batches(4))
    test_files = sorted(str(p) for p in (root / "test").rglob("*.png"))
    assert sorted(decoded.split("test")) == test_files  # each image once
    assert [len(y) for _, y in batches] == [4, 1]
    assert torch.cat([y for _, y in batches]).tolist() == [0, 0, 0, 1, 1]
    # The validation crops: the centre of the same canvas, normalised by train's stats.
    canvases = folder_mod.decode_all(test_files, 10)
    torch.testing.assert_close(torch.cat([x for x, _ in batches]),
                               normalized(centre_crop(canvases, 8), data))


@pytest.mark.parametrize("in_memory", [True, False])
def test_test_split_gets_the_ten_crops_of_validation(tmp_path: Path, in_memory: bool):
    root = make_folder(tmp_path / "images", {"ant": 4, "bee": 4}, val={"ant": 2, "bee": 1})
    shutil.copytree(root / "val", root / "test")  # the same images as val
    cfg = folder_cfg(root, tmp_path, in_memory=in_memory, ten_crop=True)
    data = open_data(cfg, CPU, num_workers=0)
    (xv, yv), (xt, yt) = next(iter(data.eval_batches(3))), next(iter(data.test_batches(3)))
    assert xt.shape == (3, 10, 3, 8, 8) and torch.equal(yt, yv) and torch.equal(xt, xv)


def test_test_split_has_its_own_cache_and_no_part_in_the_stats(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = with_test_split(tmp_path)
    cfg = folder_cfg(root, tmp_path)
    decoded = DecodeLog(monkeypatch)
    data = open_data(cfg, CPU)
    assert not list((tmp_path / "cache").glob("*.test.pt"))  # nothing of test/ decoded yet
    first = list(data.test_batches(5))
    list(data.test_batches(5))
    assert len(decoded.split("test")) == 5  # decoded once, then kept
    assert len(list((tmp_path / "cache").glob("*.test.pt"))) == 1
    again = list(open_data(cfg, CPU).test_batches(5))
    assert len(decoded.split("test")) == 5  # another process: read from the cache
    assert torch.equal(first[0][0], again[0][0])
    # Mean, std and PCA are the training split's alone: the same once test/ is gone.
    shutil.rmtree(root / "test")
    without = open_data(cfg, CPU)
    assert without.test_size == 0 and without.fingerprint != data.fingerprint
    for a, b in zip(without.stats.as_tuple(), data.stats.as_tuple(), strict=True):
        assert torch.equal(a, b)


def test_imagefolder_refuses_test_classes_unlike_train_and_a_single_class(tmp_path: Path):
    mismatched = make_folder(tmp_path / "mism", {"a": 3, "b": 3}, test={"a": 1, "c": 1})
    with pytest.raises(DataError, match=r"classes of .*mism/test differ") as err:
        open_data(folder_cfg(mismatched, tmp_path), CPU)
    assert "only in test: ['c']" in str(err.value) and "remove test/" in str(err.value)

    single = make_folder(tmp_path / "single", {"only": 5})
    for in_memory in (True, False):  # one class would train to 0% error and mean nothing
        with pytest.raises(DataError, match=r"needs at least 2 class folders in .*single/train"
                           ) as err:
            open_data(folder_cfg(single, tmp_path, in_memory=in_memory), CPU)
        assert "\n" not in str(err.value)


def test_batch_larger_than_the_training_split_is_a_config_error(tiny_folder: Path,
                                                                tmp_path: Path):
    memory = open_data(folder_cfg(tiny_folder, tmp_path), CPU)
    stream = open_data(folder_cfg(tiny_folder, tmp_path, in_memory=False), CPU, num_workers=0)
    for data in (memory, stream):
        assert data.train_size == 24 and data.steps_per_epoch(24) == 1  # exactly one: fine
        with pytest.raises(ConfigError, match=r"train\.batch_size=25 is larger than the "
                           r"training split \(24 images\); use --set train\.batch_size=24"):
            data.check_batch_size(25)
        with pytest.raises(ConfigError, match="batch_size=25"):
            next(iter(data.train_batches(0, 25, seed=0)))


# --- cache -----------------------------------------------------------------------------------


class CountingDecoder:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.real = folder_mod.decode_all
        monkeypatch.setattr(folder_mod, "decode_all", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.real(*args, **kwargs)


def cache_files(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "cache").glob("imagefolder-*.pt") if ".stats-" not in p.name]


def test_cache_is_reused(tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    decoder = CountingDecoder(monkeypatch)
    first = open_data(folder_cfg(tiny_folder, tmp_path), CPU)
    assert decoder.calls == 1 and len(cache_files(tmp_path)) == 1
    second = open_data(folder_cfg(tiny_folder, tmp_path), CPU)
    assert decoder.calls == 1  # read from the cache, not decoded again
    assert torch.equal(first.train_images, second.train_images)
    assert first.fingerprint == second.fingerprint
    for a, b in zip(first.stats.as_tuple(), second.stats.as_tuple(), strict=True):
        assert torch.equal(a, b)
    assert not list((tmp_path / "cache").glob("*.tmp"))  # no temporary files left behind


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip_byte"])
def test_corrupt_cache_is_rebuilt(tiny_folder: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch, damage: str):
    decoder = CountingDecoder(monkeypatch)
    first = open_data(folder_cfg(tiny_folder, tmp_path), CPU)
    [path] = cache_files(tmp_path)
    blob = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(blob[: len(blob) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(blob)))
    else:  # a flipped bit inside the stored images: only the checksum can tell
        stored = torch.load(path, weights_only=True)
        stored["payload"]["images"][0, 0, 0, 0] ^= 1
        torch.save(stored, path)
    rebuilt = open_data(folder_cfg(tiny_folder, tmp_path), CPU)
    assert decoder.calls == 2
    assert torch.equal(first.train_images, rebuilt.train_images)
    open_data(folder_cfg(tiny_folder, tmp_path), CPU)
    assert decoder.calls == 2  # and the rebuilt cache is good


def test_changed_source_file_makes_the_cache_stale(tiny_folder: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch):
    decoder = CountingDecoder(monkeypatch)
    first = open_data(folder_cfg(tiny_folder, tmp_path, val_fraction=0.0), CPU)
    target = tiny_folder / "train" / "bee" / "003.png"
    Image.new("RGB", (14, 12), (255, 0, 255)).save(target)
    os.utime(target, ns=(1, 1))  # a new mtime even on a coarse-clock filesystem
    second = open_data(folder_cfg(tiny_folder, tmp_path, val_fraction=0.0), CPU)
    assert decoder.calls == 2 and first.fingerprint != second.fingerprint
    assert len(cache_files(tmp_path)) == 1  # rebuilt in place, not beside the stale one
    assert second.train_images[13].flatten(1).float().std(1).max() == 0  # the new image
    assert not torch.allclose(first.stats.mean, second.stats.mean)  # stats follow the data


# --- CIFAR -----------------------------------------------------------------------------------


def test_cifar_offline_and_absent_is_a_data_error(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch):
    class Offline(torchvision.datasets.CIFAR10):
        def __init__(self, *args, **kwargs):
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    cfg = DataConfig(source="cifar10", root=str(tmp_path / "cifar"), cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="--data-root") as err:
        open_data(cfg, CPU)
    message = str(err.value)
    assert str(tmp_path / "cifar") in message and "cifar-10-batches-py" in message
    assert "\n" not in message
    with pytest.raises(DataError, match="download is off"):
        open_data(cfg.model_copy(update={"download": False}), CPU)


def write_fake_cifar10(root: Path, per_batch: int = 20, test: bool = True) -> None:
    """A CIFAR-10 release in torchvision's pickle format: tiny random training batches, and
    a test batch of the release's 10,000 images, each one grey level (25 x its label)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        entry = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in np.arange(per_batch) % 10]}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(entry))
    names = ["airplane", "automobile", "bird", "cat", "deer",
             "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    if test:
        labels = np.arange(10_000) % 10
        entry = {"data": np.repeat((25 * labels).astype(np.uint8)[:, None], 3072, axis=1),
                 "labels": labels.tolist()}
        (folder / "test_batch").write_bytes(pickle.dumps(entry))


@pytest.fixture
def fake_cifar10(monkeypatch: pytest.MonkeyPatch) -> type:
    """torchvision's CIFAR10 without its MD5 check (the fake files have other MD5s),
    counting the splits it reads."""

    class Unchecked(torchvision.datasets.CIFAR10):
        meta = {**torchvision.datasets.CIFAR10.meta, "md5": None}
        loads: ClassVar[list[str]] = []

        def _check_integrity(self) -> bool:
            return True

        def __init__(self, root, train=True, **kwargs):
            type(self).loads.append("train" if train else "test")
            super().__init__(root, train=train, **kwargs)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Unchecked)
    return Unchecked


def test_cifar_release_is_decoded_split_and_cached(tmp_path: Path, fake_cifar10: type):
    write_fake_cifar10(tmp_path / "cifar")
    # The extracted folder itself is accepted as well as its parent.
    cfg = DataConfig(source="cifar10", root=str(tmp_path / "cifar" / "cifar-10-batches-py"),
                     cache_dir=str(tmp_path / "cache"), val_fraction=0.1, download=False)
    data = open_data(cfg, CPU)
    assert data.classes[0] == "airplane" and data.num_classes == 10
    assert (data.train_size, data.val_size) == (90, 10)
    assert torch.bincount(data.val_labels, minlength=10).tolist() == [1] * 10
    assert first_batch(data)[0].shape == (32, 3, 32, 32)
    again = open_data(cfg, CPU)
    assert fake_cifar10.loads == ["train"] and again.fingerprint == data.fingerprint


def test_cifar_test_split_is_decoded_once_and_only_when_asked(tmp_path: Path,
                                                              fake_cifar10: type):
    write_fake_cifar10(tmp_path / "cifar")
    cfg = DataConfig(source="cifar10", root=str(tmp_path / "cifar"), download=False,
                     cache_dir=str(tmp_path / "cache"), crop_size=16, pca_lighting=False)
    data = open_data(cfg, CPU)
    list(data.eval_batches(500))
    assert data.test_size == 10_000 and fake_cifar10.loads == ["train"]
    batches = [(x[::250], y) for x, y in data.test_batches(2500)]  # 10 images a batch
    assert fake_cifar10.loads == ["train", "test"]
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert x.shape == (40, 3, 16, 16) and torch.equal(y, torch.arange(10_000) % 10)
    grey = (25 * y[::250]).to(torch.uint8).view(-1, 1, 1, 1).expand(40, 3, 16, 16)
    torch.testing.assert_close(x, normalized(grey, data))
    # A second process reads the test split's own cache file, not the release.
    next(iter(open_data(cfg, CPU).test_batches(100)))
    assert fake_cifar10.loads == ["train", "test"]


def test_cifar_test_file_is_part_of_the_release(tmp_path: Path):
    root = tmp_path / "cifar"
    write_fake_cifar10(root, test=False)
    cfg = DataConfig(source="cifar10", root=str(root), download=False,
                     cache_dir=str(tmp_path / "cache"))
    # torchvision checks the release as a whole: without test_batch not even train reads.
    with pytest.raises(DataError, match="download is off; missing: test_batch") as err:
        open_data(cfg, CPU)
    assert "\n" not in str(err.value)
    write_fake_cifar10(tmp_path / "other", test=True)
    test_batch = tmp_path / "other" / "cifar-10-batches-py" / "test_batch"
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(test_batch.read_bytes())
    before = cifar_mod.files_key(cfg, root)
    with open(root / "cifar-10-batches-py" / "test_batch", "ab") as f:
        f.write(b"\0")
    assert cifar_mod.files_key(cfg, root) != before  # the fingerprint covers the test split


# --- streaming path --------------------------------------------------------------------------


def test_streaming_path_matches_the_in_memory_path(tiny_folder: Path, tmp_path: Path):
    memory = open_data(folder_cfg(tiny_folder, tmp_path), CPU)
    stream = open_data(folder_cfg(tiny_folder, tmp_path, in_memory=False), CPU, num_workers=0)
    assert type(stream).__name__ == "StreamData" and isinstance(stream, Data)
    assert (stream.classes, stream.train_size, stream.val_size, stream.fingerprint) == (
        memory.classes, memory.train_size, memory.val_size, memory.fingerprint)
    for a, b in zip(stream.stats.as_tuple(), memory.stats.as_tuple(), strict=True):
        torch.testing.assert_close(a, b)
    s_batches = list(stream.train_batches(1, 10, seed=0))
    m_batches = list(memory.train_batches(1, 10, seed=0))
    assert [x.shape for x, _ in s_batches] == [x.shape for x, _ in m_batches]
    assert s_batches[0][0].dtype == torch.float32 and s_batches[0][1].dtype == torch.int64
    # Same split and the same (seed, epoch) shuffle: the same labels in the same order.
    assert torch.equal(torch.cat([y for _, y in s_batches]), torch.cat([y for _, y in m_batches]))
    # Evaluation: the same canvases, cropped and normalised by the same code.
    (xs, ys), (xm, ym) = next(iter(stream.eval_batches(6))), next(iter(memory.eval_batches(6)))
    assert torch.equal(ys, ym)
    torch.testing.assert_close(xs, xm)


def test_streaming_augmentation_does_not_depend_on_workers(tiny_folder: Path, tmp_path: Path):
    cfg = folder_cfg(tiny_folder, tmp_path, in_memory=False)
    in_process = open_data(cfg, CPU, num_workers=0)
    one_worker = open_data(cfg, CPU, num_workers=1)
    torch.manual_seed(0)
    a = list(in_process.train_batches(2, 8, seed=7))
    b = list(one_worker.train_batches(2, 8, seed=7))
    assert len(a) == len(b) == 3
    for (x, y), (u, v) in zip(a, b, strict=True):
        assert torch.equal(x, u) and torch.equal(y, v)
    assert not torch.equal(a[0][0], next(iter(in_process.train_batches(3, 8, seed=7)))[0])


# --- the real CIFAR-10 images ------------------------------------------------------------------


@pytest.mark.data
def test_real_cifar10_folder_subset(tmp_path: Path):
    train = CIFAR10_ROOT / "train"
    if not train.is_dir():
        pytest.skip(f"real CIFAR-10 images not found at {CIFAR10_ROOT} "
                    "(set ALEXNET_CIFAR10_ROOT to the folder holding train/<class>/*.jpg)")
    # 100 real images per class, linked into a small folder: the real files through the
    # image-folder path in a few seconds instead of decoding all 50,000.
    subset = tmp_path / "cifar10"
    for class_dir in sorted(train.iterdir()):
        (subset / "train" / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.glob("*.jpg"))[:100]:
            (subset / "train" / class_dir.name / image.name).symlink_to(image)
    cfg = DataConfig(source="imagefolder", root=str(subset), cache_dir=str(tmp_path / "c"),
                     val_fraction=0.1, max_train=500)
    data = open_data(cfg, CPU)
    assert data.classes[:3] == ["airplane", "automobile", "bird"] and data.num_classes == 10
    assert (data.train_size, data.val_size) == (500, 100)
    assert data.train_images.shape[1:] == (3, 32, 32)
    # CIFAR-10's well-known pixel statistics, and a PCA led by the brightness axis.
    torch.testing.assert_close(data.stats.mean, torch.tensor([0.491, 0.482, 0.447]),
                               atol=0.03, rtol=0)
    assert float(data.stats.eigvals[0]) > 5 * float(data.stats.eigvals[1])
    assert bool((data.stats.eigvecs[:, 0] > 0).all() or (data.stats.eigvecs[:, 0] < 0).all())
    x, y = first_batch(data, batch_size=64)
    assert x.shape == (64, 3, 32, 32) and bool(torch.isfinite(x).all())


def test_streaming_bad_image_in_a_worker_is_a_one_line_data_error(tmp_path: Path):
    root = make_folder(tmp_path / "images", {"a": 4, "b": 4}, val={"a": 2, "b": 2})
    (root / "val" / "b" / "zz.jpg").write_bytes(b"\xff\xd8 truncated")
    data = open_data(folder_cfg(root, tmp_path, in_memory=False), CPU, num_workers=1)
    with pytest.raises(DataError, match=r"cannot read image .*val/b/zz\.jpg") as err:
        list(data.eval_batches(4))
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
