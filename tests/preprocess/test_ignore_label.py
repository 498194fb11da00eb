"""Preprocessing of sparse labels: resampling keeps the ignore label, foreground sampling skips it."""

from __future__ import annotations

import numpy as np
import pytest

from autoseg.preprocess import preprocess_case, resample_seg
from tests.preprocess.conftest import LABELS, blob_case, make_config, make_plan

SPARSE = {**LABELS, "ignore": 3}


def _sparse_blob() -> tuple[np.ndarray, np.ndarray, object]:
    """The blob case with its upper half (y < 12) unannotated: every class loses part of its voxels."""
    data, seg, geom = blob_case(shape=(10, 24, 20), pad=2)
    seg[:, :12, :] = 3
    return data, seg, geom


@pytest.mark.parametrize("axis", [None, 0])
def test_resampling_keeps_ignore_regions_and_invents_no_label(axis: int | None) -> None:
    seg = np.zeros((8, 16, 16), np.int16)
    seg[:, 4:12, 4:12] = 2
    seg[:, :, :6] = 3  # an unannotated band crossing background and class 2
    out = resample_seg(seg, (11, 23, 21), labels=[0, 1, 2, 3], order=1, axis=axis)
    assert set(np.unique(out).tolist()) == {0, 2, 3}  # no 1 appears between 0/3 and 2
    # the band keeps its extent: 6/16 of the x axis, at 21 voxels -> about 8 columns
    columns = np.flatnonzero((out == 3).all(axis=(0, 1)))
    assert columns.tolist() == list(range(len(columns))) and abs(len(columns) - 6 * 21 / 16) <= 1
    assert not (out[:, :, columns[-1] + 2:] == 3).any()


def test_preprocess_case_keeps_ignore_and_samples_only_annotated_foreground() -> None:
    data, seg, geom = _sparse_blob()
    config = make_config("3d", (0.7, 1.3, 0.9))  # real resampling along every axis
    _, out_seg, props, fg = preprocess_case(data, geom, seg, make_plan([config], labels=SPARSE), config)
    values = set(np.unique(out_seg).tolist())
    assert values == {0, 1, 2, 3} and props.classes_present == (0, 1, 2, 3)
    # the unannotated half stays about half of the (cropped) case
    assert 0.35 < np.mean(out_seg == 3) < 0.65
    assert sorted(fg) == [1, 2]  # no coordinates for the ignore label: oversampling hits annotated voxels
    for c, coords in fg.items():
        assert len(coords) and np.all(out_seg[0][tuple(coords.T)] == c)


def test_dense_plan_still_samples_every_foreground_class() -> None:
    data, seg, geom = blob_case()
    config = make_config("3d", (1.0, 1.0, 1.0))
    _, _, _, fg = preprocess_case(data, geom, seg, make_plan([config]), config)
    assert sorted(fg) == [1, 2]
