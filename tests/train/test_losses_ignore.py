"""Losses on sparse targets: the value K (the ignore label) contributes nothing and gets no gradient."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from autoseg.data.augment_cpu import downsample_seg_for_ds
from autoseg.train.losses import DICE_SMOOTH, CrossEntropyLoss, SoftDiceLoss, build_loss

K = 3
IGNORE = K


def _sparse_target(seed: int = 0, shape: tuple[int, ...] = (2, 6, 8, 8)) -> torch.Tensor:
    """(B, 1, *spatial) labels 0..2 with about a third of the voxels set to the ignore label."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.35] = IGNORE
    return labels[:, None]


def _logits(target: torch.Tensor, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((target.shape[0], K, *target.shape[2:]), generator=g).requires_grad_(True)


@pytest.mark.parametrize("name", ["dice_ce", "dice", "ce"])
@pytest.mark.parametrize("batch_dice", [True, False])
def test_no_gradient_reaches_ignore_voxels(name: str, batch_dice: bool) -> None:
    target = _sparse_target()
    logits = _logits(target)
    build_loss(name, batch_dice, 1)(logits, target).backward()
    ignored = (target[:, 0] == IGNORE)[:, None].expand_as(logits)
    assert logits.grad is not None
    assert torch.count_nonzero(logits.grad[ignored]) == 0
    assert torch.count_nonzero(logits.grad[~ignored]) > 0.9 * (~ignored).sum()


@pytest.mark.parametrize("name", ["dice_ce", "dice", "ce"])
def test_predictions_on_ignore_voxels_do_not_change_the_loss(name: str) -> None:
    target = _sparse_target()
    logits = _logits(target).detach()
    other = logits.clone()
    ignored = (target[:, 0] == IGNORE)[:, None].expand_as(logits)
    other[ignored] = torch.randn(int(ignored.sum())) * 10
    loss = build_loss(name, True, 1)
    assert loss(other, target).item() == loss(logits, target).item()


def test_values_equal_the_losses_over_annotated_voxels_only() -> None:
    target = _sparse_target()
    logits = _logits(target).detach()
    labels = target[:, 0]
    annotated = labels != IGNORE
    flat_logits = logits.movedim(1, -1)[annotated]  # (N, K)
    ce = F.cross_entropy(flat_logits, labels[annotated])
    assert CrossEntropyLoss()(logits, target).item() == pytest.approx(ce.item(), rel=1e-6)
    # batch Dice over the annotated voxels, written out
    probs = torch.softmax(flat_logits, -1)[:, 1:]
    onehot = F.one_hot(labels[annotated], K)[:, 1:].float()
    inter, denom = (probs * onehot).sum(0), probs.sum(0) + onehot.sum(0)
    dice = ((2 * inter + DICE_SMOOTH) / (denom + DICE_SMOOTH)).mean()
    assert SoftDiceLoss(batch_dice=True)(logits, target).item() == pytest.approx(-dice.item(), rel=1e-6)


def test_a_patch_without_annotation_gives_a_finite_loss_and_no_gradient() -> None:
    target = torch.full((2, 1, 4, 4, 4), IGNORE)
    logits = _logits(target)
    loss = build_loss("dice_ce", False, 1)(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and CrossEntropyLoss()(logits, target).item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0


def test_dense_targets_give_exactly_the_plain_losses() -> None:
    target = torch.randint(0, K, (2, 1, 6, 8, 8))
    logits = _logits(target).detach()
    labels = target[:, 0]
    assert CrossEntropyLoss()(logits, target).item() == F.cross_entropy(logits, labels).item()
    probs = torch.softmax(logits, 1)[:, 1:]
    onehot = F.one_hot(labels, K).movedim(-1, 1)[:, 1:].float()
    inter, denom = (probs * onehot).sum((2, 3, 4)), probs.sum((2, 3, 4)) + onehot.sum((2, 3, 4))
    plain = -((2 * inter + DICE_SMOOTH) / (denom + DICE_SMOOTH)).mean()
    assert SoftDiceLoss(batch_dice=False)(logits, target).item() == plain.item()


def test_deep_supervision_on_downsampled_sparse_targets() -> None:
    target = _sparse_target(shape=(2, 8, 16, 16))
    scales = [(1.0, 1.0, 1.0), (1.0, 0.5, 0.5), (0.5, 0.25, 0.25)]
    targets = [torch.from_numpy(t) for t in downsample_seg_for_ds(target.numpy(), scales)]
    outputs = [_logits(t, seed=i) for i, t in enumerate(targets)]
    loss = build_loss("dice_ce", True, 3)(outputs, targets)
    loss.backward()
    assert torch.isfinite(loss)
    for out, tgt in zip(outputs[:2], targets[:2]):  # the coarsest output has weight 0
        ignored = (tgt[:, 0] == IGNORE)[:, None].expand_as(out)
        assert ignored.any() and torch.count_nonzero(out.grad[ignored]) == 0
