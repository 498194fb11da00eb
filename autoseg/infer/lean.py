"""Prediction whose memory is bounded by the patch and a slab, not by classes x voxels.

The whole-volume path (`autoseg.infer.model.model_logits` + `revert_preprocessing`)
holds the fold-mean logits of every class at network resolution, then the logits resampled to
the original grid, then their softmax: three K x voxels float32 arrays (6 GiB each
for 15 classes on 400 x 512 x 512). Here the windows run in order of their start on the first
(transposed) axis; a row of that axis is final once no later window touches it, so the
accumulator holds one patch depth of rows per fold. Final rows are divided by their weights,
averaged over the folds (logits, as the whole-volume path and nnU-Net), and handed to
`SlabResampler`, which resamples them to the cropped original grid in slabs of output rows
(linear per axis, nearest along the separate anisotropic axis, exactly the rule of
`autoseg.preprocess.resample_data` at order 1; resampling is separable, so a slab needs only its
one- or two-row input halo), takes their softmax (or sigmoid) and writes the label map (uint8). Only the label map and the preprocessed input
grow with the volume.

`plan_lean` estimates the peak of these buffers (`LeanBudget`) and picks the largest output
slab that fits ``--memory-limit``; float16 accumulators are used only when float32 ones do
not fit. A limit that cannot be met raises one `AutosegError` before any window runs.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from autoseg.common.errors import AutosegError
from autoseg.infer.model import LoadedModel, PredictOptions, activate
from autoseg.infer.sliding_window import _forward, compute_tiles, gaussian_importance_map, pad_to_patch
from autoseg.infer.sliding_window import predict_sliding_window

log = logging.getLogger(__name__)

DEFAULT_SLAB_ROWS = 16
"""Output rows (first transposed axis of the original grid) resampled at once without a limit."""

RUNTIME_OVERHEAD_BYTES = 600 * 2**20
"""Python, torch and its kernels resident before any case (measured: ~550 MiB RSS after import)."""

ACTIVATION_FACTOR = 6
"""Live activation copies per stage in one forward pass (two convs, norm, nonlinearity, skip)."""

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_MEMORY_RE = re.compile(r"^\s*(?P<num>\d+(\.\d+)?)\s*(?P<unit>[a-zA-Z]*)\s*$")


def parse_memory(text: str | int | None) -> int | None:
    """Bytes of ``8GB`` (10**9), ``500MiB`` (2**20), ``2g`` or a plain number of bytes; None stays None."""
    if text is None or isinstance(text, int):
        return text
    m = _MEMORY_RE.match(str(text))
    unit = m.group("unit").lower() if m else ""
    if not m or unit not in _UNITS:
        raise AutosegError(f"cannot read memory size {text!r} (write e.g. 8GB, 8GiB, 500MB)", "--memory-limit")
    value = int(float(m.group("num")) * _UNITS[unit])
    if value <= 0:
        raise AutosegError(f"memory limit must be positive, got {text!r}", "--memory-limit")
    return value


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# --------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class LeanBudget:
    """The estimated peak of one case's lean prediction, by buffer (bytes)."""

    slab_rows: int
    accumulator_dtype: torch.dtype
    buffers: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.buffers.values())

    def describe(self) -> str:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.buffers.items() if v)
        return f"{format_bytes(self.total)} ({parts})"


def _network_bytes(model: LoadedModel, batch: int) -> int:
    cfg = model.config
    voxels = math.prod(cfg.patch_size)
    total = 0
    for s, feats in enumerate(cfg.features_per_stage):
        total += feats * voxels
        voxels = max(1, voxels // (2 ** cfg.ndim))
    weights = sum(p.numel() * p.element_size() for net in model.nets for p in net.parameters())
    return ACTIVATION_FACTOR * batch * total * 4 + weights


def estimate_lean(model: LoadedModel, data_shape: Sequence[int], props, slab_rows: int,
                  accumulator_dtype: torch.dtype, options: PredictOptions) -> LeanBudget:
    """Peak bytes of `predict_labels_lean` for preprocessed data (C, *spatial) with ``slab_rows`` output rows."""
    K, folds = model.num_classes, len(model.nets)
    spatial = tuple(int(s) for s in data_shape[1:])
    patch = tuple(int(p) for p in model.config.patch_size)
    crop_t = _crop_shape_t(props, model)
    acc_bytes = torch.finfo(accumulator_dtype).bits // 8
    if model.config.ndim == 3:
        padded = [max(s, p) for s, p in zip(spatial, patch)]
        rows, plane = patch[0], padded[1] * padded[2]
    else:
        padded = [max(s, p) for s, p in zip(spatial[1:], patch)]
        rows, plane = 1, padded[0] * padded[1]
    in_rows = rows + 2 + math.ceil(slab_rows * spatial[0] / crop_t[0])  # a chunk, its halo, one slab's sources
    buffers = {
        "input": int(np.prod(data_shape)) * 4,
        "labels": int(np.prod(props.shape_before_crop)) * (1 if K <= 256 else 2),
        "accumulators": folds * K * rows * plane * acc_bytes + rows * plane * 8,
        "final rows": 3 * K * rows * plane * 4,
        "resampler": K * in_rows * spatial[1] * spatial[2] * 4
                     + 3 * K * slab_rows * max(spatial[1], crop_t[1]) * max(spatial[2], crop_t[2]) * 4,
        "network": _network_bytes(model, options.batch_size),  # mirrored copies run one after another
        "runtime": RUNTIME_OVERHEAD_BYTES,
    }
    return LeanBudget(slab_rows, accumulator_dtype, buffers)


def plan_lean(model: LoadedModel, data_shape: Sequence[int], props, limit: int | None,
              options: PredictOptions, where: str | None = None) -> LeanBudget:
    """The largest slab (float32 accumulators first, then float16) whose estimate fits ``limit``."""
    out_rows = _crop_shape_t(props, model)[0]
    if limit is None:
        return estimate_lean(model, data_shape, props, min(DEFAULT_SLAB_ROWS, out_rows), torch.float32, options)
    for dtype in (torch.float32, torch.float16):
        if estimate_lean(model, data_shape, props, 1, dtype, options).total > limit:
            continue
        lo, hi = 1, out_rows
        while lo < hi:  # the estimate grows with the slab: bisect for the largest that fits
            mid = (lo + hi + 1) // 2
            if estimate_lean(model, data_shape, props, mid, dtype, options).total <= limit:
                lo = mid
            else:
                hi = mid - 1
        if dtype != torch.float32:
            log.info("float16 accumulators to stay within %s", format_bytes(limit))
        return estimate_lean(model, data_shape, props, lo, dtype, options)
    need = estimate_lean(model, data_shape, props, 1, torch.float16, options)
    raise AutosegError(f"memory limit {format_bytes(limit)} cannot be met: a case of shape "
                       f"{tuple(props.shape_before_crop)} needs at least {need.describe()}", where or "--memory-limit")


# --------------------------------------------------------------------------- resampling


def axis_map(n_in: int, n_out: int, nearest: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows (lo, hi) and weight of hi for each output row (voxel centres, edges clamped).

    Linear: scipy.ndimage.zoom's grid_mode coordinates, what skimage's resize at order 1 uses;
    nearest: `autoseg.preprocess` ``_resize_nearest_along``.
    """
    pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    if nearest:
        idx = np.clip(np.floor(pos + 0.5).astype(np.int64), 0, n_in - 1)
        return idx, idx, np.zeros(n_out, np.float32)
    lo = np.floor(pos).astype(np.int64)
    return np.clip(lo, 0, n_in - 1), np.clip(lo + 1, 0, n_in - 1), (pos - lo).astype(np.float32)


def _lerp_axis(t: torch.Tensor, axis: int, lo: np.ndarray, hi: np.ndarray, w: np.ndarray) -> torch.Tensor:
    a = t.index_select(axis, torch.from_numpy(lo))
    if not w.any():
        return a
    b = t.index_select(axis, torch.from_numpy(hi))
    shape = [1] * t.ndim
    shape[axis] = -1
    return torch.lerp(a, b, torch.from_numpy(w).view(shape))


def _crop_shape_t(props, model: LoadedModel) -> tuple[int, int, int]:
    return tuple(int(props.shape_after_crop[a]) for a in model.plan.transpose_forward)  # type: ignore[return-value]


class SlabResampler:
    """Takes final logit rows (K, n, *plane) of the network grid in order; writes label rows.

    ``out`` is the (transposed) cropped view of the label map; each output row is written once
    its source rows have arrived, ``slab_rows`` rows per resampling call.
    """

    def __init__(self, in_shape: Sequence[int], out: np.ndarray, separate_axis: int | None, slab_rows: int,
                 label_map) -> None:
        self.out, self.slab_rows, self.label_map = out, max(1, slab_rows), label_map
        self.maps = [None if n_in == n_out else axis_map(n_in, n_out, a == separate_axis)
                     for a, (n_in, n_out) in enumerate(zip(in_shape, out.shape))]
        n0 = out.shape[0]
        self.lo0, self.hi0, self.w0 = self.maps[0] or (np.arange(n0), np.arange(n0), np.zeros(n0, np.float32))
        self.rows: list[torch.Tensor] = []
        self.start = 0  # network row of self.rows[0]
        self.next_out = 0
        self.peak_rows = 0
        """Most source rows held at once (the halo bound, for tests)."""

    def push(self, start: int, rows: torch.Tensor) -> None:
        """Source rows [start, start + n); they must follow the previous ones."""
        held = sum(r.shape[1] for r in self.rows)
        if start != self.start + held:
            raise ValueError(f"rows must arrive in order: got {start}, expected {self.start + held}")
        self.rows.append(rows)
        self.peak_rows = max(self.peak_rows, held + rows.shape[1])
        self._emit(final=False)

    def finish(self) -> None:
        self._emit(final=True)
        if self.next_out != self.out.shape[0]:
            raise ValueError(f"only {self.next_out} of {self.out.shape[0]} output rows were written")

    def _emit(self, final: bool) -> None:
        end = self.start + sum(r.shape[1] for r in self.rows)
        ready = int(np.searchsorted(self.hi0, end, side="left")) if not final else len(self.hi0)
        if ready <= self.next_out:
            return
        buf = torch.cat(self.rows, dim=1) if len(self.rows) > 1 else self.rows[0]
        for o0 in range(self.next_out, ready, self.slab_rows):
            o1 = min(ready, o0 + self.slab_rows)
            t = _lerp_axis(buf, 1, self.lo0[o0:o1] - self.start, self.hi0[o0:o1] - self.start, self.w0[o0:o1])
            for axis in (1, 2):
                if self.maps[axis] is not None:
                    t = _lerp_axis(t, axis + 1, *self.maps[axis])
            self.out[o0:o1] = self.label_map(t.numpy())
        self.next_out = ready
        keep_from = min(int(self.lo0[ready]), end) if ready < len(self.lo0) else end
        buf = buf[:, keep_from - self.start:]
        self.rows, self.start = ([buf] if buf.shape[1] else []), keep_from


# --------------------------------------------------------------------------- network rows


def _mean_logits(accs: Sequence[torch.Tensor], weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over folds of the logits (K, n, *plane) float32.

    ``accs`` hold weighted logit sums divided here by ``weights``, or (``weights`` None)
    running weighted means already.
    """
    total = None
    for acc in accs:
        logits = acc.float() / weights if weights is not None else acc.float()
        total = logits if total is None else total.add_(logits)
    return total.div_(len(accs))


def _accumulate(accs: Sequence[torch.Tensor], weights: torch.Tensor, tile: tuple[slice, ...],
                logits: Sequence[torch.Tensor], gauss: torch.Tensor) -> None:
    """Add one window's logits of every fold. float32: Gaussian-weighted sums (as the whole-volume
    path); float16: running weighted means, m += (y - m) g / W, whose error does not grow where the
    weights are tiny (a weighted sum there would sink into float16's subnormals)."""
    weights[tile] += gauss
    if accs[0].dtype == torch.float32:
        for acc, y in zip(accs, logits):
            acc[(slice(None), *tile)] += y * gauss
        return
    ratio = gauss / weights[tile]
    for acc, y in zip(accs, logits):
        view = acc[(slice(None), *tile)]
        view += ((y - view.float()) * ratio).to(acc.dtype)


def _shift(buf: torch.Tensor, d: int, axis: int) -> None:
    """Move rows [d, n) of ``axis`` to [0, n - d) in place, zero the rest (row by row: no second buffer)."""
    n = buf.shape[axis]
    for r in range(n - d):
        buf.select(axis, r).copy_(buf.select(axis, r + d))
    buf.narrow(axis, n - d, d).zero_()


@torch.inference_mode()
def stream_rows_3d(model: LoadedModel, data: torch.Tensor, options: PredictOptions,
                   accumulator_dtype: torch.dtype = torch.float32) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, final fold-averaged logits (K, n, y, x)) along the first axis of a preprocessed (C, z, y, x) case.

    The same windows, Gaussian weights and mirroring as `predict_sliding_window`, one
    patch depth of accumulator rows per fold.
    """
    patch = tuple(int(p) for p in model.config.patch_size)
    padded, keep = pad_to_patch(data.float(), patch)
    spatial = tuple(padded.shape[1:])
    tiles = compute_tiles(spatial, patch, options.step)
    gauss = gaussian_importance_map(patch, dtype=torch.float32)
    K, p0 = model.num_classes, patch[0]
    accs = [torch.zeros((K, p0, *spatial[1:]), dtype=accumulator_dtype) for _ in model.nets]
    weights = torch.zeros((p0, *spatial[1:]), dtype=torch.float32)
    mirror = model.mirror_axes if options.tta else ()
    amp = model.device.type == "cuda" if options.amp is None else options.amp
    base = 0
    groups: dict[int, list[tuple[slice, ...]]] = {}
    for t in tiles:
        groups.setdefault(t[0].start, []).append(t)

    def final(upto: int) -> Iterator[tuple[int, torch.Tensor]]:
        d = upto - base
        lo, hi = max(base, keep[0].start), min(upto, keep[0].stop)
        if hi > lo:
            w = weights[lo - base:hi - base] if accumulator_dtype == torch.float32 else None
            rows = _mean_logits([a[:, lo - base:hi - base] for a in accs], w)
            yield lo - keep[0].start, rows[(slice(None), slice(None), keep[1], keep[2])].contiguous()
        for a in accs:
            _shift(a, d, 1)
        _shift(weights, d, 0)

    for start, group in groups.items():
        if start > base:
            yield from final(start)
            base = start
        for tb in range(0, len(group), options.batch_size):
            batch = group[tb:tb + options.batch_size]
            x = torch.stack([padded[(slice(None), *t)] for t in batch]).to(model.device)
            ys = [_forward(net, x, mirror, amp).to("cpu") for net in model.nets]
            if ys[0].shape[1] != K:
                raise ValueError(f"network returned {ys[0].shape[1]} channels, expected {K}")
            for i, t in enumerate(batch):
                local = (slice(t[0].start - base, t[0].stop - base), *t[1:])
                _accumulate(accs, weights, local, [y[i] for y in ys], gauss)
    yield from final(base + p0)


def stream_rows_2d(model: LoadedModel, data: torch.Tensor,
                   options: PredictOptions) -> Iterator[tuple[int, torch.Tensor]]:
    """A 2d configuration: every slice of the first axis is final on its own."""
    mirror = model.mirror_axes if options.tta else ()
    for z in range(data.shape[1]):
        logits = [predict_sliding_window(net, data[:, z], model.config.patch_size, model.num_classes,
                                         step=options.step, mirror_axes=mirror, batch_size=options.batch_size,
                                         device=model.device, amp=options.amp, results_device="cpu")
                  for net in model.nets]
        ones = torch.ones(logits[0].shape[1:], dtype=torch.float32)
        yield z, _mean_logits(logits, ones).unsqueeze(1)


def predict_labels_lean(model: LoadedModel, data_pp: np.ndarray, props, options: PredictOptions,
                        budget: LeanBudget) -> np.ndarray:
    """The label map (original z, y, x) of one model's preprocessed case, in slabs (see the module doc)."""
    scheme = model.plan.label_scheme
    K = model.num_classes
    dtype = np.uint8 if (max(scheme.regions_class_order, default=0) if scheme.has_regions else K - 1) < 256 \
        else np.uint16
    labels = np.zeros(tuple(props.shape_before_crop), dtype)
    box = tuple(slice(a, b) for a, b in props.bbox)
    out_t = labels[box].transpose(tuple(model.plan.transpose_forward))
    if tuple(data_pp.shape[1:]) != tuple(props.shape_after_resampling):
        raise ValueError(f"expected (C, *{props.shape_after_resampling}), got {data_pp.shape}")
    regions = scheme.has_regions
    resampler = SlabResampler(data_pp.shape[1:], out_t, props.separate_z_axis, budget.slab_rows,
                              lambda logits: scheme.label_map(activate(logits, regions)))
    x = torch.from_numpy(np.ascontiguousarray(data_pp, dtype=np.float32))
    rows = (stream_rows_3d(model, x, options, budget.accumulator_dtype) if model.config.ndim == 3
            else stream_rows_2d(model, x, options))
    for start, probs in rows:
        resampler.push(start, probs)
    resampler.finish()
    return labels
