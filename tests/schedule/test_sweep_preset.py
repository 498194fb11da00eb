"""A sweep over planner presets: ``plan.preset`` as a grid axis and in a named variant."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoseg.common.errors import ConfigError
from autoseg.common.jsonio import load_record
from autoseg.common.paths import Paths
from autoseg.dataset.phantom import PhantomRecipe, make_phantom_dataset
from autoseg.planning.planner import PlanRequest, plan_and_save
from autoseg.planning.plans import Plan
from autoseg.schedule.jobs import JobKind
from autoseg.schedule.sweep import load_sweep
from autoseg.schedule.sweep_jobs import build_sweep_jobs, derived_plan_file
from tests.sweep_fixtures import minimal_sweep, write_sweep

DS = "Dataset999_Phantom"


@pytest.fixture
def planned(tmp_path: Path) -> Paths:
    """The phantom with the default plan only (no preset plan yet, nothing preprocessed)."""
    paths = Paths.under(tmp_path / "data")
    make_phantom_dataset(paths.raw, PhantomRecipe(num_training=6, num_test=0, shape=(8, 16, 16)))
    plan_and_save(paths, DS, PlanRequest(configs=("3d_fullres",), progress_bar=False))
    return paths


def _sweep(tmp_path: Path, paths: Paths, **changes: object):
    body = minimal_sweep(datasets=[DS], folds=[0], **changes)
    return load_sweep(write_sweep(tmp_path, body), paths)


def test_preset_grid_axis_plans_and_trains_in_preset_folders(tmp_path: Path, planned: Paths) -> None:
    spec = _sweep(tmp_path, planned, grid={"plan.preset": ["default", "resenc-m"]},
                  variants={"resenc_m_bs2": {"plan.preset": "resenc-m", "plan.3d_fullres.batch_size": 2}})
    names = [v.name for v in spec.variants]
    assert names == ["baseline", "plan.preset=resenc-m", "resenc_m_bs2"] and spec.baseline.name == "baseline"
    assert [spec.preset(v) for v in spec.variants] == ["default", "resenc-m", "resenc-m"]

    jobs = build_sweep_jobs(spec, planned, write_plans=False)
    setup = {j.job_id: j for j in jobs.setup}
    assert set(setup) == {f"plan:{DS}:resenc-m", f"preprocess:{DS}:3d_fullres", f"preprocess:{DS}:resenc-m:3d_fullres"}
    argv = setup[f"plan:{DS}:resenc-m"].command(planned)
    assert argv[argv.index("plan"):][:4] == ["plan", DS, "--preset", "resenc-m"]
    trains = {j.variant: j for j in jobs.train_jobs}
    assert trains["toy.baseline"].config == "3d_fullres"
    assert trains["toy.plan.preset-resenc-m"].config == "resenc-m__3d_fullres"
    assert planned.training_dir(trains["toy.plan.preset-resenc-m"].training_id()) == (
        planned.results / DS / "resenc-m__3d_fullres" / "toy.plan.preset-resenc-m" / "seed_0" / "fold_0")
    assert f"preprocess:{DS}:resenc-m:3d_fullres" in trains["toy.plan.preset-resenc-m"].depends_on

    # once the preset is planned, a variant with plan overrides gets a derived plan of the preset's
    plan_and_save(planned, DS, PlanRequest(configs=("3d_fullres",), preset="resenc-m", gpu_memory_gb=None,
                                            progress_bar=False))
    jobs = build_sweep_jobs(spec, planned, write_plans=True)
    variant = spec.variant("resenc_m_bs2")
    file = derived_plan_file(planned, spec, DS, "3d_fullres", variant)
    assert file.parent.parent.name == "resenc-m__3d_fullres"
    derived = load_record(file, Plan)
    assert derived.preset == "resenc-m" and derived.configuration("3d_fullres").batch_size == 2
    assert derived.configuration("3d_fullres").encoder == "residual"
    [train] = [j for j in jobs.train_jobs if j.variant == "toy.resenc_m_bs2"]
    argv = train.command(planned)
    assert argv[argv.index("--plans") + 1] == str(file) and "resenc-m__3d_fullres" in argv
    assert not any(j.kind is JobKind.PLAN for j in jobs.jobs)


def test_unknown_preset_is_a_sweep_error(tmp_path: Path, planned: Paths) -> None:
    with pytest.raises(ConfigError, match=r"grid\.plan\.preset: expected a plans preset .*got 'resenc-s'"):
        _sweep(tmp_path, planned, grid={"plan.preset": ["default", "resenc-s"]})
