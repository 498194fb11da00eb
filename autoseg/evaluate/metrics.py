"""Segmentation metrics per case and class, in physical units (mm).

Pure functions on boolean masks of one class plus the voxel spacing in array order
(z, y, x), mm. Conventions (tested in ``tests/evaluate/test_metrics.py`` and against MedPy
and MONAI in ``tests/evaluate/test_reference_metrics.py``):

- Dice = 2 TP / (2 TP + FP + FN), IoU = TP / (TP + FP + FN), as nnU-Net.
- HD95 (MedPy's ``hd95``, the nnU-Net-era definition): voxel surfaces are the mask voxels
  removed by one binary erosion with the 6-connected (face) structure (a mask touching the
  image border has a surface there); the distances from every predicted surface voxel to
  the reference surface and from every reference surface voxel to the predicted surface
  are pooled into one set and its 95th percentile taken; ``percentile=100`` gives the
  Hausdorff distance. (MONAI's ``compute_hausdorff_distance(percentile=95)`` instead takes
  the larger of the two directed 95th percentiles.)
- Normalized surface Dice (Nikolov et al. 2021, DeepMind's ``surface-distance``) at
  tolerance tau: surfels are the 2x2x2 blocks of voxel centres that are neither all inside
  nor all outside, each weighted by the area (mm^2) of the marching-cubes-like surface
  patch it holds (`surfel_area_table`); NSD is the area of both surfaces lying within tau
  mm of the other surface over the total area of both.
- Empty masks (nothing is silently 0 or 1):

  ========================  =====  =====  =====  =====
  reference / prediction    Dice   IoU    NSD    HD95
  ========================  =====  =====  =====  =====
  both empty                NaN    NaN    NaN    NaN
  exactly one empty         0      0      0      NaN
  ========================  =====  =====  =====  =====

  Both empty, every ratio is 0/0: NaN, as nnU-Net's Dice/IoU and MONAI's NSD, and means
  skip NaN (``summary.py``). One empty, Dice, IoU and NSD are 0 by their formulas (nothing
  overlaps, no surface lies near an absent one); HD95 would be infinite (MONAI returns inf
  or NaN), which no mean survives, so it is NaN and the summary counts how many cases each
  HD95 mean is over (``n_hd95``): judge missed and hallucinated structures by Dice and NSD.
- Sparse references (`case_metrics` with ``ignore_label``): voxels holding the ignore label
  in the reference are unannotated and removed from both masks before anything is
  computed, so a prediction there is neither TP, FP nor FN (nnU-Net's rule). HD95 and NSD
  use the same reduced masks: their surfaces are those of the annotated parts, so a class
  cut by an unannotated region has a surface along the cut (see docs/evaluation.md).
"""

from __future__ import annotations

import functools
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
    """Dice from voxel counts; NaN when both masks are empty (0/0, see module conventions)."""
    denom = 2 * tp + fp + fn
    return math.nan if denom == 0 else 2.0 * tp / denom


def iou_from_counts(tp: int, fp: int, fn: int) -> float:
    """Intersection over union from voxel counts; NaN when both masks are empty."""
    denom = tp + fp + fn
    return math.nan if denom == 0 else tp / denom


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

    NaN when either mask is empty (undefined, see the module conventions).
    """
    if not pred.any() or not ref.any():
        return math.nan
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    return float(np.percentile(np.concatenate([d_pr, d_rp]), percentile))


# --------------------------------------------------------------------------- surfels (NSD)

_CORNERS = tuple(((i >> 2) & 1, (i >> 1) & 1, i & 1) for i in range(8))
"""Corner i of a 2x2x2 block sits at offset (z, y, x) = its bits; bit i of a code is corner i."""

_EDGES = tuple((a, b) for a in range(8) for b in range(a + 1, 8) if bin(a ^ b).count("1") == 1)


def _faces() -> tuple[tuple[int, int, int, int], ...]:
    """The six faces of the block, each as its four corners in cyclic order."""
    ring = {(0, 0): 0, (0, 1): 1, (1, 1): 2, (1, 0): 3}
    faces = []
    for axis in range(3):
        u, v = (a for a in range(3) if a != axis)
        for side in (0, 1):
            corners = [i for i in range(8) if _CORNERS[i][axis] == side]
            faces.append(tuple(sorted(corners, key=lambda i: ring[(_CORNERS[i][u], _CORNERS[i][v])])))
    return tuple(faces)


def _surface_loops(code: int) -> list[list[int]]:
    """The closed loops of cut edges (edge indices, in order) that bound the surface in one block.

    Each face with two cut edges contributes one segment between them. A face with four
    (diagonal corners alike) is ambiguous: its segments cut off the minority corners (the
    inside ones when at most 4 of 8 corners are inside, else the outside ones), the rule
    that makes the table symmetric under inside/outside exchange, as marching cubes' is.
    """
    inside = [(code >> i) & 1 for i in range(8)]
    edge_of = {frozenset(e): k for k, e in enumerate(_EDGES)}
    cut_off = 1 if sum(inside) <= 4 else 0
    links: dict[int, list[int]] = {}
    for ring in _faces():
        edges = [edge_of[frozenset((ring[j], ring[(j + 1) % 4]))] for j in range(4)]
        cut = [e for e in edges if inside[_EDGES[e][0]] != inside[_EDGES[e][1]]]
        if len(cut) == 2:
            segments = [tuple(cut)]
        elif len(cut) == 4:
            segments = [(edges[j - 1], edges[j]) for j in range(4) if inside[ring[j]] == cut_off]
        else:
            segments = []
        for e, f in segments:
            links.setdefault(e, []).append(f)
            links.setdefault(f, []).append(e)
    loops, seen = [], set()
    for start in links:
        if start in seen:
            continue
        loop, prev, cur = [start], -1, start
        seen.add(start)
        while True:
            nxt = links[cur][0] if links[cur][0] != prev else links[cur][1]
            if nxt == start:
                break
            loop.append(nxt)
            seen.add(nxt)
            prev, cur = cur, nxt
        loops.append(loop)
    return loops


@functools.lru_cache(maxsize=1)
def _surfel_triangles() -> tuple[np.ndarray, np.ndarray]:
    """Every block code's surface as triangles: (code per triangle (T,), vertices (T, 3, 3)).

    Vertices are cut-edge midpoints in block units; each loop is fanned from its centroid,
    so a non-planar loop gets a smooth, triangulation-independent area. Built once (pure).
    """
    codes, tris = [], []
    for code in range(256):
        for loop in _surface_loops(code):
            pts = np.array([np.add(_CORNERS[_EDGES[e][0]], _CORNERS[_EDGES[e][1]]) / 2.0 for e in loop])
            centre = pts.mean(axis=0)
            for k in range(len(pts)):
                codes.append(code)
                tris.append((centre, pts[k], pts[(k + 1) % len(pts)]))
    return np.array(codes, dtype=np.int64), np.array(tris, dtype=np.float64)


def surfel_area_table(spacing: Sequence[float]) -> np.ndarray:
    """Surface area (mm^2) held by a 2x2x2 block of voxel centres, for each of its 256 codes.

    The surface is the marching-cubes one at level 0.5 (vertices at the midpoints of the
    edges joining an inside and an outside voxel centre), scaled by the voxel spacing before
    measuring, so anisotropic voxels get their true areas. DeepMind's ``surface-distance``
    (and MONAI) measure the same surface with the classic marching-cubes triangle table: on
    planar patches the areas are equal, on non-planar ones ours, fanned from the centroid,
    are smaller (up to 13 % for cubic voxels, a third for 3 x 0.8 x 0.8 mm). Over a whole
    surface that is a smoother, closer-to-true area, and NSD, a ratio of areas, agreed with
    MONAI's within 0.004 on random and Hippocampus masks (tests/evaluate/test_reference_metrics.py).
    """
    codes, tris = _surfel_triangles()
    v = tris * np.asarray(spacing, dtype=np.float64)
    areas = 0.5 * np.linalg.norm(np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]), axis=1)
    return np.bincount(codes, weights=areas, minlength=256)


def block_codes(mask: np.ndarray) -> np.ndarray:
    """The code (0..255) of every 2x2x2 block of voxel centres of ``mask`` padded by one outside voxel.

    Block (z, y, x) has corner (dz, dy, dx) at padded voxel (z + dz, y + dy, x + dx); shape is
    ``mask.shape + 1`` per axis, so a mask touching the image border has a surface there.
    """
    m = np.pad(np.asarray(mask, dtype=bool), 1).view(np.uint8)
    n = tuple(s - 1 for s in m.shape)
    code = np.zeros(n, dtype=np.uint8)
    for bit, (dz, dy, dx) in enumerate(_CORNERS):
        code |= m[dz:dz + n[0], dy:dy + n[1], dx:dx + n[2]] << np.uint8(bit)
    return code


def normalized_surface_dice(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                            tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> float:
    """Area fraction of both surfaces within ``tolerance_mm`` of the other (Nikolov et al. 2021).

    1 = every surface patch is within tolerance, 0 = none (or exactly one mask is empty);
    NaN when both masks are empty. Distances are between surfel (block) centres, in mm.
    """
    if tolerance_mm < 0:
        raise ValueError(f"tolerance must be >= 0 mm, got {tolerance_mm}")
    has_p, has_r = bool(pred.any()), bool(ref.any())
    if not has_p and not has_r:
        return math.nan
    if has_p != has_r:
        return 0.0
    box = _union_crop(pred, ref)
    sampling = tuple(float(s) for s in spacing)
    code_p, code_r = block_codes(pred[box]), block_codes(ref[box])
    surf_p, surf_r = (code_p != 0) & (code_p != 255), (code_r != 0) & (code_r != 255)
    table = surfel_area_table(sampling)
    area_p, area_r = table[code_p[surf_p]], table[code_r[surf_r]]
    near_r = ndimage.distance_transform_edt(~surf_r, sampling=sampling)[surf_p] <= tolerance_mm
    near_p = ndimage.distance_transform_edt(~surf_p, sampling=sampling)[surf_r] <= tolerance_mm
    return float((area_p[near_r].sum() + area_r[near_p].sum()) / (area_p.sum() + area_r.sum()))


def class_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                  tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> ClassMetrics:
    """All metrics of one class given its two boolean masks (z, y, x) and the spacing (mm)."""
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.ndim != 3 or len(spacing) != 3:
        raise ValueError(f"expected 3D masks and 3 spacings, got {pred.shape} and {tuple(spacing)}")
    tp, fp, fn = overlap_counts(pred, ref)
    return ClassMetrics(dice=dice_from_counts(tp, fp, fn), iou=iou_from_counts(tp, fp, fn),
                        hd95=hausdorff_distance(pred, ref, spacing),
                        nsd=normalized_surface_dice(pred, ref, spacing, tolerance_mm),
                        tp=tp, fp=fp, fn=fn, n_pred=tp + fp, n_ref=tp + fn)


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
