"""Sliding-window inference: tiling, Gaussian blending and mirroring test-time augmentation.

Follows nnU-Net's rules so that predictions are comparable: windows of the training patch
size overlap by ``1 - step`` (default half a patch), evenly spread so that the first and
last window touch the image borders; each window's logits are weighted by a Gaussian
(nnU-Net's: peak at voxel patch // 2, sigma = patch / 8) so window centres, where the network
saw the most context, dominate;
images smaller than the patch are zero-padded (zero is the normalized mean intensity) and
cropped back. Axis order is the preprocessed (transposed) order, channels first.

``nnunet_fp16=True`` instead repeats nnUNetPredictor's float16 arithmetic operation for operation
(`_accumulate_nnunet_fp16`), for users who must reproduce nnUNetv2_predict's masks; the default
float32 accumulation is the more exact one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from autoseg.common.errors import AutosegError
from autoseg.common.progress import progress

DEFAULT_STEP = 0.5
"""Window step as a fraction of the patch size (nnU-Net's tile_step_size default)."""

GAUSSIAN_SIGMA_SCALE = 1.0 / 8
"""Gaussian sigma per axis as a fraction of the patch size (nnU-Net)."""

GAUSSIAN_TRUNCATE_SIGMAS = 4.0
"""The Gaussian is cut beyond this many sigmas (scipy's gaussian_filter default, which nnU-Net's map
uses); with sigma = patch / 8 the cut lies outside the patch, so it only matters for narrower sigmas."""

DEFAULT_BATCH_SIZE = 2
"""Windows per forward pass; small keeps CPU memory low, the GPU path raises it."""

NNUNET_GAUSSIAN_SCALE = 10.0
"""nnU-Net multiplies its window weights by this before casting them to float16 (its
``value_scaling_factor``), which keeps most of them out of float16's subnormals."""


def window_starts(size: int, patch: int, step: float = DEFAULT_STEP) -> list[int]:
    """Start offsets along one axis: ceil((size - patch) / (patch * step)) + 1 windows, evenly spread."""
    if size < patch:
        raise ValueError(f"image size {size} is smaller than the patch {patch}; pad it first")
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    n = math.ceil((size - patch) / (patch * step)) + 1
    if n == 1:
        return [0]
    spacing = (size - patch) / (n - 1)
    return [int(round(spacing * i)) for i in range(n)]


def compute_tiles(image_shape: Sequence[int], patch_size: Sequence[int],
                  step: float = DEFAULT_STEP) -> list[tuple[slice, ...]]:
    """Every window (as slices over the spatial axes) of an image at least as large as the patch."""
    if len(image_shape) != len(patch_size):
        raise ValueError(f"image {tuple(image_shape)} and patch {tuple(patch_size)} differ in dimension")
    per_axis = [window_starts(int(s), int(p), step) for s, p in zip(image_shape, patch_size)]
    return [tuple(slice(st, st + int(p)) for st, p in zip(starts, patch_size))
            for starts in itertools.product(*per_axis)]


def pad_to_patch(data: torch.Tensor, patch_size: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad the spatial axes of (C, *spatial) up to the patch size, centred.

    Returns the padded tensor and the slices (over spatial axes) that recover the original.
    """
    spatial = data.shape[1:]
    if len(spatial) != len(patch_size):
        raise ValueError(f"data spatial shape {tuple(spatial)} and patch {tuple(patch_size)} differ in dimension")
    before = [max(0, p - s) // 2 for s, p in zip(spatial, patch_size)]
    after = [max(0, p - s) - b for s, p, b in zip(spatial, patch_size, before)]
    keep = tuple(slice(b, b + s) for b, s in zip(before, spatial))
    if not any(before) and not any(after):
        return data, keep
    pad: list[int] = []
    for b, a in zip(reversed(before), reversed(after)):  # F.pad wants the last axis first
        pad += [b, a]
    return torch.nn.functional.pad(data, pad, mode="constant", value=0.0), keep


def unpad(data: torch.Tensor, keep: tuple[slice, ...]) -> torch.Tensor:
    """Undo `pad_to_patch` on a (K, *spatial) tensor."""
    return data[(slice(None), *keep)]


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = GAUSSIAN_SIGMA_SCALE,
                            dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                            value_scale: float = 1.0) -> torch.Tensor:
    """nnU-Net's window weights: a separable Gaussian peaked at voxel ``p // 2`` of each axis, max ``value_scale``.

    sigma = ``p * sigma_scale`` per axis, cut beyond `GAUSSIAN_TRUNCATE_SIGMAS`. Weights that are
    zero in ``dtype`` (the cut, or underflow at the patch corners in low precision) become the
    smallest non-zero weight, as in nnU-Net, so every voxel of a window counts and no voxel's
    total weight is zero.
    """
    axes = []
    for p in patch_size:
        sigma = p * sigma_scale
        x = np.arange(p, dtype=np.float64) - p // 2
        w = np.exp(-0.5 * (x / sigma) ** 2) if sigma > 0 else (x == 0).astype(np.float64)
        w[np.abs(x) > int(GAUSSIAN_TRUNCATE_SIGMAS * sigma + 0.5)] = 0.0
        axes.append(w)
    g = axes[0]
    for a in axes[1:]:
        g = np.multiply.outer(g, a)
    out = torch.from_numpy(g / g.max() * value_scale).to(device=device, dtype=dtype)
    zero = out == 0
    if bool(zero.any()):
        out[zero] = out[~zero].min()
    return out


def mirror_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the mirror axes (the identity first): 2**len(axes) TTA passes."""
    axes = tuple(sorted(set(int(a) for a in mirror_axes)))
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def _forward(net: nn.Module, x: torch.Tensor, mirror_axes: Sequence[int], amp: bool) -> torch.Tensor:
    """Logits of a (B, C, *patch) batch, averaged over the mirrored copies (float32)."""
    combos = mirror_combinations(mirror_axes)
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
        for combo in combos:
            dims = [a + 2 for a in combo]
            yi = net(torch.flip(x, dims) if dims else x)
            if isinstance(yi, (list, tuple)):  # deep supervision left on: full resolution first
                yi = yi[0]
            yi = yi.float()
            total = total + (torch.flip(yi, dims) if dims else yi)
    return total / len(combos)


def _forward_nnunet(net: nn.Module, x: torch.Tensor, mirror_axes: Sequence[int], amp: bool) -> torch.Tensor:
    """nnU-Net's mirroring: the identity's logits, the flipped passes added in place, divided once,
    all in the network's output dtype (float16 under CUDA autocast, which is float16 there too)."""
    combos = mirror_combinations(mirror_axes)
    with torch.autocast(device_type=x.device.type, dtype=torch.float16, enabled=amp):
        total = None
        for combo in combos:
            dims = [a + 2 for a in combo]
            yi = net(torch.flip(x, dims) if dims else x)
            if isinstance(yi, (list, tuple)):
                yi = yi[0]
            if total is None:
                total = yi
            else:
                total += torch.flip(yi, dims)
        if len(combos) > 1:
            total /= len(combos)
    return total


def _accumulate_nnunet_fp16(net: nn.Module, padded: torch.Tensor, tiles: Sequence[tuple[slice, ...]],
                            patch_size: Sequence[int], num_classes: int, mirror_axes: Sequence[int],
                            device: torch.device, acc_device: torch.device, amp: bool,
                            show_progress: bool) -> torch.Tensor:
    """Stock nnUNetPredictor's blending, operation for operation: float16 weights (the Gaussian
    times `NNUNET_GAUSSIAN_SCALE`, zeros raised to its smallest value), float16 logit and weight
    sums updated in place one window at a time, and a float16 division. Returns float16 logits.

    The same torch operations on the same dtypes in the same order give the same bits, which
    is the point: float16's rounding (and its subnormal weights at the patch corners) is what
    makes nnU-Net's masks differ from the float32 ones on a few near-tied voxels.
    """
    gauss = gaussian_importance_map(patch_size, dtype=torch.float16, device=acc_device,
                                    value_scale=NNUNET_GAUSSIAN_SCALE)
    spatial = tuple(padded.shape[1:])
    logits = torch.zeros((num_classes, *spatial), dtype=torch.float16, device=acc_device)
    weights = torch.zeros(spatial, dtype=torch.float16, device=acc_device)
    for t in progress(tiles, desc="windows", enabled=show_progress, unit="window"):
        x = padded[(slice(None), *t)][None].contiguous().to(device)
        y = _forward_nnunet(net, x, mirror_axes, amp)[0].to(acc_device)
        if y.shape[0] != num_classes:
            raise ValueError(f"network returned {y.shape[0]} channels, expected {num_classes}")
        y *= gauss
        logits[(slice(None), *t)] += y
        weights[t] += gauss
    torch.div(logits, weights, out=logits)
    if bool(torch.isinf(logits).any()):
        raise AutosegError("the float16 logits of --nnunet-fp16 overflowed (as nnUNetv2_predict's would); "
                           "predict without --nnunet-fp16")
    return logits


@torch.inference_mode()
def predict_sliding_window(net: nn.Module, data: torch.Tensor, patch_size: Sequence[int], num_classes: int,
                           step: float = DEFAULT_STEP, mirror_axes: Sequence[int] = (),
                           batch_size: int = DEFAULT_BATCH_SIZE, device: torch.device | str = "cpu",
                           amp: bool | None = None, show_progress: bool = False,
                           results_device: torch.device | str | None = None,
                           nnunet_fp16: bool = False) -> torch.Tensor:
    """Logits (K, *spatial) for a (C, *spatial) image, on ``results_device`` (float32).

    Windows are batched and run on ``device``; Gaussian-weighted logits are summed into an
    accumulator on ``results_device`` (default: ``device``; float16 on CUDA, where it halves
    memory and logits stay far inside its range; float32 elsewhere) and divided by the summed
    weights. Pass ``results_device="cpu"`` for volumes too large for GPU memory.
    ``mirror_axes`` are spatial axis indices (0 = first spatial axis); every combination is
    predicted and averaged. ``amp`` (default: on for CUDA) runs the network under bf16 autocast.
    ``nnunet_fp16`` reproduces stock nnU-Net's float16 blending instead (`_accumulate_nnunet_fp16`:
    one window per pass, ``batch_size`` ignored, fp16 autocast for ``amp``) and returns float16.
    """
    device = torch.device(device)
    acc_device = device if results_device is None else torch.device(results_device)
    if data.ndim != len(patch_size) + 1:
        raise ValueError(f"data must be (C, *spatial) with {len(patch_size)} spatial axes, got {tuple(data.shape)}")
    amp = device.type == "cuda" if amp is None else amp
    acc_dtype = torch.float16 if acc_device.type == "cuda" else torch.float32
    padded, keep = pad_to_patch(data.float(), patch_size)
    spatial = tuple(padded.shape[1:])
    tiles = compute_tiles(spatial, patch_size, step)
    if nnunet_fp16:
        out16 = _accumulate_nnunet_fp16(net, padded.to(acc_device), tiles, patch_size, num_classes, mirror_axes,
                                        device, acc_device, amp, show_progress)
        return unpad(out16, keep)
    gauss = gaussian_importance_map(patch_size, dtype=torch.float32, device=acc_device)
    logits = torch.zeros((num_classes, *spatial), dtype=acc_dtype, device=acc_device)
    weights = torch.zeros(spatial, dtype=torch.float32, device=acc_device)
    padded = padded.to(acc_device)
    batches = [tiles[i:i + batch_size] for i in range(0, len(tiles), batch_size)]
    for batch in progress(batches, desc="windows", enabled=show_progress, unit="batch"):
        x = torch.stack([padded[(slice(None), *t)] for t in batch]).to(device, non_blocking=True)
        y = _forward(net, x, mirror_axes, amp).to(acc_device)
        if y.shape[1] != num_classes:
            raise ValueError(f"network returned {y.shape[1]} channels, expected {num_classes}")
        for t, yi in zip(batch, y):
            logits[(slice(None), *t)] += (yi * gauss).to(acc_dtype)
            weights[t] += gauss
    out = logits.float() / weights
    return unpad(out, keep)
