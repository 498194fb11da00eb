"""Losses, deep-supervision weights and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from autoseg.train.config import TrainerConfig
from autoseg.train.losses import (DeepSupervisionLoss, SoftDiceLoss, build_loss,
                                  deep_supervision_weights)
from autoseg.train.schedules import learning_rate, poly_lr


def _logits_for(labels: torch.Tensor, k: int, scale: float = 50.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, k).movedim(-1, 1).float() * scale


def test_poly_lr_values() -> None:
    cfg = TrainerConfig(epochs=1000, lr=0.01)
    assert poly_lr(0, cfg) == pytest.approx(0.01)
    assert poly_lr(500, cfg) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert poly_lr(999, cfg) == pytest.approx(0.01 * 0.001 ** 0.9)
    assert poly_lr(1000, cfg) == 0.0
    assert learning_rate(10, TrainerConfig(lr_schedule="constant", lr=0.1)) == 0.1
    with pytest.raises(ValueError):
        poly_lr(1001, cfg)


def test_ds_weights_halve_and_drop_the_coarsest() -> None:
    w = deep_supervision_weights(5)
    expected = [1, 0.5, 0.25, 0.125, 0]
    assert w == pytest.approx([e / sum(expected) for e in expected])
    assert sum(w) == pytest.approx(1.0)
    assert deep_supervision_weights(1) == [1.0]
    ddp = build_loss("dice_ce", True, 3, distributed=True)  # DDP: every head needs a gradient
    assert 0 < ddp.weights[-1] < 1e-5 and sum(ddp.weights) == pytest.approx(1.0)


def test_dice_is_minus_one_for_a_perfect_prediction_and_ignores_background() -> None:
    labels = torch.zeros(2, 8, 8, 8, dtype=torch.long)
    labels[:, 2:5, 2:5, 2:5] = 1
    labels[:, 5:7, 5:7, 5:7] = 2
    target = labels[:, None].float()
    for batch_dice in (True, False):
        assert SoftDiceLoss(batch_dice)(_logits_for(labels, 3), target).item() == pytest.approx(-1.0, abs=1e-4)
    # predicting background everywhere is right on most voxels, yet the foreground Dice is ~0
    wrong = _logits_for(torch.zeros_like(labels), 3)
    assert SoftDiceLoss(True)(wrong, target).item() == pytest.approx(0.0, abs=1e-3)


def test_dice_ce_loss_falls_with_better_logits() -> None:
    labels = torch.randint(0, 3, (2, 6, 6, 6))
    loss = build_loss("dice_ce", batch_dice=True, num_ds_outputs=1)
    good, bad = _logits_for(labels, 3, 5.0), _logits_for((labels + 1) % 3, 3, 5.0)
    assert loss(good, labels[:, None]) < loss(bad, labels[:, None])


def test_deep_supervision_loss_weights_outputs_and_skips_the_coarsest() -> None:
    labels = torch.randint(0, 3, (1, 8, 8, 8))
    outs = [_logits_for(labels, 3), _logits_for(labels[:, ::2, ::2, ::2], 3),
            torch.full((1, 3, 2, 2, 2), float("nan"))]  # weight 0: never evaluated
    tgts = [labels[:, None], labels[:, None, ::2, ::2, ::2], labels[:, None, ::4, ::4, ::4]]
    ds = build_loss("ce", batch_dice=True, num_ds_outputs=3)
    assert isinstance(ds, DeepSupervisionLoss)
    value = ds(outs, tgts)
    assert math.isfinite(value.item()) and value.item() < 1e-3
    with pytest.raises(ValueError):
        ds(outs[:2], tgts[:2])
