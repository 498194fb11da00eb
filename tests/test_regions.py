"""Region-based training end to end (issue 10, part 2), through the CLI on the CPU.

A generated two-channel phantom with nested regions (whole > core > enhancing) goes through
plan, preprocess, a tiny training with its validation, predict (with probabilities), evaluate
and find-best; real Hippocampus cases declared as regions (whole = 1 + 2, posterior = 2) train a
few iterations. Each run checks the files it wrote: label maps hold only regions_class_order
values, the label map is the probabilities' regions_class_order map, and every region Dice in
summary.json equals a recount from the written masks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from autoseg.common.jsonio import load_record
from autoseg.common.paths import Paths
from autoseg.dataset.io import read_image
from autoseg.dataset.phantom import PhantomRecipe, make_region_phantom_dataset
from autoseg.dataset.spec import LabelScheme
from autoseg.evaluate.best import load_best
from autoseg.evaluate.summary import Summary
from autoseg.train.checkpoint import load_checkpoint
from tests.helpers import (HIPPOCAMPUS_MISSING, hippocampus_available, hippocampus_case_ids,
                           link_hippocampus_subset, run_cli_ok)

TINY = ["epochs=2", "iterations_per_epoch=3", "val_iterations=1", "batch_size=2", "num_workers=0"]


def _sets(pairs: list[str]) -> list[str]:
    return [a for kv in pairs for a in ("--set", kv)]


def recount_region_dice(summary: Summary, pred_dir: Path) -> None:
    """Every case's and every mean region Dice of ``summary`` equals a numpy recount of the mask files."""
    regions = LabelScheme.from_labels(summary.labels).eval_targets
    assert summary.cases and list(summary.mean) == list(regions)
    per_region: dict[str | int, list[float]] = {k: [] for k in regions}
    for case in summary.cases:
        pred = read_image(pred_dir / Path(case.prediction).name)[0]
        ref = read_image(case.reference)[0]
        for name, values in regions.items():
            p, r = np.isin(pred, values), np.isin(ref, values)
            total = int(p.sum() + r.sum())
            dice = 1.0 if total == 0 else 2 * int((p & r).sum()) / total
            assert case.metrics[name].dice == pytest.approx(dice, abs=1e-9), (case.case_id, name)
            per_region[name].append(dice)
    for name, values in per_region.items():
        assert summary.mean[name].dice == pytest.approx(float(np.mean(values)), abs=1e-9)
    assert summary.foreground_dice == pytest.approx(float(np.mean([np.mean(v) for v in per_region.values()])))


@pytest.mark.slow
def test_nested_regions_phantom_through_the_cli(tmp_path: Path) -> None:
    paths = Paths.under(tmp_path)
    raw = make_region_phantom_dataset(paths.raw, PhantomRecipe(num_training=6, num_test=2, shape=(12, 40, 40)))
    name = raw.name
    run_cli_ok(paths, "plan", "997", "--configs", "3d_fullres")
    run_cli_ok(paths, "preprocess", "997", "--configs", "3d_fullres")
    run_cli_ok(paths, "train", "997", "3d_fullres", "0", "--quiet", "--device", "cpu", *_sets(TINY))
    fold = paths.results / name / "3d_fullres" / "default" / "fold_0"
    ckpt = load_checkpoint(fold / "checkpoint_final.pt")
    assert ckpt.num_classes == 3 and ckpt.plan.regions_class_order == (1, 2, 3)  # one sigmoid head per region
    log = [json.loads(line) for line in (fold / "training_log.jsonl").read_text().splitlines()]
    assert all(len(e["pseudo_dice"]) == 3 for e in log)  # online pseudo-Dice per region
    validation = load_record(fold / "validation" / "summary.json", Summary)
    recount_region_dice(validation, fold / "validation")

    out = tmp_path / "pred"
    run_cli_ok(paths, "predict", "-d", "997", "-c", "3d_fullres", "-f", "0", "-i", str(raw / "imagesTs"),
               "-o", str(out), "--save-probabilities", "--device", "cpu")
    scheme = ckpt.plan.label_scheme
    for case in ("regions_006", "regions_007"):
        seg, geom = read_image(out / f"{case}.nii.gz")
        _, ref_geom = read_image(raw / "labelsTs" / f"{case}.nii.gz")
        assert geom.same_grid(ref_geom)
        assert set(np.unique(seg).tolist()) <= {0, 1, 2, 3}
        probs = np.load(out / f"{case}.npz")["probabilities"].astype(np.float32)
        assert probs.shape == (3, *seg.shape) and probs.min() >= 0 and probs.max() <= 1
        # the written map is the regions_class_order map of the saved (float16) probabilities
        assert np.mean(scheme.label_map(probs) != seg) < 1e-3
    record = json.loads((out / "regions_006.json").read_text())
    assert record["regions_class_order"] == [1, 2, 3] and record["labels"]["whole"] == [1, 2, 3]

    run_cli_ok(paths, "evaluate", "--pred", str(out), "--ref", str(raw / "labelsTs"), "-d", "997")
    summary = load_record(out / "summary.json", Summary)
    assert list(summary.mean) == ["whole", "core", "enhancing"]
    recount_region_dice(summary, out)

    run_cli_ok(paths, "find-best", "997", "-c", "3d_fullres")
    best = load_best(paths.results / name / "best.json")
    assert set(best.class_dice_postprocessed) == {"whole", "core", "enhancing"}
    assert best.postprocessing.keep_largest_classes == ()  # regions are filtered as regions, never as classes
    assert set(best.postprocessing.keep_largest_regions) <= {(1, 2, 3), (2, 3), (3,)}


@pytest.mark.slow
def test_real_hippocampus_as_regions_trains_a_few_iterations(tmp_path: Path) -> None:
    if not hippocampus_available():
        pytest.skip(HIPPOCAMPUS_MISSING)
    paths = Paths.under(tmp_path)
    raw = link_hippocampus_subset(paths.raw, hippocampus_case_ids(6))
    meta = json.loads((raw / "dataset.json").read_text())
    meta.update(labels={"background": 0, "whole": [1, 2], "posterior": 2}, regions_class_order=[1, 2])
    (raw / "dataset.json").write_text(json.dumps(meta))
    run_cli_ok(paths, "plan", "4", "--configs", "3d_fullres", "--set", "3d_fullres.patch_size=24,32,24")
    run_cli_ok(paths, "preprocess", "4", "--configs", "3d_fullres")
    run_cli_ok(paths, "train", "4", "3d_fullres", "0", "--quiet", "--device", "cpu", *_sets(TINY))
    fold = paths.results / raw.name / "3d_fullres" / "default" / "fold_0"
    assert load_checkpoint(fold / "checkpoint_final.pt").num_classes == 2
    validation = load_record(fold / "validation" / "summary.json", Summary)
    assert list(validation.mean) == ["whole", "posterior"]
    recount_region_dice(validation, fold / "validation")
    for case in validation.cases:  # label maps by regions_class_order: whole -> 1, posterior -> 2
        assert set(np.unique(read_image(fold / "validation" / Path(case.prediction).name)[0]).tolist()) <= {0, 1, 2}
