"""Averaging several trained nets (Section 6, Table 2) with the training loop's own scoring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alexnet import build_model
from alexnet.config import RunConfig, build_config
from alexnet.data import Data, open_data
from alexnet.ensemble import evaluate_ensemble, member_probs
from alexnet.errors import DataError
from alexnet.train import autocast_for, evaluate

CPU = torch.device("cpu")
# 12 held-out images in batches of 5: a ragged last batch.
SMALL = {"data.synthetic.train_size": 32, "data.synthetic.val_size": 12,
         "train.eval_batch_size": 5, "runtime.device": "cpu"}


def config(ten_crop: bool) -> RunConfig:
    return build_config("quick", {**SMALL, "data.ten_crop": ten_crop})


@pytest.fixture(scope="module", params=[False, True], ids=["centre", "ten_crop"])
def data(request) -> tuple[RunConfig, Data]:
    cfg = config(request.param)
    return cfg, open_data(cfg.data, CPU)


@pytest.fixture(scope="module")
def members() -> list[nn.Module]:
    """Three small nets from different seeds, each given a few full-batch steps, so that
    they differ and are not just their initialization. Left in eval mode."""
    cfg = config(ten_crop=False)
    images, labels = next(open_data(cfg.data, CPU).train_batches(1, 32, 0))
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = build_model("alexnet_cifar", 10, width=0.0625, init="kaiming", dropout=0.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        for _ in range(3):
            loss = F.cross_entropy(model(images), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        models.append(model.eval())
    return models


def averaged_probs(models: list[nn.Module], images: torch.Tensor) -> torch.Tensor:
    """Written out the long way: per model, softmax per crop, mean over crops; then the
    mean over models."""
    per_model = []
    for model in models:
        model.eval()
        with torch.no_grad():
            if images.dim() == 5:
                b, crops = images.shape[:2]
                p = model(images.flatten(0, 1)).softmax(1).view(b, crops, -1).mean(1)
            else:
                p = model(images).softmax(1)
        per_model.append(p)
    return sum(per_model) / len(per_model)


def test_member_probs_are_each_models_softmax_and_their_mean_the_average(data, members):
    cfg, d = data
    images, _ = next(iter(d.eval_batches(8)))
    probs = member_probs(members, images)
    assert probs.shape == (3, 8, d.num_classes)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 8))
    for model, p in zip(members, probs, strict=True):
        torch.testing.assert_close(p, averaged_probs([model], images))
    torch.testing.assert_close(probs.mean(0), averaged_probs(members, images))
    assert not torch.equal(probs[0].argmax(1), probs[1].argmax(1))  # the members disagree


def test_each_member_scores_exactly_what_evaluate_reports(data, members):
    cfg, d = data
    result = evaluate_ensemble(members, d.eval_batches(cfg.train.eval_batch_size), CPU,
                               autocast=lambda: autocast_for(CPU, cfg))  # as grid.py calls it
    assert result.images == d.val_size
    for model, scores in zip(members, result.members, strict=True):
        loss, error, error5 = evaluate(model, d, CPU, cfg, channels_last=False)
        assert (scores.loss, scores.error, scores.error_top5) == pytest.approx(
            (loss, error, error5), abs=1e-12)


def test_the_ensemble_scores_the_averaged_softmax(data, members):
    cfg, d = data
    result = evaluate_ensemble(members, d.eval_batches(cfg.train.eval_batch_size), CPU)
    probs, labels = zip(*((averaged_probs(members, x), y)
                          for x, y in d.eval_batches(cfg.train.eval_batch_size)), strict=True)
    probs, labels = torch.cat(probs), torch.cat(labels)
    top5 = probs.topk(5, dim=1).indices
    expected_loss = -probs.gather(1, labels[:, None]).log().mean().item()
    expected_error = (probs.argmax(1) != labels).double().mean().item()
    expected_error5 = (~(top5 == labels[:, None]).any(1)).double().mean().item()
    assert result.ensemble.loss == pytest.approx(expected_loss, rel=1e-5)
    assert result.ensemble.error == pytest.approx(expected_error, abs=1e-12)
    assert result.ensemble.error_top5 == pytest.approx(expected_error5, abs=1e-12)
    single = sum(m.error for m in result.members) / 3
    assert result.single.error == pytest.approx(single)
    assert result.delta == pytest.approx(expected_error - single)
    # The log of an average is at least the average of the logs (Jensen): averaging can
    # only lower the loss below the members' mean, whatever it does to the error.
    assert result.ensemble.loss <= result.single.loss + 1e-9


def test_an_ensemble_of_one_is_that_model(data, members):
    cfg, d = data
    result = evaluate_ensemble(members[:1], d.eval_batches(cfg.train.eval_batch_size), CPU)
    assert result.members == (result.ensemble,) and result.single == result.ensemble
    assert result.delta == 0.0 and result.delta_top5 == 0.0


def test_models_come_back_in_their_mode_and_bad_input_is_refused(data, members):
    cfg, d = data
    members[0].train()
    members[1].eval()
    evaluate_ensemble(members[:2], d.eval_batches(cfg.train.eval_batch_size), CPU)
    assert members[0].training and not members[1].training
    with pytest.raises(DataError, match="no images"):
        evaluate_ensemble(members, iter(()), CPU)
    with pytest.raises(ValueError, match="at least one model"):
        evaluate_ensemble([], d.eval_batches(cfg.train.eval_batch_size), CPU)
