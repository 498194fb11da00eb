"""Options checked before any job starts (folds, GPU ids, a changed --set on finished trainings), and
user errors of a job failing it at once with the job's own message."""

from __future__ import annotations

import logging
import sqlite3
import threading

import pytest
from click.testing import CliRunner

import autoseg.cli
from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import save_record
from autoseg.dataset.phantom import PhantomRecipe, make_phantom_dataset
from autoseg.schedule.executors import InProcessExecutor, Launch
from autoseg.schedule.graph import TrainAllRequest, build_train_all_jobs, warn_changed_finished
from autoseg.schedule.jobs import JobKind, JobSpec, JobState
from autoseg.schedule.resources import PoolConfig, check_gpus_exist, parse_gpus
from autoseg.schedule.runner import RunOptions, run_jobs
from autoseg.schedule.status import collect_status
from autoseg.schedule.store import StateStore, db_path
from autoseg.train.config import TrainerConfig, apply_overrides
from tests.schedule.conftest import DATASET, train_jobs
from tests.sweep_fixtures import minimal_sweep, write_sweep


def _cli(paths, *args: str):
    return CliRunner().invoke(autoseg.cli.cli, ["--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed),
                                                "--results", str(paths.results), *args])


def _one_error_line(result, where: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {where}: "), result.stderr
    return lines[0]


@pytest.fixture
def phantom5(sched_paths):
    make_phantom_dataset(sched_paths.raw, PhantomRecipe(num_training=5, num_test=0, shape=(8, 16, 16)))
    return sched_paths


# ---------------------------------------------------------------------- folds


def test_a_fold_that_does_not_exist_fails_before_any_job(phantom5) -> None:
    line = _one_error_line(_cli(phantom5, "train-all", "--folds", "7", "--gpus", "0", "--quiet"), "--folds")
    assert "folds 0-4" in line and "no fold 7" in line
    assert not db_path(phantom5).exists()  # no job was registered, let alone started
    dry = _cli(phantom5, "train-all", "--configs", "3d_fullres", "--folds", "0-7", "--dry-run")
    assert "no fold 5, 6, 7" in _one_error_line(dry, "--folds") and "fold_5" not in dry.output


def test_folds_follow_the_splits_file(phantom5) -> None:
    from autoseg.splits import make_splits

    ids = sorted(p.name[:-len("_0000.nii.gz")] for p in (phantom5.raw / DATASET / "imagesTr").iterdir())
    phantom5.splits_file(DATASET).parent.mkdir(parents=True, exist_ok=True)
    save_record(phantom5.splits_file(DATASET), make_splits(ids, n_folds=3))
    with pytest.raises(AutosegError, match=r"folds 0-2 .*splits\.json.*no fold 3"):
        build_train_all_jobs(phantom5, TrainAllRequest(datasets=(DATASET,), configs=("3d_fullres",), folds=(0, 3)))
    jobs = build_train_all_jobs(phantom5, TrainAllRequest(datasets=(DATASET,), configs=("3d_fullres",),
                                                          folds=(0, 1, 2, "all")))
    assert sum(j.kind is JobKind.TRAIN for j in jobs) == 4


# ---------------------------------------------------------------------- GPU ids


@pytest.mark.parametrize("text", ["a,b", "-1", "0,x", "1.5"])
def test_gpu_ids_that_cuda_cannot_take_are_refused(text: str) -> None:
    with pytest.raises(AutosegError) as info:
        parse_gpus(text)
    assert info.value.where == "--gpus" and "not a GPU id" in info.value.message


def test_gpu_indices_and_uuids_are_accepted() -> None:
    assert parse_gpus("0, 3") == ("0", "3")
    assert parse_gpus("GPU-8f2c1d3e-aaaa-bbbb-cccc-0123456789ab,MIG-5a1b") == (
        "GPU-8f2c1d3e-aaaa-bbbb-cccc-0123456789ab", "MIG-5a1b")


def test_gpu_ids_are_checked_against_cuda() -> None:
    with pytest.raises(AutosegError, match="no CUDA device on this machine"):
        check_gpus_exist(("0", "1"), cuda_available=False, device_count=0)
    with pytest.raises(AutosegError, match=r"GPU\(s\) 2 not found: CUDA sees 2 device\(s\), 0-1"):
        check_gpus_exist(("0", "2"), cuda_available=True, device_count=2)
    check_gpus_exist(("1", "GPU-abc"), cuda_available=True, device_count=2)
    check_gpus_exist((), cuda_available=False, device_count=0)  # no --gpus: CPU slots, nothing to check


@pytest.mark.parametrize("args", [("--gpus", "a,b"), ("--gpus", "-1")])
def test_train_all_refuses_bad_gpu_ids(phantom5, args) -> None:
    _one_error_line(_cli(phantom5, "train-all", "--folds", "0", "--quiet", *args), "--gpus")
    assert not db_path(phantom5).exists()


def test_sweep_refuses_bad_gpu_ids(phantom5, tmp_path) -> None:
    file = write_sweep(tmp_path, minimal_sweep(datasets=[DATASET]))
    _one_error_line(_cli(phantom5, "sweep", str(file), "--gpus", "x", "--dry-run"), "--gpus")


def test_gpus_without_cuda_fail_in_one_line_unless_faked(phantom5, monkeypatch) -> None:
    import torch

    monkeypatch.delenv("AUTOSEG_FAKE_GPUS")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _one_error_line(_cli(phantom5, "train-all", "--folds", "0", "--gpus", "0,1", "--quiet"), "--gpus")
    assert "no CUDA device" in line and "leave out --gpus" in line
    assert not (phantom5.scheduler_dir() / "jobs").exists()  # nothing was started
    monkeypatch.setenv("AUTOSEG_FAKE_GPUS", "1")  # stand-in GPUs, as the scheduler tests use them
    dry = _cli(phantom5, "train-all", "--configs", "3d_fullres", "--folds", "0,1", "--gpus", "0,1", "--dry-run")
    assert dry.exit_code == 0, dry.output


# ---------------------------------------------------------------------- a changed --set on finished trainings


def _finished_fold(paths, fold: int, cfg: TrainerConfig) -> None:
    from autoseg.common.paths import TrainingId

    fold_dir = paths.training_dir(TrainingId(DATASET, "3d_fullres", fold))
    fold_dir.mkdir(parents=True)
    (fold_dir / "checkpoint_final.pt").write_bytes(b"")
    save_record(fold_dir / "trainer_config.json", cfg)


def test_changed_set_on_finished_trainings_is_named_in_one_warning(sched_paths, caplog) -> None:
    used = apply_overrides(TrainerConfig(), ["epochs=2", "iterations_per_epoch=2"])
    for fold in (0, 1):
        _finished_fold(sched_paths, fold, used)
    same = [JobSpec.make(JobKind.TRAIN, DATASET, config="3d_fullres", fold=k,
                         trainer_overrides=("epochs=2", "iterations_per_epoch=2")) for k in (0, 1, 2)]
    assert warn_changed_finished(sched_paths, same) == []
    changed = [JobSpec.make(JobKind.TRAIN, DATASET, config="3d_fullres", fold=k,
                            trainer_overrides=("epochs=4", "iterations_per_epoch=2", "num_workers=1"))
               for k in (0, 1, 2)]
    with caplog.at_level(logging.WARNING):
        lines = warn_changed_finished(sched_paths, changed)
    assert len(lines) == 1 and lines[0] in caplog.text
    assert lines[0].startswith("2 finished training(s)") and "epochs 2 -> 4" in lines[0]
    assert "iterations_per_epoch" not in lines[0] and "--force" in lines[0] and "--variant" in lines[0]


def test_final_validation_off_makes_no_find_best_job(phantom5) -> None:
    request = TrainAllRequest(datasets=(DATASET,), configs=("3d_fullres", "2d"), folds=(0, 1, 2, 3, 4))
    kinds = {j.kind for j in build_train_all_jobs(phantom5, request)}
    assert JobKind.FIND_BEST in kinds
    off = TrainAllRequest(datasets=(DATASET,), configs=("3d_fullres", "2d"), folds=(0, 1, 2, 3, 4),
                          trainer_overrides=("final_validation=off",))
    jobs = build_train_all_jobs(phantom5, off)
    assert JobKind.FIND_BEST not in {j.kind for j in jobs}
    assert not any(j.save_probabilities for j in jobs)  # nothing to ensemble without a validation


def test_variant_of_train_all_is_a_folder_name(phantom5) -> None:
    line = _one_error_line(_cli(phantom5, "train-all", "--variant", "../x", "--dry-run"), "--variant")
    assert "'../x'" in line


# ---------------------------------------------------------------------- user errors are not retried


def test_user_error_fails_at_once_with_its_message(sched_paths) -> None:
    bad, crash, ok = train_jobs(3)
    calls: dict[str, int] = {}
    lock = threading.Lock()

    def fn(launch: Launch, stop: threading.Event) -> int:
        with lock:
            calls[launch.job.job_id] = calls.get(launch.job.job_id, 0) + 1
        if launch.job.job_id == bad.job_id:
            with open(launch.job_paths.log, "a") as f:
                f.write("INFO loading\nerror: raw/Dataset999_Phantom/dataset.json: not valid JSON\n")
            return 2
        return 1 if launch.job.job_id == crash.job_id else 0

    with StateStore.open(sched_paths) as store:
        summary = run_jobs([bad, crash, ok], InProcessExecutor(fn), sched_paths, store,
                           RunOptions(retries=2, pool=PoolConfig(gpus=("0",), cores=(0, 1)), poll_interval_s=0.01))
    assert calls == {bad.job_id: 1, crash.job_id: 3, ok.job_id: 1}  # a crash is retried, a user error is not
    failure = {f.job_id: f for f in summary.failures}[bad.job_id]
    assert failure.attempts == 1 and failure.message == "raw/Dataset999_Phantom/dataset.json: not valid JSON"
    assert f"{bad.job_id} (exit 2 after 1 attempt(s): raw/Dataset999_Phantom/dataset.json: not valid JSON)" \
        in summary.one_line()
    status = {s.job_id: s for s in collect_status(sched_paths)}
    assert status[bad.job_id].state is JobState.FAILED and status[bad.job_id].message == failure.message
    assert status[crash.job_id].message is None


def test_a_store_from_before_messages_still_opens(sched_paths) -> None:
    path = db_path(sched_paths)
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path) as conn:  # the table as the first version made it
        conn.execute("CREATE TABLE jobs (job_id TEXT PRIMARY KEY, spec TEXT NOT NULL, state TEXT NOT NULL, "
                     "attempt INTEGER NOT NULL DEFAULT 0, gpu TEXT, cpus INTEGER, executor TEXT, external_id TEXT, "
                     "host TEXT, started_at REAL, ended_at REAL, exit_code INTEGER, log_path TEXT, "
                     "updated_at REAL NOT NULL)")
    job = train_jobs(1)[0]
    with StateStore.open(sched_paths) as store:
        store.register([job])
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE jobs DROP COLUMN message")  # as if an older autoseg had written it
    with StateStore.open(sched_paths, readonly=True) as store:
        assert store.get(job.job_id).message is None
    with StateStore.open(sched_paths) as store:
        store.update(job.job_id, state=JobState.FAILED, message="bad")
        assert store.get(job.job_id).message == "bad"


def test_user_error_message_is_the_last_attempts_error_lines(tmp_path) -> None:
    from autoseg.schedule.runner import user_error_message

    log = tmp_path / "log.txt"
    log.write_text("=== autoseg scheduler: j attempt 1 started\nerror: old problem\n"
                   "=== autoseg scheduler: j attempt 2 started\nINFO x\nerror: a.json: broken\n"
                   "Error: No such option: --bogus\n")
    assert user_error_message(log) == "a.json: broken; No such option: --bogus"
    assert user_error_message(tmp_path / "missing.txt") is None
