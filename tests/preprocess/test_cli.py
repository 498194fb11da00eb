"""`autoseg preprocess` end to end, with the real planner, on the phantom and real Hippocampus cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from click.testing import CliRunner

import autoseg.cli
from autoseg.common.jsonio import save_record
from autoseg.common.paths import Paths
from autoseg.dataset.io import read_image
from autoseg.dataset.spec import load_dataset
from autoseg.planning.planner import PlanRequest, plan_and_save
from autoseg.preprocess import (
    list_preprocessed_cases,
    load_dataset_plan,
    load_preprocessed_case,
    revert_preprocessing,
)
from autoseg.splits import load_splits
from tests.preprocess.conftest import own_roots


def _invoke(paths: Paths, *args: str):
    roots = ["--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed), "--results", str(paths.results)]
    return CliRunner().invoke(autoseg.cli.cli, [*roots, "preprocess", *args])


def _plan(paths: Paths, dataset: str) -> None:
    plan_and_save(paths, dataset, PlanRequest(progress_bar=False))


def test_cli_on_the_phantom(phantom_small: Paths, tmp_path: Path) -> None:
    paths = own_roots(phantom_small, tmp_path)
    missing = _invoke(paths, "999")
    assert missing.exit_code == 2
    assert "plans.json: plan file not found; run `autoseg plan Dataset999_Phantom` first" in missing.stderr
    _plan(paths, "Dataset999_Phantom")
    result = _invoke(paths, "999", "--configs", "2d", "3d_fullres", "-j", "1")
    assert result.exit_code == 0, result.output + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("2d") and lines[1].startswith("3d_fullres")
    assert all("8 cases" in line for line in lines[:2])
    for name in ("2d", "3d_fullres"):
        assert len(list_preprocessed_cases(paths.preprocessed_data("Dataset999_Phantom", name))) == 8
    assert load_splits(paths, "Dataset999_Phantom").n_folds == 5
    again = _invoke(paths, "999", "-c", "2d,3d_fullres")  # done cases are skipped, same summary
    assert again.exit_code == 0 and again.stdout.splitlines()[:2] == lines[:2]
    unknown = _invoke(paths, "999", "--configs", "3d_bogus")
    assert unknown.exit_code == 2 and "3d_bogus" in unknown.stderr


def test_cli_with_a_derived_plan_file(phantom_small: Paths, tmp_path: Path) -> None:
    from dataclasses import replace

    paths = own_roots(phantom_small, tmp_path)
    _plan(paths, "Dataset999_Phantom")
    plan = load_dataset_plan(paths, "Dataset999_Phantom")
    full = plan.configurations["3d_fullres"]
    coarse = replace(full, data_identifier="3d_fullres_sp1.5", spacing=(full.spacing[0], 1.5, 1.5))
    save_record(tmp_path / "derived.json", replace(plan, configurations={"3d_fullres": coarse}))
    result = _invoke(paths, "Dataset999_Phantom", "--plans", str(tmp_path / "derived.json"), "--configs", "3d_fullres")
    assert result.exit_code == 0, result.stderr
    folder = paths.preprocessed_data("Dataset999_Phantom", "3d_fullres_sp1.5")
    case = load_preprocessed_case(folder, list_preprocessed_cases(folder)[0])
    assert case.properties.spacing_after_resampling[1:] == (1.5, 1.5)
    assert not paths.preprocessed_data("Dataset999_Phantom", "3d_fullres").exists()
    bad = _invoke(paths, "999", "--plans", str(tmp_path / "nope.json"))
    assert bad.exit_code == 2 and "nope.json: plan file not found" in bad.stderr


def test_cli_on_real_hippocampus_and_revert(hippocampus_small: Paths, tmp_path: Path) -> None:
    paths = own_roots(hippocampus_small, tmp_path)
    ds = "Dataset004_Hippocampus"
    _plan(paths, ds)
    result = _invoke(paths, "4", "--configs", "3d_fullres", "-j", "2")
    assert result.exit_code == 0, result.stderr
    assert "12 cases" in result.stdout
    plan = load_dataset_plan(paths, ds)
    config = plan.configuration("3d_fullres")
    folder = paths.preprocessed_data(ds, config.data_identifier)
    spec = load_dataset(paths.raw_dataset(ds))
    for cid in list_preprocessed_cases(folder)[:3]:
        case = load_preprocessed_case(folder, cid)
        assert set(np.unique(case.seg).tolist()) <= {0, 1, 2}
        assert np.allclose(case.properties.spacing_after_resampling, config.spacing)
        one_hot = np.stack([(case.seg[0] == k).astype(np.float32) for k in range(plan.num_classes)])
        labels = revert_preprocessing(one_hot, case.properties, plan, config).argmax(0)
        original, geom = read_image(spec.case(cid).label)
        assert labels.shape == original.shape
        assert np.mean(labels == original) > 0.98
        assert case.properties.original_geometry.same_grid(geom, rtol=0, atol=1e-6)
