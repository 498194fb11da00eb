"""Largest-component postprocessing and its cross-validation decision."""

from __future__ import annotations

import numpy as np

from autoseg.evaluate.postprocess import (
    PostprocessingRules,
    apply_postprocessing,
    determine_postprocessing,
    keep_largest_foreground,
    keep_largest_of_class,
)


def _case(stray: bool) -> tuple[np.ndarray, np.ndarray]:
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[2:8, 2:8, 2:8] = 1
    ref[4:6, 4:6, 4:6] = 2
    pred = ref.copy()
    if stray:
        pred[10:12, 10:12, 10:12] = 1  # a false-positive island
    return pred, ref


def test_keep_largest_foreground_and_class():
    pred, ref = _case(stray=True)
    assert np.array_equal(keep_largest_foreground(pred), ref)
    two = np.zeros((5, 5, 5), np.uint8)
    two[0, 0, 0] = 2
    two[2:4, 2:4, 2:4] = 2
    two[4, 4, 0] = 1
    out = keep_largest_of_class(two, 2)
    assert out[0, 0, 0] == 0 and out[2, 2, 2] == 2 and out[4, 4, 0] == 1
    # a diagonal neighbour is connected (26-connectivity)
    diag = np.zeros((3, 3, 3), np.uint8)
    diag[0, 0, 0] = diag[1, 1, 1] = 1
    assert np.array_equal(keep_largest_foreground(diag), diag)


def test_rule_adopted_when_it_helps():
    pairs = [_case(True), _case(True), _case(False)]
    d = determine_postprocessing([p for p, _ in pairs], [r for _, r in pairs], [1, 2])
    assert d.rules.keep_largest_foreground
    assert d.dice_after[1] > d.dice_before[1] and d.dice_after[2] == d.dice_before[2]


def test_rule_rejected_when_it_hurts():
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[1:5, 1:5, 1:5] = 1
    ref[7:11, 7:11, 7:11] = 1  # the truth has two components
    d = determine_postprocessing([ref.copy()], [ref], [1])
    assert d.rules == PostprocessingRules()
    assert d.rules.is_noop and d.dice_after == d.dice_before


def test_apply_noop_is_identity():
    pred, _ = _case(True)
    assert np.array_equal(apply_postprocessing(pred, PostprocessingRules()), pred)


def test_islands_in_unannotated_voxels_neither_count_nor_decide():
    """Sparse references: a stray island inside the ignore region is no false positive."""
    from autoseg.evaluate.postprocess import class_dice

    pred, ref = _case(stray=True)
    ref[9:12, 9:12, 9:12] = 3  # unannotated corner holding the island
    assert class_dice(pred, ref, [1, 2], ignore_label=3) == {1: 1.0, 2: 1.0}
    assert class_dice(pred, ref, [1, 2])[1] < 1.0  # counted as FP without the ignore label
    segs, refs = [pred] * 3, [ref] * 3
    assert determine_postprocessing(segs, refs, [1, 2]).rules.keep_largest_foreground
    sparse = determine_postprocessing(segs, refs, [1, 2], ignore_label=3)
    assert sparse.rules.is_noop and sparse.dice_before == {1: 1.0, 2: 1.0}
