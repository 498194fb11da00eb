"""`autoseg demo`, the README's main command, with a one-epoch schedule: every stage runs for real."""

from __future__ import annotations

from pathlib import Path

import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from autoseg.cli import cli
from autoseg.common.jsonio import load_record
from autoseg.evaluate.summary import Summary

QUICK = ["--set", "epochs=1", "--set", "iterations_per_epoch=2", "--set", "val_iterations=1",
         "--set", "final_validation=no_mirroring", "-j", "1", "--quiet"]
"""One epoch of two steps; the fold's validation of all 24 cases without its 8 mirrored passes (the
held-out prediction keeps them), so every stage runs for real in about half the time."""


def test_demo_generates_plans_trains_predicts_and_evaluates(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    first = CliRunner().invoke(cli, ["demo", "--workdir", str(workdir), "--device", "cpu", *QUICK])
    assert first.exit_code == 0, first.output
    assert "held-out evaluation (4 cases" in first.output and "Dice" in first.output
    raw = workdir / "raw" / "Dataset999_Phantom"
    assert len(list((raw / "imagesTr").glob("*.nii.gz"))) == 24 and len(list((raw / "imagesTs").iterdir())) == 4
    fold = workdir / "results" / "Dataset999_Phantom" / "3d_fullres" / "default" / "fold_all"
    assert (fold / "checkpoint_final.pt").is_file() and (fold / "progress.png").is_file()
    assert len(load_record(fold / "validation" / "summary.json", Summary).cases) == 24  # fold "all" validates all
    predictions = workdir / "results" / "Dataset999_Phantom" / "demo_predictions"
    summary = load_record(predictions / "summary.json", Summary)
    assert len(summary.cases) == 4
    # two iterations teach little (held-out foreground Dice 0.010 measured), so check that the
    # table is the truth about the files rather than a quality floor
    for case in summary.cases:
        predicted = sitk.GetArrayFromImage(sitk.ReadImage(case.prediction))
        reference = sitk.GetArrayFromImage(sitk.ReadImage(case.reference))
        for label, metrics in case.metrics.items():
            p, r = predicted == label, reference == label
            assert (metrics.tp, metrics.n_pred, metrics.n_ref) == ((p & r).sum(), p.sum(), r.sum())
            expected = 2 * (p & r).sum() / (p.sum() + r.sum()) if p.sum() + r.sum() else 1.0
            assert metrics.dice == pytest.approx(expected)
    finished = {p: p.read_bytes() for p in (fold / "checkpoint_final.pt", fold / "validation" / "summary.json")}

    again = CliRunner().invoke(cli, ["demo", "--workdir", str(workdir), "--device", "cpu", *QUICK])
    assert again.exit_code == 0, again.output  # reuses dataset, plan, data and the finished model
    assert {p: p.read_bytes() for p in finished} == finished  # the finished model is neither retrained nor re-validated
    assert load_record(predictions / "summary.json", Summary).foreground_dice == summary.foreground_dice
