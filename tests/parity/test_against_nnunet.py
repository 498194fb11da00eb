"""Differential tests: autoseg's components against nnU-Net v2 (nnunetv2 2.8.1) on the same inputs.

nnunetv2 is a reference, never a dependency: `.ci/run` installs it (``--no-deps``, see the
README); without it these tests skip with that reason. Each test feeds both implementations the
same tensors (weights mapped state dict to state dict) and requires the same numbers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("nnunetv2", reason="nnunetv2 (the parity reference) is not installed; see README")
from dynamic_network_architectures.architectures.unet import PlainConvUNet  # noqa: E402
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader  # noqa: E402
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss  # noqa: E402
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper  # noqa: E402
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss  # noqa: E402
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler  # noqa: E402

from autoseg.data.sampling import is_forced_foreground, patch_lower_bounds  # noqa: E402
from autoseg.infer.nnunet_keys import autoseg_key  # noqa: E402
from autoseg.nets.unet import DynamicUNet, deep_supervision_scales  # noqa: E402
from autoseg.planning.plans import Configuration  # noqa: E402
from autoseg.train.config import TrainerConfig  # noqa: E402
from autoseg.train.losses import build_loss  # noqa: E402
from autoseg.train.schedules import poly_lr  # noqa: E402

HIPPOCAMPUS = {  # nnU-Net 2.8.1's plan for MSD Hippocampus (nnUNetPlans.json), both configurations
    3: dict(patch=(40, 56, 40), strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))),
    2: dict(patch=(56, 40), strides=((1, 1), (2, 2), (2, 2), (2, 2))),
}
FEATURES = (32, 64, 128, 256)


def _pair(ndim: int, num_classes: int = 3) -> tuple[DynamicUNet, nn.Module]:
    """autoseg's U-Net and nnU-Net's PlainConvUNet of the same plan, with nnU-Net's weights in both."""
    strides = HIPPOCAMPUS[ndim]["strides"]
    kernels = tuple((3,) * ndim for _ in strides)
    ours = DynamicUNet(ndim, 1, num_classes, FEATURES, strides, kernels, n_conv_per_stage=2)
    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if ndim == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    ref = PlainConvUNet(1, len(FEATURES), list(FEATURES), conv, 3, [list(s) for s in strides], [2] * 4,
                        num_classes, [2] * 3, True, norm, {"eps": 1e-5, "affine": True}, None, None,
                        nn.LeakyReLU, {"inplace": True}, deep_supervision=True)
    ref.apply(ref.initialize)  # nnU-Net's InitWeights_He(1e-2), as its trainer does
    ours.load_state_dict({_our_key(k): v.detach().clone() for k, v in ref.named_parameters()}, strict=True)
    return ours, ref


def _our_key(key: str) -> str:
    """nnU-Net PlainConvUNet parameter name -> autoseg DynamicUNet parameter name (the importer's mapping)."""
    return autoseg_key(key, residual=False)


@pytest.mark.parametrize("ndim", [3, 2])
def test_unet_with_nnunet_weights_gives_nnunet_logits(ndim: int) -> None:
    ours, ref = _pair(ndim)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    x = torch.randn((2, 1) + HIPPOCAMPUS[ndim]["patch"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert len(a) == len(b) == 3
    for out_a, out_b in zip(a, b):
        assert out_a.shape == out_b.shape
        torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-5)


def _nnunet_loss(batch_dice: bool, n_outputs: int) -> nn.Module:
    """nnUNetTrainer._build_loss for a plain (non-region, no ignore label) dataset, single process."""
    weights = np.array([1 / (2 ** i) for i in range(n_outputs)])
    weights[-1] = 0
    return DeepSupervisionWrapper(DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False,
                                                  "ddp": False}, {}, weight_ce=1, weight_dice=1, ignore_label=None,
                                                 dice_class=MemoryEfficientSoftDiceLoss), weights / weights.sum())


@pytest.mark.parametrize("batch_dice", [False, True])
def test_deep_supervised_dice_ce_gives_nnunet_loss_and_gradients(batch_dice: bool) -> None:
    ours, ref = _pair(3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, 1) + HIPPOCAMPUS[3]["patch"], generator=g)
    target = torch.randint(0, 3, (2, 1) + HIPPOCAMPUS[3]["patch"], generator=g)
    target[1][target[1] == 1] = 0  # one sample lacks a class: the per-sample Dice must treat it alike
    targets = [target, target[:, :, ::2, ::2, ::2], target[:, :, ::4, ::4, ::4]]
    loss_a = build_loss("dice_ce", batch_dice, 3)(ours(x), targets)
    loss_b = _nnunet_loss(batch_dice, 3)(ref(x), targets)
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(loss_a, loss_b.float(), rtol=1e-6, atol=1e-6)
    grads = dict(ours.named_parameters())
    compared = 0
    for key, p in ref.named_parameters():
        mine = grads[_our_key(key)].grad
        if p.grad is None:  # the coarsest head has weight 0 in both: no gradient in either
            assert mine is None
            continue
        torch.testing.assert_close(mine, p.grad, rtol=1e-5, atol=1e-7)
        compared += 1
    assert compared == len(grads) - 2


def test_deep_supervision_scales_are_nnunets() -> None:
    cfg = Configuration(name="3d_fullres", data_identifier="3d_fullres", spacing=(1.0, 1.0, 1.0),
                        patch_size=HIPPOCAMPUS[3]["patch"], batch_size=2, median_shape=(36, 50, 35),
                        strides=HIPPOCAMPUS[3]["strides"], kernel_sizes=((3, 3, 3),) * 4, features_per_stage=FEATURES)
    # nnUNetTrainer._get_deep_supervision_scales: 1 / cumprod(pool kernels), all but the coarsest
    theirs = (1 / np.cumprod(np.vstack(HIPPOCAMPUS[3]["strides"]), axis=0))[:-1]
    np.testing.assert_allclose(np.array(deep_supervision_scales(cfg)), theirs)


def test_poly_learning_rate_is_nnunets() -> None:
    cfg = TrainerConfig(epochs=9)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = PolyLRScheduler(opt, cfg.lr, cfg.epochs)
    for epoch in range(cfg.epochs):
        sched.step(epoch)  # nnU-Net steps once per epoch, at its start, with the epoch index
        assert math.isclose(opt.param_groups[0]["lr"], poly_lr(epoch, cfg), rel_tol=1e-12)


@pytest.mark.parametrize("batch_size", range(1, 13))
def test_forced_foreground_samples_are_nnunets(batch_size: int) -> None:
    loader = nnUNetDataLoader.__new__(nnUNetDataLoader)  # only the rule: no dataset needed
    loader.batch_size, loader.oversample_foreground_percent = batch_size, 0.33
    for i in range(batch_size):
        assert is_forced_foreground(i, batch_size, 0.33) == loader._oversample_last_XX_percent(i)


@pytest.mark.parametrize("shape", [(35, 51, 35), (20, 90, 36), (80, 80, 80)])
def test_patch_window_range_is_nnunets(shape: tuple[int, ...]) -> None:
    """Random windows span nnU-Net's get_bbox range exactly; forced ones centre on the voxel like it."""
    patch, final = (73, 80, 64), (40, 56, 40)
    loader = nnUNetDataLoader.__new__(nnUNetDataLoader)
    loader.patch_size, loader.need_to_pad = patch, np.array(patch) - np.array(final)
    loader.has_ignore = False
    rng = np.random.default_rng(0)
    ours = np.array([patch_lower_bounds(rng, shape, patch, final, None) for _ in range(400)])
    np.random.seed(0)
    theirs = np.array([loader.get_bbox(np.array(shape), False, None)[0] for _ in range(400)])
    np.testing.assert_array_equal(ours.min(0), theirs.min(0))
    np.testing.assert_array_equal(ours.max(0), theirs.max(0))
    voxel = np.array([shape[0] // 2, 3, shape[2] - 2])
    got = patch_lower_bounds(rng, shape, patch, final, voxel)
    want = loader.get_bbox(np.array(shape), True, {1: np.concatenate([[0], voxel])[None]})[0]
    assert list(got) == [int(v) for v in want]
