"""Running jobs on Slurm through submitit: one Slurm job per `JobSpec`, afterok dependencies.

`SlurmExecutor` submits and reattaches; `SlurmHandle` polls the submitit job. What runs on the
node (`SlurmCommand`: the child's environment, requeue handling) is in `autoseg.schedule.executors`,
with the other code that reads the environment.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from autoseg.schedule.executors import Launch, SlurmCommand, log_header
from autoseg.schedule.jobs import JobPaths
from autoseg.schedule.store import JobRow

log = logging.getLogger(__name__)

SLURM_POLL_INTERVAL_S = 5.0
"""At most one sacct query per job this often (sacct is what notices SIGKILLed jobs)."""


@dataclass(frozen=True)
class SlurmOptions:
    """Cluster resources per job (``--slurm-*`` options)."""

    partition: str | None = None
    time_min: int = 24 * 60
    mem_gb: float | None = None
    extra: dict[str, str] = field(default_factory=dict)
    """More sbatch options (``{"account": "x"}``)."""


class SlurmHandle:
    """A submitit job; finished when its result exists or sacct says it ended (SIGKILL included)."""

    def __init__(self, job: object) -> None:
        self.job = job
        self.external_id = str(job.job_id)  # type: ignore[attr-defined]
        self._next_check = 0.0

    def poll(self) -> int | None:
        now = time.monotonic()
        force = now >= self._next_check
        if force:
            self._next_check = now + SLURM_POLL_INTERVAL_S
        if not self.job.done(force_check=force):  # type: ignore[attr-defined]
            return None
        try:
            return int(self.job.result())  # type: ignore[attr-defined]
        except Exception as e:
            log.info("slurm job %s ended without result (%s: %s)", self.external_id, type(e).__name__,
                     str(e).splitlines()[0] if str(e) else "")
            return -int(signal.SIGKILL)

    def interrupt(self) -> None:
        self.job.cancel(check=False)  # type: ignore[attr-defined]  # SIGTERM: the trainer checkpoints

    def kill(self) -> None:
        subprocess.run(["scancel", "--signal=KILL", self.external_id], check=False, capture_output=True)
        self.job.cancel(check=False)  # type: ignore[attr-defined]


class SlurmExecutor:
    """One Slurm job per JobSpec through submitit (``--gres=gpu:1`` for GPU jobs, afterok dependencies)."""

    name = "slurm"
    uses_slots = False
    supports_dependencies = True

    def __init__(self, options: SlurmOptions, command_for: Callable[[Launch], list[str]] | None = None) -> None:
        """``command_for`` replaces the job's own argv (tests run stand-in processes)."""
        self.options = options
        self.command_for = command_for

    def submit(self, launch: Launch) -> SlurmHandle:
        import submitit  # lazily: only Slurm runs need it

        launch.job_paths.make()
        ex = submitit.AutoExecutor(folder=launch.job_paths.slurm / "%j", cluster="slurm")
        extra: dict[str, object] = dict(self.options.extra)
        if "no-requeue" not in extra and "no_requeue" not in extra:
            extra.setdefault("requeue", True)  # preemption and `scontrol requeue` rerun it (JobRequeue=0 clusters)
        if launch.after:
            extra["dependency"] = "afterok:" + ":".join(launch.after)
            extra["kill-on-invalid-dep"] = "yes"
        params: dict[str, object] = {
            "timeout_min": self.options.time_min, "name": launch.job.job_id, "cpus_per_task": launch.cpus,
            "slurm_additional_parameters": extra, "slurm_signal_delay_s": 120,
        }
        if launch.job.needs_gpu:
            params["slurm_gres"] = f"gpu:{launch.job.resources.gpus}"
        if self.options.partition:
            params["slurm_partition"] = self.options.partition
        if self.options.mem_gb:
            params["mem_gb"] = self.options.mem_gb
        ex.update_parameters(**params)
        with open(launch.job_paths.log, "ab") as f:
            log_header(f, launch, "submitted to Slurm")
        stamp = f"=== attempt {launch.attempt} running"
        argv = tuple(self.command_for(launch)) if self.command_for else launch.command
        fn = SlurmCommand(argv, launch.env, str(launch.job_paths.log),
                          str(launch.job_paths.folder / "node.json"), stamp)
        return SlurmHandle(ex.submit(fn))

    def reclaim(self, row: JobRow, job_paths: JobPaths) -> SlurmHandle | None:
        """Reattach to the Slurm job of an earlier run (still queued/running, or its outcome on disk)."""
        if not row.external_id or row.executor != self.name:
            return None
        import submitit

        return SlurmHandle(submitit.SlurmJob(folder=job_paths.slurm / "%j", job_id=row.external_id))
