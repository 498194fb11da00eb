"""Segmentation metrics per case and class, in physical units (mm).

Pure functions on boolean masks of one class plus the voxel spacing in array order
(z, y, x), mm. Conventions (tested in ``tests/evaluate/test_metrics.py``):

- Dice = 2 TP / (2 TP + FP + FN), IoU = TP / (TP + FP + FN).
- Surfaces are the mask voxels removed by one binary erosion with the 6-connected (face)
  structure; a mask touching the image border has a surface there.
- HD95 pools the distances from every predicted surface voxel to the reference surface and
  from every reference surface voxel to the predicted surface (medpy's ``hd95`` rule) and
  takes the 95th percentile; ``percentile=100`` gives the Hausdorff distance.
- Normalized surface Dice (Nikolov et al. 2021) at tolerance tau: the fraction of both
  surfaces' voxels that lie within tau mm of the other surface.
- Both masks empty: Dice = IoU = NSD = 1, HD95 = 0 (a correct "nothing here").
- Exactly one mask empty: Dice = IoU = NSD = 0, HD95 = NaN (undefined; NaN is stored and
  excluded from HD95 means, and the number of such cases is reported next to the mean).
- Sparse references (`case_metrics` with ``ignore_label``): voxels holding the ignore label
  in the reference are unannotated and removed from both masks before anything is
  computed, so a prediction there is neither TP, FP nor FN (nnU-Net's rule). HD95 and NSD
  use the same reduced masks: their surfaces are those of the annotated parts, so a class
  cut by an unannotated region has a surface along the cut (see docs/evaluation.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

DEFAULT_TOLERANCE_MM = 1.0
"""Normalized surface Dice tolerance (mm); 1 mm is the common choice for organ-scale structures."""

HD_PERCENTILE = 95.0
"""Robust Hausdorff distance percentile (the customary HD95)."""

_FACE_STRUCTURE_3D = ndimage.generate_binary_structure(3, 1)


@dataclass(frozen=True)
class ClassMetrics:
    """Every metric of one class in one case. Distances in mm; counts in voxels."""

    dice: float
    iou: float
    hd95: float
    nsd: float
    tp: int
    fp: int
    fn: int
    n_pred: int
    n_ref: int


def overlap_counts(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int]:
    """(TP, FP, FN) voxel counts of two boolean masks of the same shape."""
    if pred.shape != ref.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {ref.shape}")
    tp = int(np.count_nonzero(pred & ref))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(ref)) - tp


def dice_from_counts(tp: int, fp: int, fn: int) -> float:
    """Dice from voxel counts; 1.0 when both masks are empty (see module conventions)."""
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2.0 * tp / denom


def iou_from_counts(tp: int, fp: int, fn: int) -> float:
    """Intersection over union from voxel counts; 1.0 when both masks are empty."""
    denom = tp + fp + fn
    return 1.0 if denom == 0 else tp / denom


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a boolean 3D mask: the voxels one face-connected erosion removes."""
    if not mask.any():
        return np.zeros_like(mask, dtype=bool)
    eroded = ndimage.binary_erosion(mask, structure=_FACE_STRUCTURE_3D, border_value=0)
    return mask & ~eroded


def _union_crop(pred: np.ndarray, ref: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of both masks; distances between surface voxels are crop-invariant.

    Every surface voxel lies inside the box and a voxel on the box edge is a surface voxel in
    the full image too (its outside neighbour is background or the image border), so erosion
    and distance transforms on the crop give exactly the full-image answers, much faster.
    """
    coords = np.argwhere(pred | ref)
    lo, hi = coords.min(0), coords.max(0) + 1
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def surface_distances(pred: np.ndarray, ref: np.ndarray,
                      spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each predicted surface voxel to the reference surface, and back.

    Both masks must be non-empty. Euclidean distance transforms use ``sampling=spacing`` so
    anisotropic voxels are measured in millimetres.
    """
    if not pred.any() or not ref.any():
        raise ValueError("surface distances need two non-empty masks")
    box = _union_crop(pred, ref)
    p, r = pred[box], ref[box]
    sp, sr = surface(p), surface(r)
    dist_to_ref = ndimage.distance_transform_edt(~sr, sampling=tuple(float(s) for s in spacing))
    dist_to_pred = ndimage.distance_transform_edt(~sp, sampling=tuple(float(s) for s in spacing))
    return dist_to_ref[sp], dist_to_pred[sr]


def hausdorff_distance(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                       percentile: float = HD_PERCENTILE) -> float:
    """Percentile Hausdorff distance (mm) over the pooled symmetric surface distances.

    0.0 when both masks are empty, NaN when exactly one is (undefined).
    """
    has_p, has_r = bool(pred.any()), bool(ref.any())
    if not has_p and not has_r:
        return 0.0
    if has_p != has_r:
        return math.nan
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    return float(np.percentile(np.concatenate([d_pr, d_rp]), percentile))


def normalized_surface_dice(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                            tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> float:
    """Fraction of both surfaces within ``tolerance_mm`` of the other (1 = all, 0 = none)."""
    if tolerance_mm < 0:
        raise ValueError(f"tolerance must be >= 0 mm, got {tolerance_mm}")
    has_p, has_r = bool(pred.any()), bool(ref.any())
    if not has_p and not has_r:
        return 1.0
    if has_p != has_r:
        return 0.0
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    within = np.count_nonzero(d_pr <= tolerance_mm) + np.count_nonzero(d_rp <= tolerance_mm)
    return float(within / (d_pr.size + d_rp.size))


def class_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                  tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> ClassMetrics:
    """All metrics of one class given its two boolean masks (z, y, x) and the spacing (mm)."""
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.ndim != 3 or len(spacing) != 3:
        raise ValueError(f"expected 3D masks and 3 spacings, got {pred.shape} and {tuple(spacing)}")
    tp, fp, fn = overlap_counts(pred, ref)
    n_pred, n_ref = tp + fp, tp + fn
    if n_pred and n_ref:
        d_pr, d_rp = surface_distances(pred, ref, spacing)
        pooled = np.concatenate([d_pr, d_rp])
        hd95 = float(np.percentile(pooled, HD_PERCENTILE))
        nsd = float(np.count_nonzero(pooled <= tolerance_mm) / pooled.size)
    elif not n_pred and not n_ref:
        hd95, nsd = 0.0, 1.0
    else:
        hd95, nsd = math.nan, 0.0
    return ClassMetrics(dice=dice_from_counts(tp, fp, fn), iou=iou_from_counts(tp, fp, fn), hd95=hd95,
                        nsd=nsd, tp=tp, fp=fp, fn=fn, n_pred=n_pred, n_ref=n_ref)


def case_metrics(pred_seg: np.ndarray, ref_seg: np.ndarray, spacing: Sequence[float],
                 label_values: Sequence[int], tolerance_mm: float = DEFAULT_TOLERANCE_MM,
                 ignore_label: int | None = None) -> dict[int, ClassMetrics]:
    """Metrics per label value for two integer label maps (z, y, x) on the same grid.

    With ``ignore_label``, reference voxels holding it are left out of every class's
    prediction mask (the reference mask of a class never holds them), see the module doc.
    """
    if pred_seg.shape != ref_seg.shape:
        raise ValueError(f"prediction shape {pred_seg.shape} differs from reference {ref_seg.shape}")
    if ignore_label is None:
        return {int(v): class_metrics(pred_seg == v, ref_seg == v, spacing, tolerance_mm) for v in label_values}
    if ignore_label in label_values:
        raise ValueError(f"the ignore label {ignore_label} is not a class to evaluate")
    annotated = ref_seg != ignore_label
    return {int(v): class_metrics((pred_seg == v) & annotated, ref_seg == v, spacing, tolerance_mm)
            for v in label_values}
