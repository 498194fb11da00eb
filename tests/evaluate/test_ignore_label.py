"""Evaluation against sparse references: voxels that are 'ignore' in the reference count for nothing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from autoseg.dataset.io import write_image
from autoseg.evaluate.metrics import case_metrics, class_metrics
from autoseg.evaluate.summary import evaluate_folder, format_summary_table
from tests.evaluate.conftest import GEOM, LABELS, make_ref

IGNORE = 3
SPARSE = {**LABELS, "ignore": IGNORE}
SPACING = GEOM.spacing


def _sparse_ref(case: int) -> np.ndarray:
    """make_ref with slices z >= 5 unannotated (they cut through the organ)."""
    ref = make_ref(case)
    ref[5:] = IGNORE
    return ref


def test_predictions_on_ignore_voxels_are_neither_fp_nor_fn() -> None:
    dense = make_ref(0)
    ref = _sparse_ref(0)
    pred = dense.copy()
    pred[5:] = 2  # wildly wrong, but only where the reference is unannotated
    m = case_metrics(pred, ref, SPACING, [1, 2], ignore_label=IGNORE)
    annotated = ref != IGNORE
    for v in (1, 2):
        expected = class_metrics((dense == v) & annotated, ref == v, SPACING)
        assert m[v] == expected
        assert (m[v].dice, m[v].fp, m[v].fn, m[v].hd95, m[v].nsd) == (1.0, 0, 0, 0.0, 1.0)
    # the same prediction against the sparse reference without the rule: class 2 floods the ignore slices
    naive = case_metrics(pred, ref, SPACING, [1, 2])
    assert naive[2].fp == np.count_nonzero(ref == IGNORE) and naive[2].dice < 0.1


def test_tp_fp_fn_follow_the_annotated_voxels_only() -> None:
    ref = _sparse_ref(0)
    pred = np.zeros_like(ref)
    pred[2:10, 3:9, 3:7] = 1  # covers part of the organ, in and out of the annotated slices
    m = case_metrics(pred, ref, SPACING, [1], ignore_label=IGNORE)[1]
    annotated = ref != IGNORE
    p, r = (pred == 1) & annotated, ref == 1
    assert (m.tp, m.fp, m.fn) == (np.count_nonzero(p & r), np.count_nonzero(p & ~r), np.count_nonzero(~p & r))
    assert m.n_pred == np.count_nonzero(p) and math.isfinite(m.hd95)


def test_the_ignore_label_is_not_a_class_to_evaluate() -> None:
    ref = _sparse_ref(0)
    with pytest.raises(ValueError, match="ignore label 3"):
        case_metrics(ref, ref, SPACING, [1, 2, 3], ignore_label=IGNORE)


def test_evaluate_folder_with_an_ignore_label(tmp_path: Path) -> None:
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    for i in range(2):
        pred = make_ref(i)
        pred[5:] = 1  # organ everywhere in the unannotated slices
        write_image(ref_dir / f"case_{i}.nii.gz", _sparse_ref(i), GEOM)
        write_image(pred_dir / f"case_{i}.nii.gz", pred, GEOM)
    summary = evaluate_folder(pred_dir, ref_dir, SPARSE, ".nii.gz", show_progress=False)
    assert sorted(summary.mean) == [1, 2] and all(sorted(c.metrics) == [1, 2] for c in summary.cases)
    assert summary.foreground_dice == 1.0 and summary.labels == SPARSE
    table = format_summary_table(summary)
    assert "excluded from every metric" in table and "ignore (3)" not in table
    dense = evaluate_folder(pred_dir, ref_dir, LABELS, ".nii.gz", output_file=tmp_path / "dense.json",
                            show_progress=False)
    assert dense.foreground_dice < 1.0 and "ignore" not in format_summary_table(dense)
