"""evaluate_folder, the summary record and the `autoseg evaluate` command."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner

import autoseg.cli
from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import load_record
from autoseg.evaluate.summary import Summary, evaluate_folder, format_summary_table
from tests.evaluate.conftest import LABELS, make_raw_dataset_json


def test_evaluate_folder_known_answers(eval_folders):
    pred, ref = eval_folders
    s = evaluate_folder(pred, ref, LABELS, ".nii.gz", show_progress=False)
    by_case = {c.case_id: c for c in s.cases}
    assert by_case["case_0"].metrics[1].dice == 1.0 and by_case["case_0"].metrics[2].dice == 1.0
    assert by_case["case_1"].metrics[2].dice == 0.0 and math.isnan(by_case["case_1"].metrics[2].hd95)
    assert by_case["case_2"].metrics[1].fp == 8 and by_case["case_2"].metrics[1].dice < 1.0
    # class 2: dice 1, 0, 1 -> mean 2/3; HD95 mean over the 2 defined cases
    assert s.mean[2].dice == pytest.approx(2 / 3)
    assert s.mean[2].n_hd95 == 2 and s.mean[2].hd95 == 0.0
    assert s.foreground_dice == pytest.approx((s.mean[1].dice + s.mean[2].dice) / 2)
    loaded = load_record(pred / "summary.json", Summary)
    assert loaded.mean[2].dice == pytest.approx(s.mean[2].dice)
    assert math.isnan(loaded.cases[1].metrics[2].hd95)
    table = format_summary_table(s)
    assert "organ (1)" in table and "foreground mean" in table


def test_missing_prediction_and_overwrite(eval_folders):
    pred, ref = eval_folders
    (pred / "case_2.nii.gz").unlink()
    with pytest.raises(AutosegError, match="missing prediction .*case_2.nii.gz"):
        evaluate_folder(pred, ref, LABELS, ".nii.gz", show_progress=False)
    s = evaluate_folder(pred, ref, LABELS, ".nii.gz", allow_missing=True, show_progress=False)
    assert [c.case_id for c in s.cases] == ["case_0", "case_1"]
    with pytest.raises(AutosegError, match="exists"):
        evaluate_folder(pred, ref, LABELS, ".nii.gz", allow_missing=True, show_progress=False)


def test_parallel_equals_serial(eval_folders, tmp_path):
    pred, ref = eval_folders
    a = evaluate_folder(pred, ref, LABELS, ".nii.gz", output_file=tmp_path / "a.json", show_progress=False)
    b = evaluate_folder(pred, ref, LABELS, ".nii.gz", output_file=tmp_path / "b.json", num_workers=2,
                        show_progress=False)
    assert [c.metrics[1].dice for c in a.cases] == [c.metrics[1].dice for c in b.cases]


def test_evaluate_cli_table_and_summary(eval_folders, paths):
    pred, ref = eval_folders
    make_raw_dataset_json(paths.raw)
    runner = CliRunner()
    args = ["--raw", str(paths.raw), "evaluate", "--pred", str(pred), "--ref", str(ref), "-d", "123"]
    result = runner.invoke(autoseg.cli.cli, args)
    assert result.exit_code == 0, result.output
    assert "foreground mean" in result.output and "lesion (2)" in result.output
    assert (pred / "summary.json").is_file()
    again = runner.invoke(autoseg.cli.cli, args)
    assert again.exit_code == 2
    assert again.stderr.startswith("error: ") and "--force" in again.stderr
    assert runner.invoke(autoseg.cli.cli, args + ["--force"]).exit_code == 0


def test_evaluate_cli_missing_prediction_is_one_line(eval_folders, paths):
    pred, ref = eval_folders
    (pred / "case_0.nii.gz").unlink()
    make_raw_dataset_json(paths.raw)
    result = CliRunner().invoke(autoseg.cli.cli, ["--raw", str(paths.raw), "evaluate", "--pred", str(pred),
                                                  "--ref", str(ref), "-d", "Dataset123_Toy"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "case_0.nii.gz" in result.stderr
