"""train-all --plans PRESET: plan/preprocess with the preset, train jobs in <preset>__<config>, cascades linked."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from autoseg.common.paths import Paths
from autoseg.dataset.phantom import PhantomRecipe, make_phantom_dataset
from autoseg.planning.planner import PlanRequest, plan_and_save
from autoseg.schedule.graph import TrainAllRequest, build_train_all_jobs
from autoseg.schedule.jobs import JobKind
from autoseg.train.checkpoint import load_checkpoint
from tests.schedule.conftest import DATASET, TINY_TRAINING, single_thread_env, train_all_command


def test_unplanned_preset_gets_plan_preprocess_and_own_train_folders(sched_paths) -> None:
    paths = sched_paths
    make_phantom_dataset(paths.raw, PhantomRecipe(num_training=6, num_test=0, shape=(8, 16, 16)))
    plan_and_save(paths, DATASET, PlanRequest(configs=("3d_fullres",), progress_bar=False))  # default only
    jobs = build_train_all_jobs(paths, TrainAllRequest(datasets=(DATASET,), configs=("3d_fullres",), folds=(0,),
                                                       plans="resenc-l"))
    plan_job, prep, train = jobs  # the default plan does not stand in for the preset's
    assert plan_job.job_id == f"plan:{DATASET}:resenc-l"
    argv = plan_job.command(paths)
    assert argv[argv.index("plan"):] == ["plan", DATASET, "--preset", "resenc-l", "--configs", "3d_fullres"]
    argv = prep.command(paths)
    assert argv[argv.index("preprocess"):][-2:] == ["--plans", "resenc-l"] and prep.depends_on == (plan_job.job_id,)
    assert train.job_id == f"train:{DATASET}:resenc-l__3d_fullres:default:fold_0"
    assert paths.training_dir(train.training_id()) == paths.results / DATASET / "resenc-l__3d_fullres" / "default" / "fold_0"
    argv = train.command(paths)
    assert argv[argv.index("train"):][:4] == ["train", DATASET, "resenc-l__3d_fullres", "0"]


def test_planned_preset_cascade_links_its_own_lowres(sched_paths) -> None:
    paths = sched_paths
    make_phantom_dataset(paths.raw, PhantomRecipe(num_training=6, num_test=0, shape=(8, 24, 24)))
    plan = plan_and_save(paths, DATASET, PlanRequest(configs=("3d_fullres", "3d_cascade_fullres"), preset="resenc-m",
                                                      gpu_memory_gb=None, progress_bar=False)).plan
    assert plan.configuration("3d_lowres").data_identifier == "resenc-m_3d_lowres"
    jobs = build_train_all_jobs(paths, TrainAllRequest(datasets=(DATASET,), configs=("3d_cascade_fullres",),
                                                       folds=tuple(range(5)), plans="resenc-m"))
    by_id = {j.job_id: j for j in jobs}
    lowres = [f"train:{DATASET}:resenc-m__3d_lowres:default:fold_{k}" for k in range(5)]
    cascade = by_id[f"train:{DATASET}:resenc-m__3d_cascade_fullres:default:fold_0"]
    assert set(lowres) <= set(cascade.depends_on) and all(i in by_id for i in lowres)
    [prep] = [j for j in jobs if j.kind is JobKind.PREPROCESS]
    assert prep.preset == "resenc-m" and prep.job_id == f"preprocess:{DATASET}:resenc-m"
    [best] = [j for j in jobs if j.kind is JobKind.FIND_BEST]
    assert best.configs == ("resenc-m__3d_lowres", "resenc-m__3d_cascade_fullres")


@pytest.mark.slow
def test_real_train_all_with_a_preset(phantom_small: Paths, tmp_path: Path) -> None:
    """``autoseg train-all --plans resenc-m`` with real plan/preprocess/train children."""
    paths = Paths(phantom_small.raw, tmp_path / "pre", tmp_path / "res")
    cmd = train_all_command(paths, "--plans", "resenc-m", "--configs", "3d_fullres", "--folds", "0", "--quiet",
                            "--set", "epochs=1", "--set", "final_validation=off", *TINY_TRAINING)
    done = subprocess.run(cmd, cwd=tmp_path, env=single_thread_env(), capture_output=True, text=True,
                          encoding="utf-8", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert paths.plans_file(DATASET, "resenc-m").is_file() and not paths.plans_file(DATASET).exists()
    fold = paths.results / DATASET / "resenc-m__3d_fullres" / "default" / "fold_0"
    ckpt = load_checkpoint(fold / "checkpoint_final.pt")
    assert ckpt.plan.preset == "resenc-m" and ckpt.config_name == "3d_fullres"
    assert ckpt.plan.configuration("3d_fullres").encoder == "residual"
