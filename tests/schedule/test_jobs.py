"""Job ids, argv and the job.json record."""

from __future__ import annotations

import sys

from autoseg.common.jsonio import load_record, record_from_dict, record_to_dict, save_record
from autoseg.common.paths import Paths
from autoseg.schedule.jobs import JobKind, JobPaths, JobRecord, JobSpec, JobState, Resources, safe_job_id


def test_job_ids_are_stable_and_readable() -> None:
    a = JobSpec.make(JobKind.TRAIN, "Dataset004_Hippocampus", config="3d_fullres", fold=0)
    b = JobSpec.make(JobKind.TRAIN, "Dataset004_Hippocampus", config="3d_fullres", fold=0, seed=1, variant="lr")
    assert a.job_id == "train:Dataset004_Hippocampus:3d_fullres:default:fold_0"
    assert b.job_id == "train:Dataset004_Hippocampus:3d_fullres:lr:seed_1:fold_0"
    assert JobSpec.make(JobKind.PLAN, "Dataset004_Hippocampus").job_id == "plan:Dataset004_Hippocampus"
    assert safe_job_id(a.job_id) == "train-Dataset004_Hippocampus-3d_fullres-default-fold_0"
    odd = safe_job_id("train:D/x y")
    assert "/" not in odd and " " not in odd and odd != safe_job_id("train:D_x_y")


def test_train_command_resumes_and_carries_overrides(tmp_path) -> None:
    paths = Paths.under(tmp_path)
    job = JobSpec.make(JobKind.TRAIN, "Dataset004_Hippocampus", config="2d", fold="all", seed=3, variant="v",
                       trainer_overrides=("epochs=5", "lr=0.1"), plans_file="/p/plans.json")
    argv = job.command(paths, num_workers=3)
    assert argv[:3] == [sys.executable, "-m", "autoseg"]
    assert argv[argv.index("--results") + 1] == str(paths.results)
    tail = argv[argv.index("train"):]
    assert tail == ["train", "Dataset004_Hippocampus", "2d", "all", "--continue", "--variant", "v", "--seed", "3",
                    "--set", "epochs=5", "--set", "lr=0.1", "--plans", "/p/plans.json", "--num-workers", "3",
                    "--quiet"]
    with_npz = JobSpec.make(JobKind.TRAIN, "D", config="2d", fold=0, save_probabilities=True).command(paths)
    assert with_npz[-2:] == ["--save-probabilities", "--quiet"]


def test_cpu_job_commands(tmp_path) -> None:
    paths = Paths.under(tmp_path)
    plan = JobSpec.make(JobKind.PLAN, "D", configs=("2d",), resources=Resources(gpu_memory_gb=24))
    prep = JobSpec.make(JobKind.PREPROCESS, "D", configs=("2d", "3d_fullres"))
    best = JobSpec.make(JobKind.FIND_BEST, "D", configs=("2d",))
    assert plan.command(paths, 2)[-8:] == ["plan", "D", "--configs", "2d", "--gpu-memory", "24", "-j", "2"]
    assert prep.command(paths, 2)[-7:] == ["preprocess", "D", "--configs", "2d", "3d_fullres", "-j", "2"]
    assert best.command(paths)[-7:] == ["find-best", "D", "--variant", "default", "--force", "-c", "2d"]


def test_spec_and_record_round_trip(tmp_path) -> None:
    job = JobSpec.make(JobKind.TRAIN, "D", config="3d_fullres", fold=2, depends_on=("preprocess:D",),
                       resources=Resources(gpus=1, gpu_memory_gb=7.5, est_duration_s=100.0))
    assert record_from_dict(JobSpec, record_to_dict(job)) == job
    jp = JobPaths.of(Paths.under(tmp_path), job.job_id).make()
    rec = JobRecord(spec=job, attempt=1, state=JobState.DONE, executor="local", command=("a", "b"),
                    env={"CUDA_VISIBLE_DEVICES": "1"}, gpu="1", cpus=2, host="h", external_id="12",
                    started_at=1.0, ended_at=2.0, exit_code=0)
    save_record(jp.record, rec)
    assert load_record(jp.record, JobRecord) == rec
    assert jp.folder.parent == tmp_path / "results" / ".autoseg" / "jobs"
