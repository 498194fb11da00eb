"""Patch sampling from preprocessed cases, with nnU-Net's foreground oversampling.

Reads the preprocessing layout (docs/architecture.md) directly: ``CASE.npy`` float32
(C, *spatial) memory-mapped, ``CASE_seg.npy`` int8 (1, *spatial), ``CASE_fg.npz`` with keys
``class_<k>`` -> (N, 3) voxel coordinates. A patch is centred on a random voxel of a random
foreground class present in the case when the sample is "forced" (the last third of each
batch), and placed uniformly otherwise; regions outside the case are padded with 0 (data) and
the label -1 (`PAD_VALUE_SEG`; augmentation turns it into background). 2D configurations take
one slice along axis 0 and a 2D patch from it. Labels may hold -1 outside the nonzero mask
(`autoseg.preprocess.OUTSIDE_MASK_LABEL`): it is never a class here.
Preprocessing stores no coordinates for the ignore label, so forced samples centre on
annotated foreground only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.common.errors import AutosegError

OVERSAMPLE_FOREGROUND = 0.33
"""Fraction of each batch (the last samples) forced to contain foreground (nnU-Net's oversample_foreground_percent)."""

PAD_VALUE_DATA = 0.0
"""Preprocessed images are normalized around 0, so 0 is a neutral fill."""

PAD_VALUE_SEG = -1
"""Padding is labelled -1, like outside the nonzero mask, as nnU-Net's loader does: data there is zeroed on
masked channels after augmentation, and the label becomes background (`augment.restore_masked_background`)."""

PRIOR_MAX_CASES = 25
"""Cases whose labels `class_voxel_counts` reads (spread over the list): enough for a class prior,
cheap on datasets of large volumes."""


@dataclass(frozen=True)
class CaseFiles:
    """The files of one preprocessed case."""

    data: Path
    seg: Path
    foreground: Path
    properties: Path
    """``CASE.json``, written last by preprocessing: a case without it is incomplete."""

    @classmethod
    def of(cls, data_dir: Path, case_id: str) -> "CaseFiles":
        return cls(data_dir / f"{case_id}.npy", data_dir / f"{case_id}_seg.npy", data_dir / f"{case_id}_fg.npz",
                   data_dir / f"{case_id}.json")

    def check(self) -> None:
        """Raise naming the first missing file (preprocessing not run, or interrupted)."""
        for path in (self.data, self.seg, self.foreground, self.properties):
            if not path.is_file():
                raise AutosegError("preprocessed file missing (run `autoseg preprocess`)", where=path)


def load_foreground(path: Path) -> dict[int, np.ndarray]:
    """``{class: (N, 3) int coordinates}`` for every foreground class with at least one voxel."""
    try:
        with np.load(path) as npz:
            out = {}
            for key in npz.files:
                if not key.startswith("class_"):
                    continue
                k = int(key[len("class_"):])
                coords = np.asarray(npz[key], dtype=np.int64).reshape(-1, 3)
                if k > 0 and len(coords):
                    out[k] = coords
            return out
    except (OSError, ValueError) as e:
        raise AutosegError(f"cannot read foreground locations ({e})", where=path) from None


def load_arrays(files: CaseFiles) -> tuple[np.ndarray, np.ndarray]:
    """Memory-mapped data (C, *spatial) and seg (1, *spatial), checked for matching shapes."""
    try:
        data = np.load(files.data, mmap_mode="r")
        seg = np.load(files.seg, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise AutosegError(f"cannot read preprocessed array ({e})", where=files.data) from None
    if data.ndim != 4 or seg.ndim != 4 or seg.shape[0] != 1 or data.shape[1:] != seg.shape[1:]:
        raise AutosegError(f"expected data (C, z, y, x) and seg (1, z, y, x) on the same grid, got "
                           f"{data.shape} and {seg.shape}", where=files.data)
    return data, seg


def is_forced_foreground(sample_index: int, batch_size: int, oversample: float) -> bool:
    """nnU-Net's rule: samples with index >= round(B * (1 - oversample)) must contain foreground."""
    return sample_index >= round(batch_size * (1.0 - oversample))


def patch_lower_bounds(rng: np.random.Generator, shape: tuple[int, ...], patch: tuple[int, ...],
                       final_patch: tuple[int, ...], center_voxel: np.ndarray | None) -> tuple[int, ...]:
    """Lower corner of a ``patch`` window in a case of ``shape`` (may be negative: padded).

    The window may stick out by half the enlargement (``patch - final_patch``) so that the
    final, centre-cropped patch still reaches the case's border; cases smaller than the patch
    are padded. With ``center_voxel`` the window is centred on it (forced foreground).
    """
    lower_bounds = []
    for d, (n, p, f) in enumerate(zip(shape, patch, final_patch)):
        need = max(p - f, p - n)
        # odd margins: one more voxel on the low side, as nnU-Net's get_bbox ((-need) // 2)
        lo = -((need + 1) // 2)
        hi = n + need // 2 + need % 2 - p
        if center_voxel is not None:
            lower_bounds.append(max(lo, int(center_voxel[d]) - p // 2))
        else:
            lower_bounds.append(int(rng.integers(lo, hi + 1)))
    return tuple(lower_bounds)


def crop_padded(array: np.ndarray, lower: tuple[int, ...], size: tuple[int, ...], fill: float) -> np.ndarray:
    """Window [lower, lower + size) of the spatial axes of (C, *spatial); outside the array -> ``fill``."""
    spatial = array.shape[1:]
    src, dst = [slice(None)], [slice(None)]
    for lo, p, n in zip(lower, size, spatial):
        a, b = max(lo, 0), min(lo + p, n)
        if b <= a:  # window entirely outside along this axis: all fill
            a = b = 0
        src.append(slice(a, b))
        dst.append(slice(a - lo, a - lo + (b - a)))
    out = np.full((array.shape[0],) + tuple(size), fill, dtype=array.dtype)
    out[tuple(dst)] = array[tuple(src)]
    return out


def sample_patch(rng: np.random.Generator, data: np.ndarray, seg: np.ndarray, foreground: dict[int, np.ndarray],
                 patch: tuple[int, ...], final_patch: tuple[int, ...],
                 force_foreground: bool, extra_seg: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cut one (C, *patch) data / (1, *patch) seg window from a case, 2D or 3D by ``len(patch)``.

    Forced samples pick a random present class, then a random voxel of it as the centre (2D:
    its slice). A case without foreground falls back to a uniform window. ``extra_seg``
    (1, *spatial) (the cascade's previous-stage segmentation) is cut at the same window and
    returned as a second seg channel, so augmentation moves it with the labels.
    """
    classes = sorted(foreground) if force_foreground else []
    voxel = None
    if classes:
        coords = foreground[classes[int(rng.integers(len(classes)))]]
        voxel = coords[int(rng.integers(len(coords)))]
    if len(patch) == 2:
        z = int(voxel[0]) if voxel is not None else int(rng.integers(data.shape[1]))
        data, seg = data[:, z], seg[:, z]
        extra_seg = extra_seg[:, z] if extra_seg is not None else None
        voxel = voxel[1:] if voxel is not None else None
    lower = patch_lower_bounds(rng, data.shape[1:], patch, final_patch, voxel)
    seg_patch = crop_padded(seg, lower, patch, PAD_VALUE_SEG)
    if extra_seg is not None:
        seg_patch = np.concatenate([seg_patch, crop_padded(extra_seg, lower, patch, PAD_VALUE_SEG).astype(
            seg_patch.dtype)])
    return crop_padded(data, lower, patch, PAD_VALUE_DATA).astype(np.float32, copy=False), seg_patch


def class_voxel_counts(data_dir: Path, case_ids: list[str] | tuple[str, ...], num_classes: int,
                       max_cases: int = PRIOR_MAX_CASES) -> np.ndarray:
    """Voxels of each class ``0..num_classes-1`` in up to ``max_cases`` cases' labels, evenly spread.

    The ignore label (``num_classes``) and any negative fill are not counted. Used to start the
    segmentation heads at the label prior (`autoseg.nets.unet.init_heads_to_prior`).
    """
    if not case_ids:
        raise AutosegError("no training cases to count labels in", where=data_dir)
    picks = np.unique(np.linspace(0, len(case_ids) - 1, min(max_cases, len(case_ids))).round().astype(int))
    counts = np.zeros(num_classes, dtype=np.int64)
    for i in picks:
        files = CaseFiles.of(data_dir, case_ids[i])
        if not files.seg.is_file():
            raise AutosegError("preprocessed file missing (run `autoseg preprocess`)", where=files.seg)
        seg = np.asarray(np.load(files.seg, mmap_mode="r")).ravel()
        seg = seg[(seg >= 0) & (seg < num_classes)]
        counts += np.bincount(seg.astype(np.int64), minlength=num_classes)[:num_classes]
    return counts
