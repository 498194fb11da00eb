"""Recompute a validation's Dice from the files it wrote, independently of autoseg's evaluation code.

A test that only asserts ``0 <= dice <= 1`` passes whatever the evaluation computes; comparing
summary.json with a plain numpy recount of the prediction and reference masks catches a wrong
pairing, a wrong label, a resampled or shifted prediction, or a broken mean.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk


def dice_of_files(prediction: str | Path, reference: str | Path, label: int) -> float:
    """2|P∩R| / (|P|+|R|) of one label value; NaN when both masks are empty (nnU-Net's and autoseg's convention)."""
    p = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction))) == label
    r = sitk.GetArrayFromImage(sitk.ReadImage(str(reference))) == label
    assert p.shape == r.shape, (prediction, p.shape, r.shape)
    total = int(p.sum()) + int(r.sum())
    return float("nan") if total == 0 else 2.0 * int((p & r).sum()) / total


def check_summary_against_files(validation_dir: Path, summary) -> dict[str, dict[int, float]]:  # type: ignore[no-untyped-def]
    """Assert every case's Dice, the per-class means and the foreground mean of ``summary`` (a
    `autoseg.evaluate.summary.Summary` of ``validation_dir``) equal a recount from the files; returns
    the recounted Dice per case and label."""
    recount: dict[str, dict[int, float]] = {}
    assert summary.cases
    for case in summary.cases:
        prediction = Path(validation_dir) / Path(case.prediction).name
        assert prediction.is_file(), prediction
        recount[case.case_id] = {v: dice_of_files(prediction, case.reference, v) for v in case.metrics}
        for v, m in case.metrics.items():
            expected = recount[case.case_id][v]
            assert np.isclose(m.dice, expected, atol=1e-6, equal_nan=True), (case.case_id, v, m.dice, expected)
    labels = sorted(summary.mean)
    class_means = {v: float(np.nanmean([recount[c][v] for c in recount])) for v in labels}
    for v in labels:
        assert np.isclose(summary.mean[v].dice, class_means[v], atol=1e-6, equal_nan=True), (v, summary.mean[v].dice,
                                                                                             class_means[v])
    assert np.isclose(summary.foreground_dice, float(np.mean(list(class_means.values()))), atol=1e-6, equal_nan=True)
    return recount
