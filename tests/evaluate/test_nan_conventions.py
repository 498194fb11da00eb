"""nnU-Net's conventions for empty masks: NaN per case, NaN-skipping means, strict JSON, and
the find-best / postprocessing decisions that empty cases no longer sway."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from autoseg.common.jsonio import load_record, record_to_dict
from autoseg.dataset.io import write_image
from autoseg.evaluate.best import find_best, format_best
from autoseg.evaluate.postprocess import class_dice, determine_postprocessing, keep_largest_foreground
from autoseg.evaluate.summary import Summary, evaluate_folder, format_summary_table
from tests.evaluate.conftest import GEOM, LABELS, make_ref, write_validation

THREE = {**LABELS, "cyst": 3}  # class 3 occurs in no reference and no prediction


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    """case_0 and case_1 hold both classes; case_2 has no lesion (2), predicted without one."""
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    for i in range(3):
        ref = make_ref(i)
        if i == 2:
            ref[ref == 2] = 1
        pred = ref.copy()
        if i == 1:
            pred[3:5, 4:6, 4:5] = 1  # half the lesion missed
        write_image(ref_dir / f"case_{i}.nii.gz", ref, GEOM)
        write_image(pred_dir / f"case_{i}.nii.gz", pred, GEOM)
    return pred_dir, ref_dir


def test_both_empty_is_nan_and_means_skip_it(tmp_path: Path) -> None:
    pred_dir, ref_dir = _folders(tmp_path)
    s = evaluate_folder(pred_dir, ref_dir, THREE, ".nii.gz", show_progress=False)
    empty = {c.case_id: c.metrics[2] for c in s.cases}["case_2"]
    assert all(math.isnan(v) for v in (empty.dice, empty.iou, empty.nsd, empty.hd95))
    lesion = [c.metrics[2].dice for c in s.cases[:2]]
    assert lesion[0] == 1.0 and 0 < lesion[1] < 1
    assert s.mean[2].dice == pytest.approx(np.mean(lesion))  # not (1 + d + 1) / 3 as with "empty = 1"
    assert (s.mean[2].n_cases, s.mean[2].n_dice, s.mean[2].n_hd95) == (3, 2, 2)
    assert math.isnan(s.mean[3].dice) and s.mean[3].n_dice == 0  # absent everywhere
    # nnU-Net's foreground mean is the plain mean of the class means: NaN with class 3
    assert math.isnan(s.foreground_dice)
    two = evaluate_folder(pred_dir, ref_dir, LABELS, ".nii.gz", output_file=tmp_path / "two.json",
                          show_progress=False)
    assert two.foreground_dice == pytest.approx((two.mean[1].dice + two.mean[2].dice) / 2)
    table = format_summary_table(s)
    cyst_row = next(line for line in table.splitlines() if line.startswith("cyst (3)"))
    assert cyst_row.split()[2:6] == ["n/a"] * 4 and cyst_row.split()[6:] == ["3", "3", "0"]
    assert "nan" not in table


def test_summary_json_is_strict_and_round_trips_nan(tmp_path: Path) -> None:
    pred_dir, ref_dir = _folders(tmp_path)
    s = evaluate_folder(pred_dir, ref_dir, THREE, ".nii.gz", show_progress=False)
    text = (pred_dir / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    raw = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert raw["schema_version"] == 2
    assert raw["cases"][2]["metrics"]["2"]["dice"] is None and raw["mean"]["3"]["dice"] is None
    back = load_record(pred_dir / "summary.json", Summary)
    assert math.isnan(back.cases[2].metrics[2].dice) and math.isnan(back.mean[3].nsd)
    assert back.mean[2] == s.mean[2] and back.cases[0] == s.cases[0]


def test_version_1_summary_is_migrated(tmp_path: Path) -> None:
    """A v1 file scored the absent lesion 1 (and HD95 0); reading it applies the NaN rule and redoes the means."""
    pred_dir, ref_dir = _folders(tmp_path)
    s = evaluate_folder(pred_dir, ref_dir, LABELS, ".nii.gz", show_progress=False)
    v1 = record_to_dict(s)
    v1["schema_version"] = 1
    for m in v1["mean"].values():
        m.pop("n_dice")
    v1["foreground_mean"].pop("n_dice")
    v1["cases"][2]["metrics"]["2"].update(dice=1.0, iou=1.0, nsd=1.0, hd95=0.0)
    v1["mean"]["2"]["dice"] = (1.0 + s.cases[1].metrics[2].dice + 1.0) / 3
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    migrated = load_record(tmp_path / "v1.json", Summary)
    assert math.isnan(migrated.cases[2].metrics[2].dice) and math.isnan(migrated.cases[2].metrics[2].hd95)
    assert migrated.mean == s.mean and migrated.foreground_mean == s.foreground_mean


def _island_cases() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Case 0: the lesion (2) is a separate component of the truth. Cases 1-2: no lesion, but a
    stray lesion island is predicted. Keeping the largest foreground component removes both."""
    segs, refs = [], []
    for i in range(3):
        ref = np.zeros((12, 16, 16), np.uint8)
        ref[1:7, 1:9, 1:9] = 1
        if i == 0:
            ref[9:11, 12:14, 12:14] = 2
        pred = ref.copy()
        if i > 0:
            pred[9:11, 12:14, 12:14] = 2
        segs.append(pred)
        refs.append(ref)
    return segs, refs


def test_postprocessing_no_longer_swayed_by_cases_without_the_class() -> None:
    segs, refs = _island_cases()
    after = [keep_largest_foreground(s) for s in segs]

    def old_mean(pairs: list, v: int) -> float:  # the former rule: both empty = Dice 1, plain mean
        return float(np.mean([1.0 if not (s == v).any() and not (r == v).any() else class_dice(s, r, [v])[v]
                              for s, r in pairs]))

    # with "empty = 1", removing two islands gains +2 and outweighs losing the real lesion
    assert old_mean(list(zip(after, refs)), 2) > old_mean(list(zip(segs, refs)), 2)
    assert old_mean(list(zip(after, refs)), 1) == old_mean(list(zip(segs, refs)), 1)
    d = determine_postprocessing(segs, refs, [1, 2])
    assert not d.rules.keep_largest_foreground
    assert d.dice_before[2] == pytest.approx(1 / 3)  # nanmean(1, 0, 0)
    assert d.dice_after == d.dice_before


def _block(lo: tuple[int, int, int], hi: tuple[int, int, int]) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def test_find_best_no_longer_swayed_by_cases_without_the_class(paths, tmp_path: Path) -> None:
    """Config A: organ Dice 0.8, lesion 0.857; B: organ 0.9, lesion 0.667. The lesion is in case 0
    only and both configs leave it out elsewhere. Scoring those 3 empty cases as 1 would pick B."""
    organ = _block((0, 0, 0), (4, 10, 5))  # 200 voxels, in GEOM's (10, 12, 12)
    lesion = _block((6, 8, 8), (10, 12, 12))  # 64 voxels
    refs, pred_a, pred_b = {}, {}, {}
    for i in range(4):
        ref = np.zeros(GEOM.shape, np.uint8)
        ref[organ] = 1
        if i == 0:
            ref[lesion] = 2
        refs[f"c{i}"] = tmp_path / "ref" / f"c{i}.nii.gz"
        write_image(refs[f"c{i}"], ref, GEOM)
        a, b = np.zeros_like(ref), np.zeros_like(ref)
        a[_block((0, 2, 0), (4, 12, 5))] = 1  # organ overlap 160 of 200: Dice 0.8
        b[_block((0, 1, 0), (4, 11, 5))] = 1  # 180 of 200: Dice 0.9
        if i == 0:
            a[_block((6, 8, 8), (10, 12, 11))] = 2  # 48 of 64: Dice 96/112
            b[_block((6, 8, 8), (8, 12, 12))] = 2  # 32 of 64: Dice 64/96
        pred_a[f"c{i}"], pred_b[f"c{i}"] = a, b
    ds = "Dataset123_Toy"
    for config, preds in (("A", pred_a), ("B", pred_b)):
        for fold, ids in ((0, ["c0", "c1"]), (1, ["c2", "c3"])):
            write_validation(paths, ds, config, fold, refs, {k: preds[k] for k in ids})
    best = find_best(paths, ds)
    dice = {c.configs: c for c in best.candidates}
    assert dice[("A",)].class_dice == pytest.approx({1: 0.8, 2: 96 / 112})
    assert dice[("B",)].class_dice == pytest.approx({1: 0.9, 2: 64 / 96})
    assert best.configs == ("A",) and best.cv_dice == pytest.approx((0.8 + 96 / 112) / 2)
    old = {k: (c.class_dice[1] + (c.class_dice[2] + 3) / 4) / 2 for k, c in dice.items()}
    assert old[("B",)] > old[("A",)]  # what "empty = 1" would have ranked
    assert "A" in format_best(best).splitlines()[-2]
