"""`autoseg status` after the scheduler died: local jobs it left marked running are shown interrupted."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from autoseg.schedule.jobs import JobState
from autoseg.schedule.lock import RunLock, lock_path, scheduler_alive
from autoseg.schedule.status import collect_status
from autoseg.schedule.store import StateStore
from tests.schedule.conftest import train_jobs


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _store_with_running_jobs(paths) -> list[str]:
    jobs = train_jobs(2)
    with StateStore.open(paths) as store:
        store.register(jobs)
        store.update(jobs[0].job_id, state=JobState.RUNNING, executor="local", external_id="12345", started_at=1.0)
        store.update(jobs[1].job_id, state=JobState.RUNNING, executor="slurm", external_id="77", started_at=1.0)
    return [j.job_id for j in jobs]


def test_local_jobs_of_a_killed_scheduler_show_as_interrupted(sched_paths) -> None:
    local, slurm = _store_with_running_jobs(sched_paths)
    lock_path(sched_paths).parent.mkdir(parents=True, exist_ok=True)
    # what a SIGKILLed train-all leaves: its pid in the lock file, never released
    lock_path(sched_paths).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "since": 0.0}) + "\n")
    assert not scheduler_alive(sched_paths)
    states = {s.job_id: s for s in collect_status(sched_paths)}
    assert states[local].state is JobState.INTERRUPTED and states[local].elapsed_s is not None
    assert states[slurm].state is JobState.RUNNING  # a Slurm job outlives the scheduler


def test_jobs_of_a_live_scheduler_stay_running(sched_paths) -> None:
    local, slurm = _store_with_running_jobs(sched_paths)
    with RunLock(sched_paths):
        assert scheduler_alive(sched_paths)
        assert {s.job_id: s.state for s in collect_status(sched_paths)} == {local: JobState.RUNNING,
                                                                           slurm: JobState.RUNNING}
    assert not scheduler_alive(sched_paths)  # a released lock holds no pid
    assert lock_path(sched_paths).read_text() == ""
