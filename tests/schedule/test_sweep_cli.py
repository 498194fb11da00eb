"""`autoseg sweep` / `autoseg sweep-report` from the command line: bad files fail before any job, dry runs write nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import autoseg.cli
from autoseg.common.paths import Paths
from tests.helpers import HIPPOCAMPUS_MISSING, hippocampus_available, hippocampus_case_ids, link_hippocampus_subset
from tests.sweep_fixtures import minimal_sweep, write_sweep

pytestmark = pytest.mark.skipif(not hippocampus_available(), reason=HIPPOCAMPUS_MISSING)


@pytest.fixture
def raw_only(paths: Paths) -> Paths:
    """Dataset004_Hippocampus (4 real cases, symlinked), not planned."""
    link_hippocampus_subset(paths.raw, hippocampus_case_ids(4))
    return paths


def _invoke(paths: Paths, *args: str):
    roots = ["--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed), "--results", str(paths.results)]
    return CliRunner().invoke(autoseg.cli.cli, [*roots, *args])


def _nothing_started(paths: Paths) -> bool:
    return not paths.scheduler_dir().exists() and not (paths.results / "sweeps").exists()


@pytest.mark.parametrize("changes,key", [
    ({"grdi": {"lr": [0.01]}}, "grdi"),                            # unknown top-level key
    ({"grid": {"lr": [0.01], "augment.mirorr": [True]}}, "grid.augment.mirorr"),  # unknown trainer key
    ({"grid": {"lr": ["fast"]}}, "grid.lr"),                        # wrong type
    ({"grid": {"lr": [], "augment.mirror": [True]}}, "grid.lr"),    # empty grid axis
    ({"variants": {"again": {"lr": 0.003}}}, "variants.again"),     # duplicate variant
    ({"datasets": ["Dataset042_Nothing"]}, "datasets"),             # unknown dataset
    ({"variants": {"p": {"plan.3d_fullres.patch": [1]}}}, "variants.p.plan.3d_fullres.patch"),  # unknown plan key
])
def test_invalid_sweep_files_fail_before_any_job(tmp_path: Path, raw_only: Paths, changes: dict, key: str) -> None:
    file = write_sweep(tmp_path, minimal_sweep(**changes))
    for command in ("sweep", "sweep-report"):
        args = [command, str(file)] + (["--gpus", "0,1"] if command == "sweep" else [])
        result = _invoke(raw_only, *args)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {file}:{key}: "), lines
        assert _nothing_started(raw_only)


def test_missing_file_is_one_line(tmp_path: Path, raw_only: Paths) -> None:
    result = _invoke(raw_only, "sweep", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: sweep file not found"


def test_dry_run_lists_every_job_and_writes_nothing(tmp_path: Path, raw_only: Paths) -> None:
    file = write_sweep(tmp_path, minimal_sweep(variants={"patch": {"plan.3d_fullres.patch_size": [32, 48, 32]}}))
    result = _invoke(raw_only, "sweep", str(file), "--gpus", "0,1", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "5 variants x 1 seed(s) x 2 fold(s)" in result.output and "= 10 trainings" in result.output
    train_lines = [ln for ln in result.output.splitlines() if ln.startswith("train:")]
    assert len(train_lines) == 10
    assert {ln.split()[1] for ln in train_lines} <= {"0", "1"}
    assert any(ln.startswith("plan:Dataset004_Hippocampus ") for ln in result.output.splitlines())
    assert "not planned yet" in result.output
    assert _nothing_started(raw_only)
    assert not raw_only.preprocessed.exists()


def test_report_of_a_sweep_that_never_ran_lists_everything_missing(tmp_path: Path, raw_only: Paths) -> None:
    file = write_sweep(tmp_path, minimal_sweep())
    result = _invoke(raw_only, "sweep-report", str(file))
    assert result.exit_code == 0, result.output
    assert "0 of 8 runs finished" in result.output and "Missing (8 runs not finished)" in result.output
    assert (raw_only.results / "sweeps" / "toy" / "report.png").is_file()


def test_a_fold_the_dataset_does_not_have_fails_before_any_job(tmp_path: Path, raw_only: Paths) -> None:
    file = write_sweep(tmp_path, minimal_sweep(folds=[0, 7]))
    result = _invoke(raw_only, "sweep", str(file), "--dry-run")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {file}:folds: Dataset004_Hippocampus has folds 0-3"), lines
    assert lines[0].endswith("no fold 7") and _nothing_started(raw_only)
