"""Linear resampling for the CPU augmentation path, in plain numpy: images, labels, low resolution.

nnU-Net 2.8.1 resamples rotated/scaled patches with torch ``grid_sample`` (bilinear/trilinear,
zeros padding for images; per-label linear scores + argmax for labels, padded with the label
-1) and simulates low resolution with ``interpolate`` (``nearest-exact`` down, linear back up).
We do the same arithmetic in numpy, and faster than calling scipy once per channel and label:
a `LinearSampler` computes the 2^ndim corner indices and weights of every output point once,
and each image channel and each label is then a gather and a weighted sum over those corners.

Sample points are in input voxel coordinates (voxel ``i`` has its centre at ``i``); a corner
outside the input counts as 0 for images and as the padding label for labels, so the input
ends half a voxel past its outermost voxel centres, as ``grid_sample(align_corners=False)``
with padding does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEAREST_TIE_MARGIN = 1e-4
"""Label scores closer than this count as tied and go to the nearest voxel's label (nnU-Net 2.8.1's
SpatialTransform default ``seg_tiebreak='nearest'``, whose float16 scores collapse near ties the same way);
symmetric in the label values, where a plain argmax would always favour the lowest."""


@dataclass(frozen=True)
class LinearSampler:
    """Corners and weights of linear interpolation at fixed points of an input grid.

    ``flat[k]`` (N,) are corner ``k``'s flat indices into the trailing ``in_shape`` axes (clipped
    into range) and ``weight[k]`` its weights; ``inside[k]`` says where corner ``k`` lies inside the
    input (None: everywhere, the usual patch). ``nearest`` (N,) is the corner with the largest
    weight. Output points are laid out as ``out_shape``.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    flat: tuple[np.ndarray, ...]
    weight: tuple[np.ndarray, ...]
    inside: tuple[np.ndarray, ...] | None
    nearest: np.ndarray

    @classmethod
    def at(cls, coords: np.ndarray, in_shape: tuple[int, ...]) -> "LinearSampler":
        """Sampler for points ``coords`` (ndim, *out_shape) in voxel coordinates of ``in_shape``."""
        ndim = len(in_shape)
        if coords.shape[0] != ndim:
            raise ValueError(f"coords have {coords.shape[0]} axes, the input {ndim}")
        out_shape = tuple(coords.shape[1:])
        points = coords.reshape(ndim, -1)
        strides = [int(v) for v in np.cumprod((1,) + tuple(in_shape[:0:-1]))[::-1]]
        lows = [np.floor(points[d]) for d in range(ndim)]
        fracs = [(points[d] - lows[d]).astype(np.float32) for d in range(ndim)]
        i0 = [lo.astype(np.int64) for lo in lows]
        # corner k's bit (ndim - 1 - d) says "upper neighbour along axis d"
        weight = [np.ones(points.shape[1], np.float32)]
        for d in range(ndim):
            weight = [w * f for w in weight for f in (1.0 - fracs[d], fracs[d])]
        nearest = np.zeros(points.shape[1], np.int64)
        for d in range(ndim):
            nearest = nearest * 2 + (fracs[d] > 0.5)
        if all(int(i.min()) >= 0 and int(i.max()) < n - 1 for i, n in zip(i0, in_shape)):
            # every corner inside (the usual patch): one base index plus a constant offset per corner
            base = sum(i * st for i, st in zip(i0, strides))
            offsets = [0]
            for d in range(ndim):
                offsets = [o + b * strides[d] for o in offsets for b in (0, 1)]
            return cls(tuple(in_shape), out_shape, tuple(base + o for o in offsets), tuple(weight), None, nearest)
        per_axis = []
        for d, n in enumerate(in_shape):
            per_axis.append(((np.clip(i0[d], 0, n - 1) * strides[d], (i0[d] >= 0) & (i0[d] < n)),
                             (np.clip(i0[d] + 1, 0, n - 1) * strides[d], (i0[d] >= -1) & (i0[d] < n - 1))))
        flat, inside = [np.zeros(points.shape[1], np.int64)], [np.ones(points.shape[1], bool)]
        for d in range(ndim):
            flat = [f + per_axis[d][b][0] for f in flat for b in (0, 1)]
            inside = [i & per_axis[d][b][1] for i in inside for b in (0, 1)]
        return cls(tuple(in_shape), out_shape, tuple(flat), tuple(weight), tuple(inside), nearest)

    def _rows(self, x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
        """``x`` (..., *in_shape) flattened to (L, prod(in_shape)), and the leading shape."""
        lead = x.shape[: x.ndim - len(self.in_shape)]
        if tuple(x.shape[len(lead):]) != self.in_shape:
            raise ValueError(f"expected trailing shape {self.in_shape}, got {x.shape}")
        return np.ascontiguousarray(x).reshape(-1, int(np.prod(self.in_shape))), lead

    def images(self, x: np.ndarray) -> np.ndarray:
        """Linear interpolation of float images (..., *in_shape) -> float32 (..., *out_shape); outside is 0."""
        rows, lead = self._rows(np.asarray(x, dtype=np.float32))
        weight = self.weight if self.inside is None else [w * i for w, i in zip(self.weight, self.inside)]
        out = np.zeros((rows.shape[0], self.flat[0].size), np.float32)
        for f, w in zip(self.flat, weight):
            out += rows[:, f] * w
        return out.reshape(lead + self.out_shape)

    def labels(self, x: np.ndarray, pad_label: int) -> np.ndarray:
        """Label maps (..., *in_shape) -> (..., *out_shape): per label the linearly interpolated
        indicator, then the label with the highest score (near ties: the nearest voxel's label).
        Outside the input counts as ``pad_label``; no other label can appear that was not in ``x``."""
        rows, lead = self._rows(x)
        out = np.empty((rows.shape[0], self.flat[0].size), x.dtype)
        for r, row in enumerate(rows):
            corners = [row[f] for f in self.flat]
            if self.inside is not None:
                corners = [np.where(i, c, pad_label).astype(x.dtype) for c, i in zip(corners, self.inside)]
            out[r] = corners[0]
            # only points whose corners disagree need scores: a thin shell around each boundary
            mixed = np.zeros(out.shape[1], bool)
            for c in corners[1:]:
                mixed |= c != corners[0]
            idx = np.flatnonzero(mixed)
            if idx.size:
                out[r, idx] = _argmax_label([c[idx] for c in corners], [w[idx] for w in self.weight],
                                            self.nearest[idx])
        return out.reshape(lead + self.out_shape)


def _argmax_label(corners: list[np.ndarray], weights: list[np.ndarray], nearest: np.ndarray) -> np.ndarray:
    """Per point, the corner label with the largest summed weight; near ties go to the nearest corner's label."""
    nearest_label = np.choose(nearest, corners)
    best = np.full(nearest.shape, -1.0, np.float32)
    winner = np.empty(nearest.shape, corners[0].dtype)
    for u in _present_labels(np.concatenate(corners)):
        score = np.where(nearest_label == u, np.float32(NEAREST_TIE_MARGIN), np.float32(0.0))
        for c, w in zip(corners, weights):
            score += w * (c == u)
        better = score > best
        best[better] = score[better]
        winner[better] = u
    return winner


def _present_labels(values: np.ndarray) -> np.ndarray:
    """The distinct label values; one counting pass for one-byte labels instead of a sort."""
    if values.dtype.itemsize == 1:
        return np.flatnonzero(np.bincount(values.view(np.uint8), minlength=256)).astype(np.uint8).view(values.dtype)
    return np.unique(values)


def _nearest_exact_index(n_in: int, n_out: int) -> np.ndarray:
    """torch ``interpolate(mode='nearest-exact')``: output ``i`` reads input ``floor((i + 0.5) * n_in / n_out)``."""
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


def _linear_along(x: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """torch ``interpolate`` linear along one axis, ``align_corners=False`` (source clamped at 0 and n-1)."""
    n_in = x.shape[axis]
    if n_in == n_out:
        return x
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    shape = [1] * x.ndim
    shape[axis] = n_out
    w = (src - i0).astype(np.float32).reshape(shape)
    return np.take(x, i0, axis=axis) * (1 - w) + np.take(x, i1, axis=axis) * w


def simulate_low_resolution(x: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
    """Downsample a float image to ``target`` (nearest-exact) and back up (linear), as nnU-Net 2.8.1's
    SimulateLowResolutionTransform does with torch ``interpolate``; separable, so one axis at a time."""
    small = x[np.ix_(*[_nearest_exact_index(n, t) for n, t in zip(x.shape, target)])].astype(np.float32)
    for axis, n in enumerate(x.shape):
        small = _linear_along(small, axis, n)
    return small
