"""The Slurm executor against the real local cluster (../shared/tools/slurm-local; skipped without it)."""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import threading
import time

import pytest

from autoseg.schedule.executors import SlurmExecutor, SlurmOptions
from autoseg.schedule.jobs import JobPaths, JobState
from autoseg.schedule.runner import RunOptions, run_locked
from autoseg.schedule.store import StateStore
from tests.schedule.conftest import fake_command, train_jobs


def _cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%a %G"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "up" in out.stdout and "gpu" in out.stdout


pytestmark = [pytest.mark.slurm, pytest.mark.skipif(not _cluster_up(), reason="local Slurm cluster is not up")]


def _node(paths, job) -> dict | None:
    try:
        return json.loads((JobPaths.of(paths, job.job_id).folder / "node.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _kill_when_running(paths, job, box: dict) -> None:
    """SIGKILL the job's process once it runs (like the OOM killer): only sacct can tell it ended."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        seen = _node(paths, job)
        if seen and seen.get("slurm_job_id"):
            time.sleep(1.0)
            box["killed"] = seen["slurm_job_id"]
            os.kill(seen["pid"], signal.SIGKILL)  # the job's own process dies without a result
            return
        time.sleep(0.2)


def test_slurm_jobs_get_distinct_gpus_paths_failures_and_kills(sched_paths) -> None:
    base = train_jobs(6)
    ok, bad, killed = base[:4], base[4], base[5]
    after_ok = train_jobs(1, depends_on=(ok[0].job_id,), config="2d")[0]  # submitted with afterok
    after_bad = train_jobs(2, depends_on=(bad.job_id,), config="3d_lowres")[1]
    jobs = [*base, after_ok, after_bad]
    command = fake_command(sched_paths, steps=20, step_s=0.1, fail=frozenset({bad.job_id}))
    box: dict = {}
    killer = threading.Thread(target=_kill_when_running, args=(sched_paths, killed, box), daemon=True)
    killer.start()
    summary = run_locked(sched_paths, jobs, SlurmExecutor(SlurmOptions(time_min=10), command_for=command),
                         RunOptions(retries=0, cpus_per_job=2, poll_interval_s=0.5))
    killer.join(5)
    assert box.get("killed"), "the job to kill never started"
    states = {}
    with StateStore.open(sched_paths) as store:
        for job in jobs:
            row = store.get(job.job_id)
            states[job.job_id] = row.state
            assert row.executor == "slurm" and (row.external_id or job is after_bad)
    assert [states[j.job_id] for j in ok] == [JobState.DONE] * 4
    assert states[after_ok.job_id] is JobState.DONE and states[after_bad.job_id] is JobState.BLOCKED
    assert _node(sched_paths, after_ok)["started_at"] >= _node(sched_paths, ok[0])["ended_at"]
    assert states[bad.job_id] is JobState.FAILED and states[killed.job_id] is JobState.FAILED
    assert {f.job_id for f in summary.failures} == {bad.job_id, killed.job_id}
    seen = {j.job_id: _node(sched_paths, j) for j in ok}
    for job_id, s in seen.items():
        assert s["cuda_visible_devices"] not in (None, "")  # Slurm's choice, not overridden by us
        assert s["env"]["AUTOSEG_RESULTS"] == str(sched_paths.results)
        assert s["env"]["TMPDIR"] == str(JobPaths.of(sched_paths, job_id).tmp)
        assert "CUDA_VISIBLE_DEVICES" not in s["env"]
    spans = list(seen.values())
    overlaps = 0
    for i, a in enumerate(spans):
        for b in spans[i + 1:]:
            if a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"]:
                assert (a["node"], a["cuda_visible_devices"]) != (b["node"], b["cuda_visible_devices"])
                overlaps += 1
    assert overlaps > 0  # the jobs did run side by side
    assert "deliberate failure" in JobPaths.of(sched_paths, bad.job_id).log.read_text(encoding="utf-8")
