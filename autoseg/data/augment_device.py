"""Training augmentation as batched torch ops on the training device (CPU or CUDA).

The same augmentation as the CPU path (`autoseg.data.augment_cpu`), in a second implementation:
`augment_batch` applies the per-sample `AugParams` that `sample_params` draws to a whole batch
tensor, so the loader workers only cut the enlarged initial patches and the device does the
rest. The same params give the same output (a seed reproduces a batch), and every transform
agrees with `apply_augmentation` up to the interpolation differences listed below.

Order, as in the CPU path: rotation/scaling (+ crop to the patch), Gaussian noise, Gaussian
blur, multiplicative brightness, contrast, simulated low resolution, inverted gamma, gamma,
mirroring. Only the samples (channels) that a transform selects are touched; each transform
handles all of them at once, except noise (one generator per sample, for its seed) and low
resolution (one resize pair per channel, for its own size).

Differences from the CPU path, all within interpolation error:

- rotation/scaling interpolate images linearly on both paths (nnU-Net 2.8.1's SpatialTransform),
  here through one ``affine_grid`` + ``grid_sample`` (float32 grid) for all moved samples, on
  the CPU path through numpy corner weights (`autoseg.data.interpolate.LinearSampler`), so the
  values agree to interpolation rounding, not bit for bit;
- simulated low resolution uses the CPU path's modes (nearest-exact down, linear back up:
  bilinear in-plane for 2D and dummy 2D, trilinear in 3D), as torch ``interpolate`` calls;
- noise comes from a ``torch.Generator`` seeded with ``noise_seed`` on the device, so it has the
  same distribution as the CPU path's, not the same values;
- labels: background scores 1 minus the other labels (no indicator of its own), so a voxel whose
  interpolation reaches partly outside the initial patch leans to background, where the CPU
  path takes the argmax of the labels inside; exact ties go to the smaller label (the CPU path:
  the nearest neighbour's). Either way a voxel only holds a label of the input, or 0 outside.

Cascade one-hot channels are degraded on the device by `autoseg.data.cascade_device.degrade_one_hot`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from batchgenerators.augmentations.utils import rotate_coords_2d, rotate_coords_3d

from autoseg.data.augment import AugmentSetup, AugParams

BLUR_TRUNCATE = 4.0
"""Gaussian kernels reach 4 sigma, as scipy's gaussian_filter (the CPU path)."""

MAX_UNCHECKED_LABELS = 8
"""Label ranges up to this wide get one indicator per label of the range, present or not;
wider ones (an ignore label far above the classes) one per label present."""

GAMMA_EPS, STD_EPS = 1e-7, 1e-8
"""Guards of the gamma transform's [min, max] normalization and its std restore (the CPU path's `_gamma`)."""


def augment_batch(data: torch.Tensor, seg: torch.Tensor, params: Sequence[AugParams],
                  setup: AugmentSetup) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply each sample's ``params`` to a batch cut at ``setup.initial_patch_size``; returns the final patches.

    data (B, C, *initial) float, seg (B, S, *initial) integer labels (S > 1: every channel is a
    label map, e.g. the cascade's previous stage) -> data (B, C, *patch) float32, seg (B, S,
    *patch) of seg's dtype, on the inputs' device. The inputs are not modified.
    """
    _check_batch(data, seg, params, setup)
    data, seg = _spatial(data, seg, params, setup)
    _noise(data, params)
    _blur(data, params)
    _brightness(data, params)
    _contrast(data, params)
    _lowres(data, params, setup)
    _gamma(data, params, invert=True)
    _gamma(data, params, invert=False)
    return _mirror(data, seg, params)


def _check_batch(data: torch.Tensor, seg: torch.Tensor, params: Sequence[AugParams], setup: AugmentSetup) -> None:
    initial = tuple(setup.initial_patch_size)
    if tuple(data.shape[2:]) != initial or tuple(seg.shape[2:]) != initial:
        raise ValueError(f"data {tuple(data.shape)} and seg {tuple(seg.shape)} must be cut at the initial patch "
                         f"{initial}")
    if data.shape[0] != seg.shape[0] or len(params) != data.shape[0]:
        raise ValueError(f"{data.shape[0]} data, {seg.shape[0]} seg samples and {len(params)} params differ")
    if seg.is_floating_point():
        raise ValueError(f"seg must hold integer labels, got {seg.dtype}")


def _selected(params: Sequence[AugParams], device: torch.device,
              keep: Callable[[AugParams], bool]) -> tuple[list[int], torch.Tensor]:
    """Indices of the samples ``keep(p)`` selects, as a list and as an index tensor on ``device``."""
    chosen = [b for b, p in enumerate(params) if keep(p)]
    return chosen, torch.tensor(chosen, dtype=torch.long, device=device)


def _expand(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """(n, C) per-channel values shaped to broadcast over (n, C, *spatial)."""
    return values.reshape(values.shape + (1,) * (ndim - 2))


# ----------------------------------------------------------------------------------- spatial


def _spatial(data: torch.Tensor, seg: torch.Tensor, params: Sequence[AugParams],
             setup: AugmentSetup) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre crop every sample (exact); resample the rotated/scaled ones from one grid in one call."""
    patch = tuple(setup.patch_size)
    window = (slice(None), slice(None)) + tuple(slice((i - p) // 2, (i - p) // 2 + p)
                                                for i, p in zip(data.shape[2:], patch))
    out_data = data[window].to(torch.float32, copy=True).contiguous()
    out_seg = seg[window].clone(memory_format=torch.contiguous_format)
    moved, index = _selected(params, data.device, lambda p: p.rotation_rad is not None or p.scale is not None)
    if moved:
        moved_data, moved_seg = _resample(data, seg, moved, [params[b] for b in moved], setup)
        out_data[index] = moved_data
        out_seg[index] = moved_seg
    return out_data, out_seg


def _linear_map(p: AugParams, ndim: int) -> np.ndarray:
    """Matrix taking a centred output voxel offset to the centred input offset, as the CPU path's coordinate mesh.

    batchgenerators rotates row vectors (coords @ R); applied to the identity that gives the
    column-vector map, so both paths share the rotation convention by construction.
    """
    matrix = np.eye(ndim)
    if p.rotation_rad is not None:
        matrix = rotate_coords_3d(matrix, *p.rotation_rad) if ndim == 3 else rotate_coords_2d(matrix, p.rotation_rad[0])
    return matrix * (p.scale if p.scale is not None else 1.0)


def _theta(params: Sequence[AugParams], grid_out: tuple[int, ...], grid_in: tuple[int, ...]) -> np.ndarray:
    """(n, ndim, ndim + 1) ``affine_grid`` matrices (align_corners=True: -1/+1 are the end voxel centres).

    Normalized offsets scale by half the extent minus one per axis; grid_sample lists axes last
    first, hence the reversal. Both grids are centred, so there is no translation.
    """
    ndim = len(grid_out)
    half_out = np.array([(s - 1) / 2 for s in grid_out])
    half_in = np.array([(s - 1) / 2 if s > 1 else 1.0 for s in grid_in])
    theta = np.zeros((len(params), ndim, ndim + 1))
    for k, p in enumerate(params):
        normalized = _linear_map(p, ndim) * half_out[None, :] / half_in[:, None]
        theta[k, :, :ndim] = normalized[::-1, ::-1]
    return theta


def _margins(params: Sequence[AugParams], grid_out: tuple[int, ...], grid_in: tuple[int, ...]) -> np.ndarray:
    """(n, ndim) voxels per side of each grid axis of the input that a sample's grid never reads.

    The output patch's corners, mapped into the input, bound what linear interpolation reads
    (+1 voxel, +1 for float error). Indicators and copies are then made for that box only:
    on average about half of the enlarged initial patch.
    """
    half_out = np.array([(s - 1) / 2 for s in grid_out])
    centre = np.array([(s - 1) / 2 for s in grid_in])
    reach = np.stack([np.abs(_linear_map(p, len(grid_out))) @ half_out for p in params])
    return np.maximum(np.floor(centre - reach) - 2, 0).astype(int)


def _foreground_labels(segs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Candidate labels other than 0 for the indicators of ``segs``, sorted.

    A narrow label range (the usual case) is taken whole, read from the range alone: min/max
    are cheap, and a label of the range that is absent only costs an all-zero indicator, which
    never wins the argmax. Wider ranges (an ignore label far above the classes) are reduced to
    the labels present. Reading the range is the one host sync of a batch.
    """
    low, high = torch.stack([torch.stack([x.amin(), x.amax()]) for x in segs]).to(torch.int64).aminmax()
    low, high = (int(v) for v in torch.stack([low, high]).tolist())
    device, dtype = segs[0].device, segs[0].dtype
    if high - low < MAX_UNCHECKED_LABELS:  # made on the host: no second sync
        return torch.tensor([v for v in range(low, high + 1) if v != 0], dtype=dtype, device=device)
    labels = torch.unique(torch.cat([torch.unique(x) for x in segs]))
    return labels[labels != 0].to(dtype)


def _resample(data: torch.Tensor, seg: torch.Tensor, moved: Sequence[int], params: Sequence[AugParams],
              setup: AugmentSetup) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``moved`` resampled: images linear; labels as per-label indicators interpolated linearly, then argmax.

    Data and indicators go through the same ``grid_sample`` call. Background needs no channel
    of its own: its score is 1 minus the other labels' scores, so whatever lies outside the
    initial patch counts as background (all of it outside -> 0; ties also go to 0). Dummy 2D
    folds axis 0 into the channels, so every slice gets the same in-plane transform and slice
    k stays slice k.
    """
    n, c, s = len(moved), data.shape[1], seg.shape[1]
    patch = tuple(setup.patch_size)
    grid_out = patch[1:] if setup.dummy_2d else patch
    if setup.dummy_2d:
        z0 = (data.shape[2] - patch[0]) // 2
        data, seg = data[:, :, z0:z0 + patch[0]], seg[:, :, z0:z0 + patch[0]]
    grid_in = tuple(data.shape[-len(grid_out):])
    lead = tuple(data.shape[2:-len(grid_out)])  # dummy 2D: axis 0, not transformed
    margins = _margins(params, grid_out, grid_in)
    common = margins.min(axis=0)
    box = tuple(int(i - 2 * m) for i, m in zip(grid_in, common))

    def own(k: int, size: tuple[int, ...], margin: np.ndarray) -> tuple[slice, ...]:
        return (slice(None),) * (1 + len(lead)) + tuple(slice(int(m), int(i - m)) for i, m in zip(size, margin))

    sources = [(b, own(k, grid_in, margins[k]), own(k, box, margins[k] - common)) for k, b in enumerate(moved)]
    labels = _foreground_labels([seg[b][src] for b, src, _ in sources])
    pairs = [(channel, labels[j]) for channel in range(s) for j in range(labels.numel())]
    # filled sample by sample, each in the box its grid reads; the rest of the common box is never read
    # by that sample's grid, zeroed all the same (cheaper than a whole-tensor fill, which costs as much
    # as the filling itself)
    stacked = torch.empty((n, c + len(pairs)) + lead + box, dtype=torch.float32, device=data.device)
    for k, (b, src, dst) in enumerate(sources):
        for axis, (size, band) in enumerate(zip(box, margins[k] - common)):
            if band > 0:
                slabs = stacked[k].movedim(stacked.ndim - 1 - len(box) + axis, 0)
                slabs[:band] = 0.0
                slabs[size - band:] = 0.0
        stacked[k, :c][dst] = data[b][src]
        for j, (channel, label) in enumerate(pairs):
            # bool viewed as uint8: that conversion to float is vectorized, bool's is not
            stacked[k, c + j][dst[1:]] = (seg[b, channel][src[1:]] == label).view(torch.uint8)
    if setup.dummy_2d:
        stacked = stacked.flatten(1, 2)
    theta = torch.as_tensor(_theta(params, grid_out, box), dtype=torch.float32).to(data.device)
    grid = F.affine_grid(theta, list(stacked.shape[:2] + grid_out), align_corners=True)
    out = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    out = out.reshape((n, -1) + patch)
    if not labels.numel():
        return out, torch.zeros((n, s) + patch, dtype=seg.dtype, device=seg.device)
    scores = out[:, c:].reshape((n, s, labels.numel()) + patch)
    return out[:, :c], _label_argmax(scores, labels, seg.dtype)


def _label_argmax(scores: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Label maps (n, S, *patch) from per-label scores (n, S, L, *patch); background scores 1 minus the others.

    An argmax over a handful of labels as elementwise ops (a reduction over that short middle axis
    is slow on the CPU), writing label values directly; strict '>' keeps ties with the smaller label.
    """
    best = scores[:, :, 0]
    total = best.clone()
    winner = labels[0].expand(best.shape)
    for j in range(1, labels.numel()):
        score = scores[:, :, j]
        better = score > best
        winner = torch.where(better, labels[j], winner)
        best = torch.maximum(best, score)
        total += score
    zero = torch.zeros((), dtype=dtype, device=scores.device)
    return torch.where(best > 1.0 - total, winner, zero)  # background: 1 minus the other labels


# ----------------------------------------------------------------------------------- intensity


def _noise(data: torch.Tensor, params: Sequence[AugParams]) -> None:
    """Additive Gaussian noise from a generator seeded with the sample's ``noise_seed`` on the device."""
    for b, p in enumerate(params):
        if p.noise_std is not None:
            generator = torch.Generator(device=data.device)
            generator.manual_seed(p.noise_seed)
            data[b] += torch.randn(data.shape[1:], generator=generator, device=data.device) * p.noise_std


def _reflect_index(n: int, radius: int) -> np.ndarray:
    """Indices extending an axis of length n by ``radius`` each side, mirrored about the edge (scipy's 'reflect')."""
    index = np.arange(-radius, n + radius) % (2 * n)
    return np.where(index >= n, 2 * n - 1 - index, index)


def _blur(data: torch.Tensor, params: Sequence[AugParams]) -> None:
    """Gaussian blur of each selected (sample, channel) with its own sigma: a separable 1D convolution per axis.

    All selected channels at once: kernels of smaller sigmas are zero-padded to the largest
    radius (the same filter), and each axis is convolved as 2r+1 shifted multiply-adds of the
    reflect-padded volume (3x faster than a grouped conv1d on the CPU, and no transposes).
    """
    pairs = [(b, c, sigma) for b, p in enumerate(params) for c, sigma in enumerate(p.blur_sigma) if sigma is not None]
    if not pairs:
        return
    radius = max(int(BLUR_TRUNCATE * sigma + 0.5) for _, _, sigma in pairs)
    offsets = np.arange(-radius, radius + 1)
    kernels = np.zeros((len(pairs), offsets.size))
    for k, (_, _, sigma) in enumerate(pairs):
        own = np.abs(offsets) <= int(BLUR_TRUNCATE * sigma + 0.5)
        kernels[k] = np.where(own, np.exp(-0.5 * offsets**2 / sigma**2), 0.0)
    kernels /= kernels.sum(axis=1, keepdims=True)
    device = data.device
    bs = torch.tensor([b for b, _, _ in pairs], dtype=torch.long, device=device)
    cs = torch.tensor([c for _, c, _ in pairs], dtype=torch.long, device=device)
    x = data[bs, cs]  # (N, *spatial)
    weights = torch.as_tensor(kernels, dtype=torch.float32).to(device).reshape((len(pairs), -1) + (1,) * (x.ndim - 1))
    for axis in range(1, x.ndim):
        length = x.shape[axis]
        padded = x.index_select(axis, torch.as_tensor(_reflect_index(length, radius)).to(device))
        out = padded.narrow(axis, 0, length) * weights[:, 0]
        for tap in range(1, offsets.size):
            out.addcmul_(padded.narrow(axis, tap, length), weights[:, tap])
        x = out
    data[bs, cs] = x


def _per_channel(data: torch.Tensor, params: Sequence[AugParams], field: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples whose ``field`` is set, and their per-channel values (n, C) on the device."""
    chosen, index = _selected(params, data.device, lambda p: getattr(p, field) is not None)
    values = torch.tensor([getattr(params[b], field) for b in chosen], dtype=torch.float32)
    return index, values.to(data.device)


def _brightness(data: torch.Tensor, params: Sequence[AugParams]) -> None:
    index, factors = _per_channel(data, params, "brightness")
    if index.numel():
        data[index] = data[index] * _expand(factors, data.ndim)


def _contrast(data: torch.Tensor, params: Sequence[AugParams]) -> None:
    """Scale around each channel's mean, clipped to the channel's range before the change (as the CPU path)."""
    index, factors = _per_channel(data, params, "contrast")
    if not index.numel():
        return
    x = data[index]
    flat = x.flatten(2)
    low, high = _expand(flat.amin(dim=2), x.ndim), _expand(flat.amax(dim=2), x.ndim)
    mean = _expand(flat.mean(dim=2), x.ndim)
    data[index] = torch.clamp((x - mean) * _expand(factors, x.ndim) + mean, low, high)


def _lowres(data: torch.Tensor, params: Sequence[AugParams], setup: AugmentSetup) -> None:
    """Down by the zoom and back up with the CPU path's modes (`LOWRES_MODE_DOWN`/`UP`: nearest-exact, then
    bilinear in-plane or trilinear); ignored axes keep their size."""
    shape = np.array(data.shape[2:])
    in_plane = len(shape) == 2 or 0 in setup.lowres_ignore_axes
    for b, p in enumerate(params):
        for c, zoom in enumerate(p.lowres_zoom):
            if zoom is None:
                continue
            target = np.maximum(np.round(shape * zoom).astype(int), 1)
            for a in setup.lowres_ignore_axes:
                target[a] = shape[a]
            x = data[b, c]
            if in_plane:  # 2D, or dummy 2D: each slice along axis 0 on its own
                x = x.reshape((-1, 1) + tuple(shape[-2:]))
                small = F.interpolate(x, size=tuple(int(t) for t in target[-2:]), mode="nearest-exact")
                x = F.interpolate(small, size=tuple(int(s) for s in shape[-2:]), mode="bilinear", align_corners=False)
            else:
                small = F.interpolate(x[None, None], size=tuple(int(t) for t in target), mode="nearest-exact")
                x = F.interpolate(small, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=False)
            data[b, c] = x.reshape(data.shape[2:])


def _mean_std(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean and population std of (n, C, N), two passes (torch.std_mean is ~10x slower on the CPU)."""
    mean = flat.mean(dim=2, keepdim=True)
    return mean, (flat - mean).square_().mean(dim=2, keepdim=True).sqrt_()


def _gamma(data: torch.Tensor, params: Sequence[AugParams], invert: bool) -> None:
    """Gamma on the [min, max]-normalized channel, then its mean and std restored (the CPU path's `_gamma`)."""
    index, gammas = _per_channel(data, params, "gamma_inverted" if invert else "gamma")
    if not index.numel():
        return
    x = data[index]
    flat = -x.flatten(2) if invert else x.flatten(2)
    mean, std = _mean_std(flat)
    low, high = flat.amin(dim=2, keepdim=True), flat.amax(dim=2, keepdim=True)
    span = high - low + GAMMA_EPS
    # x ** g as exp(g log x): vectorized on the CPU (pow is not, 3x slower); log 0 = -inf gives 0 as pow does
    flat = torch.exp(torch.log((flat - low) / span) * gammas.unsqueeze(-1)) * span + low
    new_mean, new_std = _mean_std(flat)
    flat = (flat - new_mean) / (new_std + STD_EPS) * std + mean
    data[index] = (-flat if invert else flat).reshape(x.shape)


# ----------------------------------------------------------------------------------- mirroring


def _mirror(data: torch.Tensor, seg: torch.Tensor,
            params: Sequence[AugParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip the mirrored axes of each sample (one flip per sample: cheaper than gathering per axis)."""
    for b, p in enumerate(params):
        if p.mirror_axes:
            axes = tuple(a + 1 for a in p.mirror_axes)
            data[b] = data[b].flip(axes)
            seg[b] = seg[b].flip(axes)
    return data, seg


# ----------------------------------------------------------------------------------- targets


def deep_supervision_targets(seg: torch.Tensor, scales: Sequence[Sequence[float]]) -> list[torch.Tensor]:
    """Nearest-neighbour copies of a (B, 1, *patch) target at each deep-supervision scale, on its device.

    The same voxels as `autoseg.data.augment_cpu.downsample_seg_for_ds` (the index rule is computed
    in float64 as there), so labels, the ignore label included, stay labels at every scale.
    """
    out = []
    for scale in scales:
        if all(s == 1.0 for s in scale):
            out.append(seg)
            continue
        target = seg
        for axis, (n, s) in enumerate(zip(seg.shape[2:], scale)):
            m = max(1, int(round(n * s)))
            centres = (torch.arange(m, dtype=torch.float64, device=seg.device) + 0.5) * (n / m)
            target = target.index_select(axis + 2, centres.to(torch.long).clamp(max=n - 1))
        out.append(target)
    return out
