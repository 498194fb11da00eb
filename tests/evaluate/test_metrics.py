"""Metrics with known answers: offset cubes, anisotropic spacing, empty masks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from autoseg.evaluate.metrics import (
    class_metrics,
    case_metrics,
    hausdorff_distance,
    normalized_surface_dice,
    surface,
)


def cube(shape=(30, 30, 30), lo=(10, 10, 10), size=10):
    m = np.zeros(shape, bool)
    m[lo[0]:lo[0] + size, lo[1]:lo[1] + size, lo[2]:lo[2] + size] = True
    return m


def test_offset_cubes_dice_iou_and_counts():
    a, b = cube(), cube(lo=(10, 10, 13))  # shifted 3 voxels along x
    m = class_metrics(b, a, (1.0, 1.0, 1.0))
    # overlap 10 * 10 * 7 = 700 of 1000 each
    assert (m.tp, m.fp, m.fn) == (700, 300, 300)
    assert m.dice == pytest.approx(2 * 700 / 2000)
    assert m.iou == pytest.approx(700 / 1300)
    assert (m.n_pred, m.n_ref) == (1000, 1000)


def test_offset_cubes_hausdorff_is_the_shift_in_mm():
    a, b = cube(), cube(lo=(10, 10, 13))
    assert hausdorff_distance(b, a, (1, 1, 1), percentile=100) == pytest.approx(3.0)
    hd95 = hausdorff_distance(b, a, (1, 1, 1))
    assert 0 < hd95 <= 3.0
    # the same shift along x measured with 2 mm x-spacing is twice as far
    assert hausdorff_distance(b, a, (1, 1, 2.0), percentile=100) == pytest.approx(6.0)
    # a coarse z spacing does not change a shift along x
    assert hausdorff_distance(b, a, (3.0, 1, 1), percentile=100) == pytest.approx(3.0)


def test_anisotropic_spacing_scales_hd95():
    a, b = cube(), cube(lo=(13, 10, 10))  # shift along z
    iso = class_metrics(b, a, (1.0, 1.0, 1.0))
    aniso = class_metrics(b, a, (2.5, 1.0, 1.0))
    assert aniso.hd95 == pytest.approx(2.5 * iso.hd95)
    assert aniso.dice == iso.dice  # overlap does not depend on spacing


def test_identical_masks():
    a = cube()
    m = class_metrics(a, a, (1.0, 2.0, 0.5))
    assert (m.dice, m.iou, m.hd95, m.nsd) == (1.0, 1.0, 0.0, 1.0)


def test_nsd_tolerance():
    a, b = cube(), cube(lo=(10, 10, 13))
    assert normalized_surface_dice(b, a, (1, 1, 1), tolerance_mm=3.0) == pytest.approx(1.0)
    low = normalized_surface_dice(b, a, (1, 1, 1), tolerance_mm=0.5)
    mid = normalized_surface_dice(b, a, (1, 1, 1), tolerance_mm=1.5)
    assert 0 < low < mid < 1.0
    assert class_metrics(b, a, (1, 1, 1), tolerance_mm=1.5).nsd == pytest.approx(mid)


def test_empty_conventions():
    empty = np.zeros((8, 8, 8), bool)
    both = class_metrics(empty, empty, (1, 1, 1))
    assert all(math.isnan(v) for v in (both.dice, both.iou, both.hd95, both.nsd))  # 0/0, as nnU-Net
    assert (both.tp, both.fp, both.fn, both.n_pred, both.n_ref) == (0, 0, 0, 0, 0)
    one = class_metrics(cube((8, 8, 8), (2, 2, 2), 3), empty, (1, 1, 1))
    assert (one.dice, one.iou, one.nsd) == (0.0, 0.0, 0.0)
    assert math.isnan(one.hd95)
    assert (one.fp, one.fn) == (27, 0)
    other = class_metrics(empty, cube((8, 8, 8), (2, 2, 2), 3), (1, 1, 1))
    assert math.isnan(other.hd95) and other.fn == 27


def test_surface_of_cube_and_border():
    a = cube((12, 12, 12), (1, 1, 1), 10)
    s = surface(a)
    assert s.sum() == 1000 - 8 ** 3
    full = np.ones((4, 4, 4), bool)  # touching the border: the border is a surface
    assert surface(full).sum() == 64 - 8


def test_case_metrics_per_label():
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[2:5, 2:5, 2:5] = 1
    ref[6:9, 6:9, 6:9] = 2
    pred = ref.copy()
    pred[6:9, 6:9, 6:9] = 0
    out = case_metrics(pred, ref, (1, 1, 1), [1, 2])
    assert out[1].dice == 1.0 and out[2].dice == 0.0 and math.isnan(out[2].hd95)
