"""``autoseg train-all`` as a Python API: build the job graph, pick the executor, run or preview it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from autoseg.common.errors import AutosegError
from autoseg.common.paths import Paths
from autoseg.schedule.executors import Executor, LocalExecutor
from autoseg.schedule.slurm import SlurmExecutor, SlurmOptions
from autoseg.schedule.jobs import JobKind, JobSpec
from autoseg.schedule.resources import PoolConfig, check_gpus_exist, machine_cores, query_gpu_memory_gb
from autoseg.schedule.lock import RunLock
from autoseg.schedule.graph import TrainAllRequest, build_train_all_jobs, warn_changed_finished
from autoseg.schedule.order import Assignment, simulate_schedule
from autoseg.schedule.runner import RunOptions, RunSummary, run_jobs
from autoseg.schedule.status import job_status
from autoseg.schedule.store import JobRow, StateStore
from autoseg.track.spec import TrackContext, TrackSpec, child_env

log = logging.getLogger(__name__)

EXECUTORS = ("local", "slurm")


@dataclass(frozen=True)
class TrainAllOptions:
    """Every ``train-all`` option: what to train, and where and how to run it."""

    request: TrainAllRequest = field(default_factory=TrainAllRequest)
    gpus: tuple[str, ...] | None = None
    """GPU ids for local runs; None = every visible CUDA device (none: trainings run on CPU slots)."""
    jobs_per_gpu: int | None = None
    cpu_slots: int = 1
    retries: int = 1
    executor: str = "local"
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    slurm_cpus_per_job: int = 8
    track: TrackSpec | None = None
    """Log every training to this tracker (an experiment per dataset); None: trainings are not tracked."""
    fake_gpus: bool = False
    """Take ``gpus`` as given without asking CUDA (tests, rehearsing a GPU schedule on a CPU
    machine: the children then run on the CPU with CUDA_VISIBLE_DEVICES set); the CLI sets it
    from ``AUTOSEG_FAKE_GPUS=1``."""


def detected_gpus() -> tuple[str, ...]:
    """Ids of the visible CUDA devices ("0", "1", ...), () without CUDA."""
    import torch

    return tuple(str(i) for i in range(torch.cuda.device_count())) if torch.cuda.is_available() else ()


def local_gpus(options: TrainAllOptions) -> tuple[str, ...]:
    """The GPUs local jobs run on: ``--gpus`` (checked against CUDA unless fake), else every visible one."""
    if options.gpus is not None and not options.fake_gpus:
        import torch

        available = torch.cuda.is_available()
        check_gpus_exist(options.gpus, available, torch.cuda.device_count() if available else 0)
    return options.gpus if options.gpus is not None else detected_gpus()


def planning_gpu_memory_gb(options: TrainAllOptions) -> float | None:
    """The GPU memory plan jobs plan for: ``--gpu-memory``, else the smallest of the local GPUs.

    The plan job itself runs on a CPU slot (an empty CUDA_VISIBLE_DEVICES), so it cannot see the
    GPUs the trainings will use; it gets their memory as ``autoseg plan --gpu-memory``. None
    (Slurm without ``--gpu-memory``, no CUDA): ``autoseg plan``'s own default.
    """
    if options.request.gpu_memory_gb is not None:
        return options.request.gpu_memory_gb
    if options.executor != "local":
        return None
    return query_gpu_memory_gb(local_gpus(options))


def pool_config(options: TrainAllOptions) -> PoolConfig:
    """The local slot pool: GPUs, packing (explicit, or by the plan's memory estimates), CPU slots."""
    gpus = local_gpus(options)
    if not gpus:
        log.warning("no GPUs given or found: trainings run on CPU slots (pass --gpus to pin GPUs)")
    memory = options.request.gpu_memory_gb
    if memory is None and options.jobs_per_gpu is None:
        memory = query_gpu_memory_gb(gpus)
    return PoolConfig(gpus=gpus, jobs_per_gpu=options.jobs_per_gpu, gpu_memory_gb=memory,
                      cpu_slots=options.cpu_slots, cores=machine_cores())


def train_all_jobs(paths: Paths, options: TrainAllOptions) -> list[JobSpec]:
    """The job graph of ``options``, its plan jobs planning for the GPUs the trainings will get."""
    request = replace(options.request, gpu_memory_gb=planning_gpu_memory_gb(options))
    jobs = build_train_all_jobs(paths, request)
    warn_changed_finished(paths, jobs)
    return jobs


def make_executor(options: TrainAllOptions) -> Executor:
    if options.executor == "local":
        return LocalExecutor()
    if options.executor == "slurm":
        return SlurmExecutor(options.slurm)
    raise AutosegError(f"unknown executor {options.executor!r} (choose {', '.join(EXECUTORS)})", "--executor")


def train_all(paths: Paths, options: TrainAllOptions, observer=None) -> RunSummary:  # type: ignore[no-untyped-def]
    """Take the results root's lock, build the job graph and run it to the end."""
    with RunLock(paths):
        jobs = train_all_jobs(paths, options)
        run_options = RunOptions(retries=options.retries, pool=pool_config(options) if options.executor == "local"
                                 else PoolConfig(), cpus_per_job=options.slurm_cpus_per_job, observer=observer,
                                 job_env=lambda job: train_all_job_env(job, options.track))
        with StateStore.open(paths) as store:
            return run_jobs(jobs, make_executor(options), paths, store, run_options)


def train_all_job_env(job: JobSpec, track: TrackSpec | None) -> dict[str, str]:
    """Train jobs log to ``track`` under their dataset's experiment; nothing else tracks (not even with an
    inherited ``$AUTOSEG_TRACK``, which the CLI already resolved into ``track``)."""
    if track is None or job.kind is not JobKind.TRAIN:
        return child_env(None)
    return child_env(track, TrackContext(experiment=job.dataset))


def preview(paths: Paths, options: TrainAllOptions) -> tuple[list[JobSpec], list[Assignment] | None]:
    """The job graph and, for local runs, where each job would go (``--dry-run``; nothing is started)."""
    jobs = train_all_jobs(paths, options)
    if options.executor != "local":
        return jobs, None
    return jobs, simulate_schedule(jobs, pool_config(options))


def observer_rows(paths: Paths, rows: list[JobRow]) -> list:  # type: ignore[type-arg]
    """Status rows for a live view."""
    return [job_status(paths, r) for r in rows]
