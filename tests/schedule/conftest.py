"""Scheduler test helpers: stand-in jobs (a tiny script or a thread) so most tests need no training."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from autoseg.common.paths import Paths
from autoseg.schedule.executors import Launch
from autoseg.schedule.jobs import JobKind, JobSpec, Resources

FAKE_JOB = Path(__file__).with_name("fake_job.py")
DATASET = "Dataset999_Phantom"


def train_jobs(n: int, depends_on: tuple[str, ...] = (), durations: list[float] | None = None,
               config: str = "3d_fullres") -> list[JobSpec]:
    """``n`` train jobs (folds 0..n-1) needing one GPU each."""
    return [JobSpec.make(JobKind.TRAIN, DATASET, config=config, fold=k, depends_on=depends_on,
                         resources=Resources(gpus=1, est_duration_s=(durations[k] if durations else None)))
            for k in range(n)]


def fake_command(paths: Paths, steps: int = 2, step_s: float = 0.05, fail: frozenset[str] = frozenset()):
    """A LocalExecutor ``command_for``: run fake_job.py in the job's training dir (or its job dir)."""

    def command(launch: Launch) -> list[str]:
        tid = launch.job.training_id()
        out = paths.training_dir(tid) if tid is not None else launch.job_paths.folder / "work"
        argv = [sys.executable, str(FAKE_JOB), str(out), str(steps), str(step_s)]
        return argv + (["fail"] if launch.job.job_id in fail else [])

    return command


@pytest.fixture
def sched_paths(tmp_path: Path) -> Paths:
    paths = Paths.under(tmp_path / "data")
    for root in (paths.raw, paths.preprocessed, paths.results):
        root.mkdir(parents=True)
    return paths
