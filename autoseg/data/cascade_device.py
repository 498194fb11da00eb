"""Cascade one-hot degradation as torch ops: `degrade_one_hot`, the device path's `cascade.apply_degradation`.

The 3d_cascade_fullres stage trains on its previous stage's segmentation degraded at random
(`autoseg.data.cascade`); with device augmentation the batch is on the training device, and
this module degrades it there: on the CPU by the numpy `autoseg.data.cascade.apply_degradation`
per degraded sample, elsewhere by the same operations as torch ops (ball convolutions for the
morphology, label propagation for connected components), voxel for voxel the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from autoseg.data.cascade import MAX_REMOVED_COMPONENT_FRACTION, CascadeDegradation, apply_degradation


def degrade_one_hot(one_hot: torch.Tensor, degradations: Sequence[CascadeDegradation]) -> torch.Tensor:
    """Cascade one-hot channels (B, K-1, *patch) degraded per sample; returns a new tensor on the same device.

    The same result as `autoseg.data.cascade.apply_degradation` per sample. On the CPU it runs
    that numpy code (Euclidean distance transforms: linear time whatever the radius); on other
    devices `_degrade_on_device` (ball convolutions and label propagation), so the batch stays
    there. Samples without a degradation (about half, with nnU-Net's probabilities) are skipped.
    """
    if one_hot.shape[0] != len(degradations):
        raise ValueError(f"{one_hot.shape[0]} samples and {len(degradations)} degradations differ")
    out = one_hot.to(torch.float32, copy=True)
    for b, degradation in enumerate(degradations):
        if degradation.is_noop:
            continue
        if out.device.type == "cpu":
            out[b] = torch.from_numpy(apply_degradation(out[b].numpy(), degradation))
        else:
            out[b] = _degrade_on_device(out[b], degradation)
    return out


def _ball_count(mask: torch.Tensor, radius: float) -> torch.Tensor:
    """Per voxel, how many voxels of ``mask`` lie within Euclidean distance ``radius`` (outside the patch: none)."""
    reach = int(math.floor(radius))
    axes = np.meshgrid(*[np.arange(-reach, reach + 1)] * mask.ndim, indexing="ij")
    ball = np.sqrt(sum(a.astype(np.float64) ** 2 for a in axes)) <= radius  # the distance transform's comparison
    kernel = torch.as_tensor(ball, dtype=torch.float32).to(mask.device)[None, None]
    conv = F.conv3d if mask.ndim == 3 else F.conv2d
    return conv(mask.to(torch.float32)[None, None], kernel, padding=reach)[0, 0]


def _binary_operation(mask: torch.Tensor, operation: str, radius: float) -> torch.Tensor:
    """`cascade.binary_operation` as ball convolutions: dilation is "a mask voxel within r", erosion
    "no background voxel within r" (the patch border is not background, as with the distance transform)."""
    def dilate(m: torch.Tensor) -> torch.Tensor:
        return _ball_count(m, radius) > 0.5

    def erode(m: torch.Tensor) -> torch.Tensor:
        return ~(_ball_count(~m, radius) > 0.5)

    steps = {"dilation": (dilate,), "erosion": (erode,), "opening": (erode, dilate), "closing": (dilate, erode)}
    if operation not in steps:
        raise ValueError(f"unknown binary operation {operation!r} (known: {', '.join(steps)})")
    for step in steps[operation]:
        mask = step(mask)
    return mask


def _components(mask: torch.Tensor) -> torch.Tensor:
    """Per voxel of ``mask`` the smallest flat index of its face-connected component (scipy's default
    structure), ``mask.numel()`` elsewhere; ordering components by it is scipy.ndimage.label's order.

    Min-propagation to the face neighbours plus pointer jumping, until nothing changes (one host
    sync per round).
    """
    none = mask.numel()
    flat_index = torch.arange(none, device=mask.device).reshape(mask.shape)
    rep = torch.where(mask, flat_index, none)
    while True:
        low = rep
        for axis in range(mask.ndim):
            padded = F.pad(rep, _axis_pad(mask.ndim, axis), value=none)
            size = mask.shape[axis]
            low = torch.minimum(low, padded.narrow(axis, 0, size))
            low = torch.minimum(low, padded.narrow(axis, 2, size))
        jumped = torch.cat([low.reshape(-1), low.new_full((1,), none)])[low.reshape(-1)].reshape(mask.shape)
        low = torch.where(mask, torch.minimum(low, jumped), none)
        if torch.equal(low, rep):
            return rep
        rep = low


def _axis_pad(ndim: int, axis: int) -> tuple[int, ...]:
    """F.pad widths adding one element before and after ``axis`` of an ndim tensor (F.pad lists the last axis first)."""
    pad = [0] * (2 * ndim)
    pad[2 * (ndim - 1 - axis)] = pad[2 * (ndim - 1 - axis) + 1] = 1
    return tuple(pad)


def _degrade_on_device(one_hot: torch.Tensor, params: CascadeDegradation) -> torch.Tensor:
    """`cascade.apply_degradation` for one sample (K-1, *patch) in torch ops, on the tensor's device."""
    out = one_hot.clone()
    channels = torch.arange(out.shape[0], device=out.device).reshape((-1,) + (1,) * (out.ndim - 1))
    for c, operation, radius in params.morphology:
        mask = out[c] > 0.5
        new = _binary_operation(mask, operation, radius)
        added = new & ~mask  # taken from every other class, so the encoding stays one-hot
        out = torch.where(added[None] & (channels != c), 0.0, out)
        out[c] = new.to(out.dtype)
    for c, u in params.remove_component:
        mask = out[c] > 0.5
        rep = _components(mask)
        starts, sizes = torch.unique(rep[mask], return_counts=True)  # sorted: scipy's label order
        eligible = starts[sizes < MAX_REMOVED_COMPONENT_FRACTION * mask.numel()]
        if eligible.numel():
            chosen = eligible[min(int(u * eligible.numel()), eligible.numel() - 1)]
            out[c] = torch.where(rep == chosen, 0.0, out[c])
    return out
