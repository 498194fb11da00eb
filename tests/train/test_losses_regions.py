"""Region-based loss and online pseudo-Dice: sigmoid Dice + BCE on region targets made from label maps."""

from __future__ import annotations

import pytest
import torch

from autoseg.data.augment_cpu import downsample_seg_for_ds
from autoseg.dataset.spec import LabelScheme
from autoseg.train.loop import region_tp_fp_fn
from autoseg.train.losses import DeepSupervisionLoss, RegionDiceBCELoss, build_loss

BRATS = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}
SCHEME = LabelScheme.from_labels(BRATS, (1, 2, 3))
SPARSE = LabelScheme.from_labels({**BRATS, "ignore": 4}, (1, 2, 3))


def _case(seed: int, ignore: int | None = None, shape=(2, 5, 8, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits (B, 3, *spatial) and a label map (B, 1, *spatial) with values 0..3 (and ``ignore``)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, shape, generator=g)
    if ignore is not None:
        labels[torch.rand(shape, generator=g) < 0.3] = ignore
    logits = torch.randn((shape[0], 3, *shape[1:]), generator=g).requires_grad_(True)
    return logits, labels[:, None]


def _nnunet_loss(batch_dice: bool, use_ignore: bool, weight_ce: float = 1.0, weight_dice: float = 1.0):
    """nnUNetTrainer._build_loss for a region dataset, single process (its own dice class and settings)."""
    compound = pytest.importorskip("nnunetv2.training.loss.compound_losses")
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    return compound.DC_and_BCE_loss({}, {"batch_dice": batch_dice, "do_bg": True, "smooth": 1e-5, "ddp": False},
                                    weight_ce=weight_ce, weight_dice=weight_dice, use_ignore_label=use_ignore,
                                    dice_class=MemoryEfficientSoftDiceLoss)


def _nnunet_target(labels: torch.Tensor, scheme: LabelScheme) -> torch.Tensor:
    """nnU-Net's region target: one channel per region, plus the ignore mask last when there is one."""
    regions = [torch.isin(labels[:, 0], torch.tensor(r)) for r in scheme.regions]
    if scheme.ignore_label is not None:
        regions.append(labels[:, 0] == scheme.ignore_label)
    return torch.stack(regions, 1).float()


@pytest.mark.parametrize("batch_dice", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_gradient_equal_nnunets_dc_and_bce(batch_dice: bool, seed: int) -> None:
    logits, labels = _case(seed)
    ours = build_loss("dice_ce", batch_dice, 1, scheme=SCHEME)
    assert isinstance(ours, RegionDiceBCELoss)
    loss = ours(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = _nnunet_loss(batch_dice, False)(ref_logits, _nnunet_target(labels, SCHEME))
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad, ref_logits.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("batch_dice", [True, False])
def test_with_an_ignore_label_dice_matches_nnunet_and_bce_is_its_per_region_mean(batch_dice: bool) -> None:
    """Dice: same as nnU-Net. BCE: nnU-Net's masked sum is divided by voxels, ours by voxels x regions."""
    logits, labels = _case(2, ignore=4)
    dice = build_loss("dice", batch_dice, 1, scheme=SPARSE)(logits, labels)
    bce = build_loss("ce", batch_dice, 1, scheme=SPARSE)(logits, labels)
    target = _nnunet_target(labels, SPARSE)
    ref_dice = _nnunet_loss(batch_dice, True, weight_ce=0.0)(logits, target)
    ref_bce = _nnunet_loss(batch_dice, True, weight_dice=0.0)(logits, target)
    assert dice.item() == pytest.approx(ref_dice.item(), rel=1e-5)
    assert bce.item() == pytest.approx(ref_bce.item() / 3, rel=1e-5)


def test_ignore_voxels_get_no_gradient_and_change_nothing() -> None:
    logits, labels = _case(3, ignore=4)
    loss_fn = build_loss("dice_ce", True, 1, scheme=SPARSE)
    loss = loss_fn(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)
    ignored = (labels[:, 0] == 4)[:, None].expand_as(logits)
    assert torch.count_nonzero(grad[ignored]) == 0 and torch.count_nonzero(grad[~ignored]) > 0
    changed = logits.detach().clone()
    changed[ignored] = 50.0  # whatever is predicted where nobody annotated
    assert loss_fn(changed, labels).item() == pytest.approx(loss.item(), rel=1e-6)


def test_deep_supervision_converts_every_scale_and_a_perfect_prediction_scores_minus_one() -> None:
    _, labels = _case(4, shape=(2, 8, 8, 8))
    scales = [(1, 1, 1), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)]
    targets = [torch.from_numpy(t) for t in downsample_seg_for_ds(labels.numpy(), scales)]
    perfect = [(SCHEME.region_targets(t) * 2 - 1) * 30.0 for t in targets]  # sigmoid ~ 0 or 1
    loss = build_loss("dice_ce", True, len(scales), scheme=SCHEME)
    assert isinstance(loss, DeepSupervisionLoss)
    assert loss(perfect, targets).item() == pytest.approx(-1.0, abs=1e-4)
    wrong = [-p for p in perfect]
    assert loss(wrong, targets).item() > 10


def test_pseudo_dice_counts_per_region_at_sigmoid_half() -> None:
    labels = torch.tensor([0, 1, 2, 3, 3, 4]).reshape(1, 1, 6)
    logits = torch.tensor([[1.0, 1.0, -1.0, 1.0, 1.0, 1.0],     # whole
                           [-1.0, -1.0, 1.0, 1.0, -1.0, 1.0],   # core
                           [1.0, -1.0, -1.0, 1.0, 1.0, 1.0]])[None]  # enhancing
    tp, fp, fn = region_tp_fp_fn(logits, labels, SPARSE).tolist()
    # voxel 5 holds the ignore label: it counts nowhere, whatever is predicted
    assert tp == [3, 2, 2] and fp == [1, 0, 1] and fn == [1, 1, 0]
