"""TRAIN.LOSS: each loss against its written-out formula, with and without mixed targets, and its config rules."""
from __future__ import annotations

from typing import Optional

import pytest
import torch
from timm.data import Mixup
from torch import nn

from config import ConfigError, get_defaults, load_config
from training.loss import build_criterion

B, C = 6, 5


def make_config(loss: str, smoothing: float = 0.0, thresh: Optional[float] = None):
    cfg = get_defaults()
    cfg.TRAIN.LOSS, cfg.MODEL.LABEL_SMOOTHING, cfg.TRAIN.BCE_TARGET_THRESH = loss, smoothing, thresh
    return cfg


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(B, C, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, C, (B,), generator=generator)
    weights = torch.rand(B, C, generator=generator, dtype=torch.float64)
    soft = weights / weights.sum(dim=1, keepdim=True)  # (B, C) mixed-target-like rows summing to 1
    return logits, labels, soft


def soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean_b -sum_c t_bc log softmax(x_b)_c."""
    return -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()


def bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean_bc -(t log sigmoid(x) + (1 - t) log(1 - sigmoid(x)))."""
    p = logits.sigmoid()
    return -(targets * p.log() + (1 - targets) * (1 - p).log()).mean()


def smoothed_one_hot(labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """timm's one-hot: 1 - s + s / C on the label, s / C elsewhere."""
    return torch.nn.functional.one_hot(labels, C).double() * (1 - smoothing) + smoothing / C


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_ce_is_todays_loss(batch, smoothing: float) -> None:
    logits, labels, soft = batch
    criterion = build_criterion(make_config("ce", smoothing), mixup=False)
    expected = soft_ce(logits, smoothed_one_hot(labels, smoothing))
    assert torch.allclose(criterion(logits, labels), expected, atol=1e-12)
    assert isinstance(criterion, nn.CrossEntropyLoss) == (smoothing == 0)
    mixed = build_criterion(make_config("ce", smoothing), mixup=True)
    assert torch.allclose(mixed(logits, soft), soft_ce(logits, soft), atol=1e-12)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_ce_always_takes_soft_targets(batch, smoothing: float) -> None:
    logits, labels, soft = batch
    criterion = build_criterion(make_config("soft-ce", smoothing), mixup=False)
    assert torch.allclose(criterion(logits, labels), soft_ce(logits, smoothed_one_hot(labels, smoothing)),
                          atol=1e-12)
    assert torch.allclose(criterion(logits, soft), soft_ce(logits, soft), atol=1e-12)
    mixed = build_criterion(make_config("soft-ce", smoothing), mixup=True)
    assert torch.allclose(mixed(logits, soft), soft_ce(logits, soft), atol=1e-12)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_bce_on_labels_and_on_multi_hot_targets(batch, smoothing: float) -> None:
    logits, labels, _ = batch
    criterion = build_criterion(make_config("bce", smoothing), mixup=False)
    assert torch.allclose(criterion(logits, labels), bce(logits, smoothed_one_hot(labels, smoothing)), atol=1e-12)
    multi_hot = (torch.arange(B * C).view(B, C) % 3 == 0).double()  # several classes per row, one row none
    multi_hot[1] = 0
    # Unmixed multi-hot targets: smoothed towards 0.5, as timm's Mixup smooths multi-label targets.
    assert torch.allclose(criterion(logits, multi_hot), bce(logits, multi_hot * (1 - smoothing) + 0.5 * smoothing),
                          atol=1e-12)


def test_bce_on_mixed_targets_and_the_threshold(batch) -> None:
    logits, _, soft = batch
    mixed = build_criterion(make_config("bce", 0.1), mixup=True)
    assert torch.allclose(mixed(logits, soft), bce(logits, soft), atol=1e-12)  # Mixup smoothed them already
    thresholded = build_criterion(make_config("bce", 0.1, thresh=0.2), mixup=True)
    assert torch.allclose(thresholded(logits, soft), bce(logits, (soft > 0.2).double()), atol=1e-12)
    # DeiT III's 0.0: every class with any share of the mix is a positive.
    deit = build_criterion(make_config("bce", 0.0, thresh=0.0), mixup=True)
    mixup = Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=C)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    _, targets = mixup(torch.zeros(B, 3, 4, 4), labels)
    both = torch.zeros(B, C, dtype=torch.float64)
    both[torch.arange(B), labels] = 1
    both[torch.arange(B), labels.flip(0)] = 1
    assert torch.allclose(deit(logits, targets.double()), bce(logits, both), atol=1e-12)


def test_bce_threshold_on_smoothed_labels_without_mixup(batch) -> None:
    logits, labels, _ = batch
    criterion = build_criterion(make_config("bce", 0.1, thresh=0.5), mixup=False)
    assert torch.allclose(criterion(logits, labels), bce(logits, smoothed_one_hot(labels, 0.0)), atol=1e-12)


@pytest.mark.parametrize("opts, needle", [
    (["TRAIN.LOSS", "mse"], r"TRAIN\.LOSS='mse' is not supported; use one of ce, soft-ce, bce"),
    (["TRAIN.BCE_TARGET_THRESH", "0.0"], r"TRAIN\.BCE_TARGET_THRESH=0\.0 must be null unless TRAIN\.LOSS is bce"),
    (["TRAIN.LOSS", "bce", "TRAIN.BCE_TARGET_THRESH", "1.5"], r"TRAIN\.BCE_TARGET_THRESH=1\.5 .*in \[0, 1\)"),
    # Hard 0/1 targets: no mixup, no cutmix, no smoothing.
    (["TRAIN.LOSS", "bce", "TRAIN.BCE_TARGET_THRESH", "0.0", "AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0",
      "MODEL.LABEL_SMOOTHING", "0.0"], r"on hard 0/1 targets a threshold changes nothing; set it to null"),
    # Smoothing's floor (0.1 / 1000 classes; 0.1 / 2 for multi-label) above the threshold: every target is 1.
    (["TRAIN.LOSS", "bce", "TRAIN.BCE_TARGET_THRESH", "0.0"], r"TRAIN\.BCE_TARGET_THRESH=0\.0 is below 0\.0001, the "
     r"smallest target that MODEL\.LABEL_SMOOTHING=0\.1 leaves: every target would become 1"),
    (["DATA.FORMAT", "multilabel", "TRAIN.LOSS", "bce", "TRAIN.BCE_TARGET_THRESH", "0.02"],
     r"TRAIN\.BCE_TARGET_THRESH=0\.02 is below 0\.05"),
    (["DATA.FORMAT", "multilabel"], r"TRAIN\.LOSS='ce' does not fit DATA\.FORMAT multilabel .*use --opts "
     r"TRAIN\.LOSS bce"),
    (["DATA.FORMAT", "multilabel", "TRAIN.LOSS", "bce", "DATA.DATASET", "synthetic"],
     r"DATA\.FORMAT='multilabel' reads DATA_PATH but DATA\.DATASET='synthetic'"),
])
def test_loss_config_errors(opts, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(opts=opts)


def test_valid_loss_configs_load() -> None:
    deit = load_config(opts=["TRAIN.LOSS", "bce", "TRAIN.BCE_TARGET_THRESH", "0.0", "MODEL.LABEL_SMOOTHING", "0.0"])
    assert deit.TRAIN.BCE_TARGET_THRESH == 0.0
    assert load_config(opts=["TRAIN.LOSS", "bce", "TRAIN.BCE_TARGET_THRESH", "0.2"]).TRAIN.BCE_TARGET_THRESH == 0.2
    assert load_config(opts=["TRAIN.LOSS", "soft-ce"]).TRAIN.LOSS == "soft-ce"
    assert load_config().TRAIN.LOSS == "ce" and load_config().TRAIN.BCE_TARGET_THRESH is None
