"""Segmentation losses: soft Dice + cross-entropy, and the deep-supervision wrapper.

Follows nnU-Net v2's defaults (``DC_and_CE_loss`` with ``MemoryEfficientSoftDiceLoss``):
softmax probabilities, Dice over the foreground classes only, smoothing 1e-5, "batch Dice"
(one Dice per class over the whole batch) when the plan says so, CE and Dice weighted 1:1.
Under DDP the batch Dice sums its intersections and denominators over all ranks, so it is
the Dice of the global batch (nnU-Net all-gathers them with ``ddp=True``), not a mean of
per-rank Dice values.
Networks give logits ``(B, K, *spatial)``; targets are label maps ``(B, 1, *spatial)``
(float or int) with values 0..K-1, or K for an unannotated voxel.

Sparse annotations (nnU-Net's ignore label): dataset.json's ``"ignore"`` is always one above
the highest class (`autoseg.dataset.spec` enforces it) and the network has no channel for
it, so in a target the value K *is* the ignore label; every loss here knows it without
being told. Such voxels add nothing to any loss and get no gradient: CE is averaged over
the annotated voxels only (0 when a batch has none), and the soft Dice sums predictions
and references over annotated voxels only. Without K in the target both are exactly the
plain losses.

Region-based training (`autoseg.dataset.spec.LabelScheme` with regions) uses
`RegionDiceBCELoss`: the label map is turned into one binary mask per region here, on the
device and after augmentation, at every deep-supervision scale; sigmoid outputs, soft Dice
over all regions (no background channel) + BCE, as nnU-Net's ``DC_and_BCE_loss``. There the
ignore label is named (it is not K) and its voxels are masked out of both terms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from autoseg.dataset.spec import LabelScheme
from autoseg.train.ddp import all_reduce_sum_grad

DICE_SMOOTH = 1e-5
"""Added to numerator and denominator of the soft Dice (nnU-Net's default); keeps empty classes finite."""

DS_WEIGHT_DECAY = 0.5
"""Each coarser deep-supervision output weighs half the one above it (nnU-Net)."""

DDP_COARSEST_WEIGHT = 1e-6
"""Coarsest DS output's weight under DDP: ~0, but every parameter still gets a gradient."""


def _labels(target: torch.Tensor) -> torch.Tensor:
    """``(B, 1, *spatial)`` label map of any dtype -> ``(B, *spatial)`` int64."""
    if target.ndim >= 3 and target.shape[1] == 1:
        target = target[:, 0]
    return target.long()


def _annotated(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Boolean ``(B, *spatial)``: voxels that carry a class, i.e. not the ignore label K."""
    return labels != num_classes


class SoftDiceLoss(nn.Module):
    """Negative mean soft Dice over foreground classes (background excluded).

    ``batch_dice=True`` sums intersections over the batch before dividing (one Dice per
    class), which is steadier for small structures; otherwise one Dice per sample and class.
    ``ddp=True`` makes the batch the global one: the sums run over every rank's samples.
    """

    def __init__(self, batch_dice: bool, smooth: float = DICE_SMOOTH, ddp: bool = False) -> None:
        super().__init__()
        self.batch_dice = batch_dice
        self.smooth = smooth
        self.ddp = ddp

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        k = logits.shape[1]
        labels = _labels(target)
        annotated = _annotated(labels, k)
        # unannotated voxels: no prediction mass and no reference mass, hence no gradient
        probs = torch.softmax(logits.float(), dim=1)[:, 1:] * annotated[:, None]
        onehot = F.one_hot(labels.masked_fill(~annotated, 0), k).movedim(-1, 1)[:, 1:].to(probs.dtype)
        return -soft_dice(probs, onehot, self.batch_dice, self.smooth, self.ddp).mean()


def soft_dice(probs: torch.Tensor, onehot: torch.Tensor, batch_dice: bool, smooth: float = DICE_SMOOTH,
              ddp: bool = False) -> torch.Tensor:
    """Soft Dice per channel (``batch_dice``) or per sample and channel of ``(B, C, *spatial)`` maps."""
    axes = tuple(range(2, probs.ndim))
    intersect = (probs * onehot).sum(axes)
    denom = probs.sum(axes) + onehot.sum(axes)
    if batch_dice:
        intersect, denom = intersect.sum(0), denom.sum(0)
        if ddp:
            intersect, denom = all_reduce_sum_grad(torch.stack([intersect, denom])).unbind(0)
    return (2 * intersect + smooth) / (denom + smooth).clamp_min(1e-8)


class CrossEntropyLoss(nn.Module):
    """Voxel-wise cross-entropy on a label map ``(B, 1, *spatial)``, averaged over annotated voxels."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        k = logits.shape[1]
        labels = _labels(target)
        total = F.cross_entropy(logits.float(), labels, ignore_index=k, reduction="sum")
        # sum / count, not "mean": a patch with no annotated voxel gives 0, not 0/0 = NaN
        return total / _annotated(labels, k).sum().clamp_min(1)


class DiceCELoss(nn.Module):
    """CE + soft Dice, weighted 1:1 (nnU-Net's default training loss)."""

    def __init__(self, batch_dice: bool, weight_ce: float = 1.0, weight_dice: float = 1.0,
                 ddp: bool = False) -> None:
        super().__init__()
        self.ce = CrossEntropyLoss()
        self.dice = SoftDiceLoss(batch_dice, ddp=ddp)
        self.weight_ce = weight_ce
        self.weight_dice = weight_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.weight_ce * self.ce(logits, target) + self.weight_dice * self.dice(logits, target)


class RegionDiceBCELoss(nn.Module):
    """Sigmoid soft Dice over every region + BCE, for region-based training (nnU-Net's DC_and_BCE_loss).

    Targets are label maps ``(B, 1, *spatial)``; ``scheme`` turns them into region masks.
    Voxels with the scheme's ignore label count in neither term. BCE is the mean over annotated
    (voxel, region) pairs; nnU-Net divides its masked sum by the voxel count only, which makes
    its BCE with an ignore label R times larger than without one (R regions), so here the two
    agree where nnU-Net's would not.
    """

    def __init__(self, scheme: LabelScheme, batch_dice: bool, weight_ce: float = 1.0, weight_dice: float = 1.0,
                 ddp: bool = False) -> None:
        super().__init__()
        if not scheme.has_regions:
            raise ValueError("RegionDiceBCELoss needs a label scheme with regions")
        self.scheme = scheme
        self.batch_dice = batch_dice
        self.weight_ce = weight_ce
        self.weight_dice = weight_dice
        self.ddp = ddp

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = _labels(target)
        regions = self.scheme.region_targets(labels[:, None])
        logits = logits.float()
        ignore = self.scheme.ignore_label
        mask = None if ignore is None else (labels != ignore)[:, None].float()
        total = logits.new_zeros(())
        if self.weight_dice:
            probs = torch.sigmoid(logits)
            if mask is not None:
                probs, regions_d = probs * mask, regions * mask
            else:
                regions_d = regions
            total = total - self.weight_dice * soft_dice(probs, regions_d, self.batch_dice, ddp=self.ddp).mean()
        if self.weight_ce:
            if mask is None:
                bce = F.binary_cross_entropy_with_logits(logits, regions)
            else:
                per = F.binary_cross_entropy_with_logits(logits, regions, reduction="none") * mask
                bce = per.sum() / (mask.sum() * logits.shape[1]).clamp_min(1)
            total = total + self.weight_ce * bce
        return total


REGION_LOSS_WEIGHTS: dict[str, tuple[float, float]] = {"dice_ce": (1.0, 1.0), "dice": (0.0, 1.0), "ce": (1.0, 0.0)}
"""Loss name -> (BCE weight, Dice weight) when training regions: the same names mean the sigmoid versions."""


LOSSES: dict[str, Callable[[bool, bool], nn.Module]] = {
    "dice_ce": lambda batch_dice, ddp: DiceCELoss(batch_dice, ddp=ddp),
    "dice": lambda batch_dice, ddp: SoftDiceLoss(batch_dice, ddp=ddp),
    "ce": lambda batch_dice, ddp: CrossEntropyLoss(),
}
"""Loss name (``TrainerConfig.loss``) -> factory taking the plan's ``batch_dice`` and whether DDP runs."""


def deep_supervision_weights(num_outputs: int, coarsest: float = 0.0) -> list[float]:
    """Weights of the DS outputs, full resolution first.

    Halve per scale, give the coarsest output weight ``coarsest`` (0: too coarse to help,
    nnU-Net v2), normalize to sum 1. A single output gets weight 1. DDP needs every
    parameter to receive a gradient, so distributed runs pass a tiny nonzero ``coarsest``
    (`DDP_COARSEST_WEIGHT`), as nnU-Net does.
    """
    if num_outputs < 1:
        raise ValueError("need at least one output")
    if num_outputs == 1:
        return [1.0]
    raw = [DS_WEIGHT_DECAY ** i for i in range(num_outputs)]
    raw[-1] = coarsest
    total = sum(raw)
    return [w / total for w in raw]


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of a base loss over the DS outputs and targets (both full-res first)."""

    def __init__(self, base: nn.Module, weights: Sequence[float]) -> None:
        super().__init__()
        self.base = base
        self.weights = tuple(float(w) for w in weights)

    def forward(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(outputs) != len(self.weights) or len(targets) != len(self.weights):
            raise ValueError(f"expected {len(self.weights)} outputs and targets, "
                             f"got {len(outputs)} and {len(targets)}")
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for w, out, tgt in zip(self.weights, outputs, targets):
            if w != 0.0:
                total = total + w * self.base(out, tgt)
        return total


def build_loss(name: str, batch_dice: bool, num_ds_outputs: int, distributed: bool = False,
               scheme: LabelScheme | None = None) -> nn.Module:
    """The configured loss; wrapped for deep supervision when the net has several outputs.

    The returned module takes (outputs, targets) as lists when ``num_ds_outputs > 1`` and as
    single tensors otherwise. ``distributed`` sums batch Dice over the ranks and keeps a
    gradient on every DS head. A ``scheme`` with regions gives the sigmoid `RegionDiceBCELoss`.
    """
    if name not in LOSSES:
        raise KeyError(name)
    if scheme is not None and scheme.has_regions:
        w_ce, w_dice = REGION_LOSS_WEIGHTS[name]
        base = RegionDiceBCELoss(scheme, batch_dice, w_ce, w_dice, ddp=distributed)
    else:
        base = LOSSES[name](batch_dice, distributed)
    if num_ds_outputs > 1:
        coarsest = DDP_COARSEST_WEIGHT if distributed else 0.0
        return DeepSupervisionLoss(base, deep_supervision_weights(num_ds_outputs, coarsest))
    return base
