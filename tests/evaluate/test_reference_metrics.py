"""Dice, HD95 and NSD cross-checked against MedPy and MONAI (test-only dependencies) on random
smooth masks and real Hippocampus labels, with anisotropic spacing."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from autoseg.dataset.io import read_image
from autoseg.evaluate.metrics import block_codes, class_metrics, hausdorff_distance, normalized_surface_dice, \
    surfel_area_table
from tests.helpers import HIPPOCAMPUS_MISSING, HIPPOCAMPUS_MSD, hippocampus_available, hippocampus_case_ids

medpy_binary = pytest.importorskip("medpy.metric.binary", reason="MedPy (pip install autoseg[test])")
torch = pytest.importorskip("torch")
monai_metrics = pytest.importorskip("monai.metrics", reason="MONAI (pip install monai --no-deps)")

SPACINGS = [(1.0, 1.0, 1.0), (3.0, 0.8, 0.8), (1.5, 0.7, 1.1)]
TOLERANCES_MM = [0.5, 1.0, 2.0]
NSD_AGREEMENT = 0.005
"""Our surfel areas fan each marching-cubes loop from its centroid, DeepMind's/MONAI's table uses
the classic triangulation; measured worst differences on these masks: 0.0010 (random), 0.0037 (Hippocampus)."""


def _blob(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """A random smooth mask: thresholded Gaussian-filtered noise (several lumpy components)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), 2.5)
    return f > 0.6 * f.std()


def _random_pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    pairs = []
    for k in range(3):
        ref = _blob(rng, (20, 36, 36))
        pred = [ndimage.binary_dilation(ref), _blob(rng, ref.shape), ref ^ (rng.random(ref.shape) < 0.02)][k]
        pairs.append((pred, ref))
    return pairs


def _hippocampus_pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    """Real label masks (both classes) against a shifted, partly eroded copy."""
    if not hippocampus_available():
        pytest.skip(HIPPOCAMPUS_MISSING)
    pairs = []
    for cid in hippocampus_case_ids(2):
        seg, _ = read_image(HIPPOCAMPUS_MSD / "labelsTr" / f"{cid}.nii.gz")
        for v in (1, 2):
            ref = np.asarray(seg) == v
            pred = np.roll(ref, 1, axis=1)
            pred[:, :, ::3] = ndimage.binary_erosion(pred)[:, :, ::3]
            pairs.append((pred, ref))
    return pairs


def _one_hot(mask: np.ndarray) -> "torch.Tensor":
    return torch.from_numpy(np.stack([~mask, mask])[None].astype(np.float32))


def _monai_nsd(pred: np.ndarray, ref: np.ndarray, spacing, tol: float) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = monai_metrics.compute_surface_dice(_one_hot(pred), _one_hot(ref), [tol], spacing=list(spacing),
                                                 use_subvoxels=True)
    return float(out[0, 0])


@pytest.mark.parametrize("source", ["random", "hippocampus"])
def test_dice_and_hd95_equal_medpy_and_hausdorff_equals_monai(source: str) -> None:
    pairs = _random_pairs() if source == "random" else _hippocampus_pairs()
    for pred, ref in pairs:
        for spacing in SPACINGS:
            m = class_metrics(pred, ref, spacing)
            assert m.dice == pytest.approx(medpy_binary.dc(pred, ref), rel=1e-12)
            assert m.iou == pytest.approx(medpy_binary.jc(pred, ref), rel=1e-12)
            # our HD95 is MedPy's: the 95th percentile of both directed distance sets pooled
            assert m.hd95 == pytest.approx(medpy_binary.hd95(pred, ref, voxelspacing=spacing), rel=1e-9)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hd = monai_metrics.compute_hausdorff_distance(_one_hot(pred), _one_hot(ref), spacing=list(spacing))
                dice = monai_metrics.compute_dice(_one_hot(pred), _one_hot(ref), include_background=False)[0, 0]
            assert hausdorff_distance(pred, ref, spacing, percentile=100) == pytest.approx(float(hd), rel=1e-5)
            assert m.dice == pytest.approx(float(dice), rel=1e-5)


@pytest.mark.parametrize("source", ["random", "hippocampus"])
def test_nsd_agrees_with_monai_surface_area_nsd(source: str) -> None:
    pairs = _random_pairs() if source == "random" else _hippocampus_pairs()
    worst = 0.0
    for pred, ref in pairs:
        for spacing in SPACINGS:
            for tol in TOLERANCES_MM:
                ours, theirs = normalized_surface_dice(pred, ref, spacing, tol), _monai_nsd(pred, ref, spacing, tol)
                worst = max(worst, abs(ours - theirs))
    assert worst <= NSD_AGREEMENT
    # and it is the area-weighted NSD, not a count of boundary voxels: with 3 mm slices the two differ
    pred, ref = pairs[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_count = monai_metrics.compute_surface_dice(_one_hot(pred), _one_hot(ref), [1.0], spacing=[3.0, 0.8, 0.8])
    area = normalized_surface_dice(pred, ref, (3.0, 0.8, 0.8), 1.0)
    assert abs(area - _monai_nsd(pred, ref, (3.0, 0.8, 0.8), 1.0)) < abs(area - float(by_count[0, 0]))


def test_empty_mask_conventions_match_monai_nsd() -> None:
    empty = np.zeros((8, 8, 8), bool)
    blob = empty.copy()
    blob[2:5, 2:5, 2:5] = True
    assert math.isnan(normalized_surface_dice(empty, empty, (2, 1, 1))) and math.isnan(_monai_nsd(empty, empty,
                                                                                                (2, 1, 1), 1.0))
    assert normalized_surface_dice(blob, empty, (2, 1, 1)) == _monai_nsd(blob, empty, (2, 1, 1), 1.0) == 0.0


def test_surfel_areas_are_physical_areas() -> None:
    """A ball's surfel area is near 4 pi r^2 under any spacing (marching cubes overshoots by its
    staircase, more with thick slices), never further off than DeepMind's/MONAI's table; planar
    patches equal that table exactly; non-planar ones are smaller (13 % at most for cubic voxels)."""
    from monai.metrics.utils import create_table_neighbour_code_to_surface_area

    radius = 15.0
    for spacing in [(1.0, 1.0, 1.0), (2.0, 1.0, 0.5), (3.0, 0.8, 0.8)]:
        grids = [np.arange(-radius - 2, radius + 2.01, s) for s in spacing]
        z, y, x = np.meshgrid(*grids, indexing="ij")
        codes = block_codes(z ** 2 + y ** 2 + x ** 2 <= radius ** 2)
        theirs = create_table_neighbour_code_to_surface_area(spacing)[0].numpy().astype(np.float64)
        # MONAI's code puts corner (0, 0, 0) in bit 7, ours in bit 0
        theirs = theirs[[sum(1 << (7 - i) for i in range(8) if code >> i & 1) for code in range(256)]]
        ours = surfel_area_table(spacing)
        true_area = 4 * math.pi * radius ** 2
        assert 1.0 < ours[codes].sum() / true_area < 1.2
        assert ours[codes].sum() <= theirs[codes].sum()
        for code in (1, 3, 15, 51, 254, 252):  # a corner, an edge, a face, a slab, and complements
            assert ours[code] == pytest.approx(theirs[code], rel=1e-6)
        ratio = ours[1:255] / theirs[1:255]  # per block: ours smaller on non-planar patches only
        assert (0.86 if spacing == (1.0, 1.0, 1.0) else 0.65) < ratio.min() and ratio.max() < 1 + 1e-6
