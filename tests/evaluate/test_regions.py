"""Regions evaluated as regions: summary.json per region name, postprocessing per region."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from autoseg.common.jsonio import load_record, record_to_dict
from autoseg.evaluate.postprocess import (PostprocessingRules, apply_postprocessing, class_dice, determine_postprocessing,
                                          keep_largest_foreground, keep_largest_of_class, nanmean)
from autoseg.evaluate.summary import Summary, evaluate_folder, format_summary_table
from tests.evaluate.conftest import make_pred, make_ref

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
        r, p = make_ref(i), make_pred(i)
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


def _sequential_decision(segs: list[np.ndarray], refs: list[np.ndarray],
                         targets: dict[str, tuple[int, ...]]) -> tuple[bool, tuple[tuple[int, ...], ...]]:
    """nnU-Net's two steps on label maps held in memory, every rule re-scored on every region."""
    def means(maps: list[np.ndarray]) -> dict[str, float]:
        per = [class_dice(s, r, targets) for s, r in zip(maps, refs)]
        return {k: nanmean(d[k] for d in per) for k in targets}

    def better(after: dict[str, float], before: dict[str, float], target: list[str]) -> bool:
        gain = nanmean(after[k] for k in target) - nanmean(before[k] for k in target)
        return gain > 1e-6 and not any(after[k] < before[k] - 1e-6 for k in before)

    current, scores = list(segs), means(segs)
    cand = [keep_largest_foreground(s) for s in current]
    fg = better(means(cand), scores, list(targets))
    if fg:
        current, scores = cand, means(cand)
    kept = []
    for name, values in targets.items():
        cand = [keep_largest_of_class(s, values) for s in current]
        if better(means(cand), scores, [name]):
            current, scores = cand, means(cand)
            kept.append(values)
    return fg, tuple(kept)


def test_streamed_region_decision_equals_the_in_memory_sequential_one() -> None:
    """Nested regions overlap: a region's rule changes the other regions' Dice. The streamed tally
    (every rule combination per case) must decide as the sequential in-memory procedure does."""
    targets = {"whole": (1, 2, 3), "core": (2, 3), "enhancing": (3,)}
    rng = np.random.default_rng(0)
    adopted = set()
    for trial in range(12):
        segs, refs = [], []
        for _ in range(4):
            ref = np.zeros((10, 14, 14), np.uint8)
            ref[2:8, 2:10, 2:10] = 1
            ref[3:7, 3:8, 3:8] = 2
            ref[4:6, 4:6, 4:6] = 3
            seg = ref.copy()
            for _ in range(int(rng.integers(0, 4))):  # stray islands of random labels, some inside truth
                z, y, x = rng.integers(0, 9), rng.integers(0, 12), rng.integers(11, 13) if rng.random() < 0.7 else 5
                seg[z:z + 1, y:y + 2, x:x + 2] = rng.integers(1, 4)
            if rng.random() < 0.3:
                ref[0, 12:14, 12:14] = int(rng.integers(1, 4))  # a true separate component
            segs.append(seg)
            refs.append(ref)
        decision = determine_postprocessing(iter(segs), iter(refs), targets)
        fg, regions = _sequential_decision(segs, refs, targets)
        assert (decision.rules.keep_largest_foreground, decision.rules.keep_largest_regions) == (fg, regions), trial
        assert decision.rules.keep_largest_classes == ()
        adopted.add((fg, regions))
    assert len(adopted) > 1  # the trials exercise more than one outcome


def test_version_1_region_summary_is_migrated(eval_folders: tuple[Path, Path], tmp_path: Path) -> None:
    """A region summary.json written before the NaN conventions (schema 1) keeps its regions on migration."""
    pred, ref = eval_folders
    s = evaluate_folder(pred, ref, REGIONS, ".nii.gz", show_progress=False, output_file=tmp_path / "s.json")
    v1 = record_to_dict(s)
    v1["schema_version"] = 1
    for m in (*v1["mean"].values(), v1["foreground_mean"]):
        m.pop("n_dice")
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    migrated = load_record(tmp_path / "v1.json", Summary)
    assert migrated.labels == s.labels and list(migrated.mean) == ["whole", "inner"]
    assert migrated.mean == s.mean and migrated.foreground_mean == s.foreground_mean
