"""train-all with several configurations keeps the validation softmax maps find-best needs."""

from __future__ import annotations

import pytest

from autoseg.dataset.phantom import PhantomRecipe, make_phantom_dataset
from autoseg.planning.planner import PlanRequest, plan_and_save
from autoseg.preprocess import preprocess_dataset
from autoseg.schedule.jobs import JobKind
from autoseg.schedule.graph import TrainAllRequest, build_train_all_jobs
from autoseg.splits import fold_cases, load_splits
from tests.schedule.conftest import DATASET, fold_dir


def test_several_configs_save_probabilities_and_old_folds_get_a_validate_job(sched_paths) -> None:
    paths = sched_paths
    make_phantom_dataset(paths.raw, PhantomRecipe(num_training=10, num_test=0, shape=(8, 16, 16)))
    plan = plan_and_save(paths, DATASET, PlanRequest(configs=("2d", "3d_fullres"), progress_bar=False)).plan
    preprocess_dataset(paths, DATASET, ["2d", "3d_fullres"], plan=plan)
    # fold 3 of 3d_fullres was trained earlier on its own: finished and validated, without softmax maps
    old = fold_dir(paths, "3d_fullres", 3)
    (old / "validation").mkdir(parents=True)
    (old / "checkpoint_final.pt").write_bytes(b"trained earlier")
    (old / "validation" / "summary.json").write_text("{}", encoding="utf-8")

    alone = build_train_all_jobs(paths, TrainAllRequest(datasets=(DATASET,), configs=("3d_fullres",)))
    assert not any(j.save_probabilities for j in alone) and not any(j.kind is JobKind.VALIDATE for j in alone)

    both = build_train_all_jobs(paths, TrainAllRequest(datasets=(DATASET,), configs=("2d", "3d_fullres")))
    trains = [j for j in both if j.kind is JobKind.TRAIN]
    assert len(trains) == 10 and all(j.save_probabilities and "--save-probabilities" in j.command(paths)
                                     for j in trains)
    [validate] = [j for j in both if j.kind is JobKind.VALIDATE]
    assert (validate.config, validate.fold) == ("3d_fullres", 3) and validate.depends_on == (
        f"train:{DATASET}:3d_fullres:default:fold_3",)
    argv = validate.command(paths)
    assert argv[argv.index("train"):] == ["train", DATASET, "3d_fullres", "3", "--continue", "--variant", "default",
                                          "--save-probabilities", "--quiet"]
    [best] = [j for j in both if j.kind is JobKind.FIND_BEST]
    assert validate.job_id in best.depends_on and best.configs == ("2d", "3d_fullres")

    # once its maps exist, the fold needs nothing more
    _, val_ids = fold_cases(load_splits(paths, DATASET), 3)
    for cid in val_ids:
        (old / "validation" / f"{cid}.json").write_text("{}", encoding="utf-8")
    again = build_train_all_jobs(paths, TrainAllRequest(datasets=(DATASET,), configs=("2d", "3d_fullres")))
    assert not any(j.kind is JobKind.VALIDATE for j in again)


def test_a_cascade_waits_for_every_fold_of_its_previous_stage(sched_paths) -> None:
    paths = sched_paths
    make_phantom_dataset(paths.raw, PhantomRecipe(num_training=6, num_test=0, shape=(8, 24, 24)))
    plan = plan_and_save(paths, DATASET, PlanRequest(configs=("3d_fullres", "3d_lowres", "3d_cascade_fullres"),
                                                      progress_bar=False)).plan
    assert plan.configurations["3d_cascade_fullres"].previous_stage == "3d_lowres"

    jobs = build_train_all_jobs(paths, TrainAllRequest(datasets=(DATASET,), configs=("3d_cascade_fullres",),
                                                       folds=(0,)))
    by_id = {j.job_id: j for j in jobs}
    lowres = [f"train:{DATASET}:3d_lowres:default:fold_{k}" for k in range(5)]
    assert all(i in by_id for i in lowres)  # added although only the cascade was asked for
    cascade = by_id[f"train:{DATASET}:3d_cascade_fullres:default:fold_0"]
    assert set(lowres) <= set(cascade.depends_on)
    [prep] = [j for j in jobs if j.kind is JobKind.PREPROCESS]
    assert set(prep.configs) == {"3d_lowres", "3d_cascade_fullres"} and prep.job_id in cascade.depends_on

    from autoseg.common.errors import AutosegError
    from autoseg.schedule.jobs import link_cascades

    partial = [j for j in jobs if j.job_id != lowres[3]]
    with pytest.raises(AutosegError, match="fold_3"):
        link_cascades(partial, {DATASET: plan})
