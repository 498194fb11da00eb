"""Regions evaluated as regions: summary.json per region name, postprocessing per region."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autoseg.common.jsonio import load_record, record_to_dict
from autoseg.evaluate.postprocess import PostprocessingRules, apply_postprocessing, determine_postprocessing
from autoseg.evaluate.summary import Summary, evaluate_folder, format_summary_table
from tests.evaluate.conftest import make_ref

REGIONS = {"background": 0, "whole": [1, 2], "inner": 2}


def _dice(p: np.ndarray, r: np.ndarray) -> float:
    total = int(p.sum() + r.sum())
    return 1.0 if total == 0 else 2 * int((p & r).sum()) / total


def test_summary_scores_each_region_on_its_masks(eval_folders: tuple[Path, Path]) -> None:
    pred, ref = eval_folders  # case_1: class 2 predicted as 1 (inner region lost, whole intact)
    summary = evaluate_folder(pred, ref, REGIONS, ".nii.gz", show_progress=False)
    assert list(summary.mean) == ["whole", "inner"]
    for case in summary.cases:
        i = int(case.case_id[-1])
        r = make_ref(i)
        p = r.copy()
        if i == 1:
            p[p == 2] = 1
        if i == 2:
            p[8:10, 0:2, 0:2] = 1
        assert case.metrics["whole"].dice == _dice(p > 0, r > 0)
        assert case.metrics["inner"].dice == _dice(p == 2, r == 2)
    assert summary.cases[1].metrics["whole"].dice == 1.0 and summary.cases[1].metrics["inner"].dice == 0.0
    again = load_record(pred / "summary.json", Summary)  # region names survive the round trip, class keys stay ints
    assert again.labels == {"background": 0, "whole": (1, 2), "inner": 2} and again.mean == summary.mean
    assert [c.metrics["inner"].dice for c in again.cases] == [c.metrics["inner"].dice for c in summary.cases]
    assert set(record_to_dict(again)["mean"]) == {"whole", "inner"}
    assert "whole" in format_summary_table(summary) and "inner" in format_summary_table(summary)
    classes = evaluate_folder(pred, ref, {"background": 0, "a": 1, "b": 2}, ".nii.gz", show_progress=False,
                              output_file=pred / "classes.json")
    assert list(load_record(pred / "classes.json", Summary).mean) == [1, 2] == list(classes.mean)


def test_region_postprocessing_keeps_each_regions_largest_component() -> None:
    refs, segs = [], []
    for i in range(3):
        r = make_ref(i)
        p = r.copy()
        p[0, 0:2, 0:2] = 2  # an island of the inner region (also part of "whole")
        refs.append(r)
        segs.append(p)
    decision = determine_postprocessing(segs, refs, {"whole": (1, 2), "inner": (2,)})
    assert decision.rules.keep_largest_foreground and decision.rules.keep_largest_classes == ()
    assert decision.dice_after == {"whole": 1.0, "inner": 1.0} and decision.dice_before["inner"] < 1.0
    island = make_ref(0)
    island[0, 0:2, 0:2] = 2
    island[9, 10:12, 10:12] = 1
    out = apply_postprocessing(island, PostprocessingRules(keep_largest_regions=((2,),)))
    assert out[0, 0, 0] == 0 and out[9, 10, 10] == 1  # only the inner region's island goes
    np.testing.assert_array_equal(out[1:9], make_ref(0)[1:9])
