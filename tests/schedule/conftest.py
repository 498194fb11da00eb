"""Scheduler test helpers: stand-in jobs (a tiny script or a thread) so most tests need no training, and
the setup of the tests that run a real `autoseg train-all` process."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
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


def fake_command(paths: Paths, steps: int = 2, step_s: float = 0.05, fail: frozenset[str] = frozenset(),
                 stop_s: float = 0.0):
    """A LocalExecutor ``command_for``: run fake_job.py in the job's training dir (or its job dir)."""

    def command(launch: Launch) -> list[str]:
        tid = launch.job.training_id()
        out = paths.training_dir(tid) if tid is not None else launch.job_paths.folder / "work"
        argv = [sys.executable, str(FAKE_JOB), str(out), str(steps), str(step_s)]
        return argv + (["fail"] if launch.job.job_id in fail else []) + ([f"stop={stop_s}"] if stop_s else [])

    return command


@pytest.fixture(autouse=True, scope="package")
def fake_gpus() -> Iterator[None]:
    """The scheduler tests hand out GPU ids on machines without them: ``--gpus`` is taken as given
    (``AUTOSEG_FAKE_GPUS``), also by the ``autoseg`` processes they start. Package-scoped so that
    module-scoped fixtures running a sweep see it too; tests of the GPU check unset it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTOSEG_FAKE_GPUS", "1")
        yield


@pytest.fixture
def sched_paths(tmp_path: Path) -> Paths:
    paths = Paths.under(tmp_path / "data")
    for root in (paths.raw, paths.preprocessed, paths.results):
        root.mkdir(parents=True)
    return paths


# ---------------------------------------------------------------------- a real `autoseg train-all` process

TINY_TRAINING = ("--set", "iterations_per_epoch=2", "--set", "val_iterations=1", "--set", "batch_size=2",
                 "--set", "final_validation=no_mirroring")
"""Trainer overrides that keep an epoch to a few steps (add ``--set epochs=N``) and the final
validation to one pass per window (it still predicts and scores every validation case)."""


def train_all_command(paths: Paths, *args: str) -> list[str]:
    """``autoseg train-all Dataset999_Phantom ARGS`` on ``paths``, run with this interpreter."""
    return [sys.executable, "-m", "autoseg", "--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed),
            "--results", str(paths.results), "train-all", DATASET, *args]


def single_thread_env() -> dict[str, str]:
    """The test's environment with one BLAS/OpenMP thread per process (2 shared cores)."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def fold_dir(paths: Paths, config: str, fold: int) -> Path:
    """The results folder of one training of the default variant."""
    return paths.results / DATASET / config / "default" / f"fold_{fold}"


def epochs_logged(fold: Path) -> list[dict]:
    """The complete lines of a training's ``training_log.jsonl`` (a line being written is skipped)."""
    path = fold / "training_log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip().endswith("}")]
