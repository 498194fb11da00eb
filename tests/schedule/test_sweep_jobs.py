"""The job graph of a sweep on a planned dataset: train jobs, derived plans, shared preprocessing."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoseg.common.errors import ConfigError
from autoseg.common.jsonio import load_record, save_record
from autoseg.common.paths import Paths
from autoseg.planning.planner import PlanRequest, plan_and_save
from autoseg.planning.plans import Plan
from autoseg.schedule.jobs import JobKind
from autoseg.schedule.sweep import load_sweep
from autoseg.schedule.sweep_jobs import build_sweep_jobs, derive_plan, derived_plan_file
from tests.helpers import HIPPOCAMPUS_MISSING, hippocampus_available, hippocampus_case_ids, link_hippocampus_subset
from tests.sweep_fixtures import minimal_sweep, write_sweep

pytestmark = pytest.mark.skipif(not hippocampus_available(), reason=HIPPOCAMPUS_MISSING)

DS = "Dataset004_Hippocampus"


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    """4 real cases, planned (not preprocessed)."""
    paths = Paths.under(tmp_path_factory.mktemp("sweep_jobs") / "data")
    link_hippocampus_subset(paths.raw, hippocampus_case_ids(4))
    plan_and_save(paths, DS, PlanRequest(progress_bar=False))
    return paths


@pytest.fixture
def fresh(planned: Paths, tmp_path: Path) -> Paths:
    """The planned dataset with an empty results root of its own."""
    return Paths(planned.raw, planned.preprocessed, tmp_path / "results")


def _spec(tmp_path: Path, paths: Paths, **changes: object):
    return load_sweep(write_sweep(tmp_path, minimal_sweep(**changes)), paths)


def test_train_jobs_cover_variants_seeds_and_folds(tmp_path: Path, fresh: Paths) -> None:
    spec = _spec(tmp_path, fresh, seeds=[0, 1])
    jobs = build_sweep_jobs(spec, fresh)
    trains = jobs.train_jobs
    assert len(trains) == 4 * 2 * 2
    assert len({j.job_id for j in jobs.jobs}) == len(jobs.jobs)
    assert "train:Dataset004_Hippocampus:3d_fullres:toy.lr-0.003__augment.mirror-false:seed_1:fold_0" in \
        {j.job_id for j in trains}
    j = next(t for t in trains if t.variant == "toy.lr-0.003")
    assert j.trainer_overrides == ("epochs=1", "lr=0.003") and j.plans_file is None
    assert j.resources.gpus == 1 and j.resources.est_duration_s and j.resources.est_duration_s > 0
    # not preprocessed yet: one preprocess job for the sweep's configs, every training waits for it
    prep = [p for p in jobs.setup if p.kind is JobKind.PREPROCESS]
    assert [p.job_id for p in prep] == ["preprocess:Dataset004_Hippocampus:3d_fullres"]
    assert all(t.depends_on == (prep[0].job_id,) for t in trains)
    assert jobs.unplanned == ()


def test_plan_overrides_write_derived_plans_and_share_preprocessing(tmp_path: Path, fresh: Paths) -> None:
    coarse = [1.0, 1.5, 1.5]
    spec = _spec(tmp_path, fresh, grid=None, variants={
        "planned": {}, "patch": {"plan.3d_fullres.patch_size": [32, 48, 32]},
        "coarse": {"plan.3d_fullres.spacing": coarse}, "coarse_slow": {"plan.3d_fullres.spacing": coarse, "lr": 0.003}})
    assert build_sweep_jobs(spec, fresh, write_plans=False).jobs
    assert not any(derived_plan_file(fresh, spec, DS, "3d_fullres", v).exists() for v in spec.variants)
    jobs = build_sweep_jobs(spec, fresh)
    base = load_record(fresh.plans_file(DS), Plan).configuration("3d_fullres")
    patch_plan = load_record(derived_plan_file(fresh, spec, DS, "3d_fullres", spec.variant("patch")), Plan)
    assert patch_plan.configuration("3d_fullres").patch_size == (32, 48, 32)
    assert patch_plan.configuration("3d_fullres").data_identifier == base.data_identifier  # data reused
    coarse_plan = load_record(derived_plan_file(fresh, spec, DS, "3d_fullres", spec.variant("coarse")), Plan)
    ident = coarse_plan.configuration("3d_fullres").data_identifier
    assert ident != base.data_identifier
    derived_preps = [j for j in jobs.jobs if j.kind is JobKind.PREPROCESS and j.plans_file]
    assert len(derived_preps) == 1 and derived_preps[0].configs == ("3d_fullres",)  # shared by both coarse variants
    for t in jobs.train_jobs:
        name = t.variant.split(".", 1)[1]
        assert (t.plans_file is None) == (name == "planned")
        assert (derived_preps[0].job_id in t.depends_on) == name.startswith("coarse")


def test_a_derived_plan_that_changed_under_a_started_sweep_is_refused(tmp_path: Path, fresh: Paths) -> None:
    spec = _spec(tmp_path, fresh, grid=None, variants={"planned": {}, "patch": {"plan.3d_fullres.patch_size": [32, 48, 32]}})
    build_sweep_jobs(spec, fresh)
    file = derived_plan_file(fresh, spec, DS, "3d_fullres", spec.variant("patch"))
    other, _ = derive_plan(load_record(fresh.plans_file(DS), Plan), ["3d_fullres.patch_size=40,48,40"])
    save_record(file, other)
    with pytest.raises(ConfigError, match="differs from the plan"):
        build_sweep_jobs(spec, fresh)


def test_plan_overrides_are_checked_against_the_plan(tmp_path: Path, fresh: Paths) -> None:
    with pytest.raises(ConfigError) as info:
        _spec(tmp_path, fresh, variants={"odd": {"plan.3d_fullres.patch_size": [33, 48, 32]}})
    assert info.value.where.endswith(":variants.odd") and "multiple" in info.value.message
    with pytest.raises(ConfigError) as info:
        _spec(tmp_path, fresh, configs=["3d_fullres", "3d_lowres"])
    assert info.value.where.endswith(":configs") and "3d_lowres" in info.value.message
