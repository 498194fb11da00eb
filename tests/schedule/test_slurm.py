"""The Slurm executor against the real local cluster (../shared/tools/slurm-local; skipped without it)."""

from __future__ import annotations

import _thread
import json
import os
import shutil
import signal
import subprocess
import threading
import time

import pytest

from autoseg.schedule.slurm import SlurmExecutor, SlurmOptions
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


def _ckpt_step(paths, job) -> int:
    try:
        return json.loads((paths.training_dir(job.training_id()) / "ckpt.json").read_text(encoding="utf-8"))["step"]
    except (OSError, ValueError, KeyError):
        return 0


def _slurm_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def _requeue_after_checkpoint(paths, job, box: dict, how: list[str]) -> None:
    """Once the job has checkpointed, run ``how + [slurm id]``: preemption (`scontrol requeue`: SIGTERM, then
    requeue) or the time-limit warning (USR2 to the job: submitit checkpoints and requeues it).

    Slurm holds a requeued job for ~2 minutes (BeginTime); the test lets it start at once.
    """
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        seen = _node(paths, job)
        if seen and seen.get("slurm_job_id") and _ckpt_step(paths, job) >= 3:
            slurm_id = box["slurm_id"] = seen["slurm_job_id"]
            box["step_at_requeue"] = _ckpt_step(paths, job)
            box["requeue"] = subprocess.run([*how, slurm_id], capture_output=True, text=True, timeout=30)
            break
        time.sleep(0.1)
    else:
        return
    while time.monotonic() < deadline:
        state = _slurm_state(box["slurm_id"])
        box.setdefault("states", []).append(state)
        if state == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={box['slurm_id']}", "StartTime=now"], check=False,
                           capture_output=True, timeout=30)
        elif state in ("RUNNING", "") and "PENDING" in box["states"]:
            return
        time.sleep(0.5)


@pytest.mark.parametrize("how", [["scontrol", "requeue"], ["scancel", "--signal=USR2"]],
                         ids=["preempted", "time_limit"])
def test_requeued_slurm_job_resumes_from_its_checkpoint_and_is_not_a_failure(sched_paths, how) -> None:
    (job,) = train_jobs(1)
    box: dict = {}
    requeuer = threading.Thread(target=_requeue_after_checkpoint, args=(sched_paths, job, box, how), daemon=True)
    requeuer.start()
    summary = run_locked(sched_paths, [job],
                         SlurmExecutor(SlurmOptions(time_min=10), command_for=fake_command(sched_paths, 40, 0.1)),
                         RunOptions(retries=1, cpus_per_job=1, poll_interval_s=0.2))
    requeuer.join(10)
    jp = JobPaths.of(sched_paths, job.job_id)
    log_text = jp.log.read_text(encoding="utf-8")
    assert box.get("requeue") is not None, "the job never wrote a checkpoint"
    assert box["requeue"].returncode == 0, box["requeue"].stderr
    assert "PENDING" in box["states"], (box["states"], log_text)  # Slurm did put it back in the queue
    assert summary.ok and summary.counts[JobState.DONE] == 1 and not summary.failures, (summary.one_line(), log_text)
    with StateStore.open(sched_paths) as store:
        row = store.get(job.job_id)
    assert row.state is JobState.DONE and row.exit_code == 0
    assert row.attempt == 1 and row.external_id == box["slurm_id"], log_text  # the same Slurm job, not a retry
    assert log_text.count("=== autoseg scheduler") == 1  # submitted once
    assert "--requeue" in "".join(p.read_text() for p in jp.slurm.rglob("*_submission.sh"))
    interrupted = int(log_text.split("interrupted at step ")[1].split()[0])
    resumed = int(log_text.split("resumed from step ")[1].split()[0])
    assert interrupted == resumed >= box["step_at_requeue"]  # continued from its checkpoint, not restarted
    assert f"requeues job {box['slurm_id']}" in log_text
    assert log_text.index("interrupted at step") < log_text.index("restarts=1") < log_text.index("resumed from")
    node = _node(sched_paths, job)
    assert node["restarts"] == 1 and node["exit_code"] == 0 and node["slurm_job_id"] == box["slurm_id"]
    runs = (sched_paths.training_dir(job.training_id()) / "runs.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(runs) == 1 and _ckpt_step(sched_paths, job) == 40  # finished once, all steps


def test_interrupted_slurm_job_checkpoints_and_ends_interrupted_not_requeued(sched_paths) -> None:
    """Ctrl-C of train-all cancels the Slurm job (SIGTERM too): the wrapper must tell it from a requeue."""
    (job,) = train_jobs(1)

    def press_ctrl_c() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _ckpt_step(sched_paths, job) < 3:
            time.sleep(0.1)
        _thread.interrupt_main()

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    summary = run_locked(sched_paths, [job],
                         SlurmExecutor(SlurmOptions(time_min=10), command_for=fake_command(sched_paths, 400, 0.1)),
                         RunOptions(retries=1, cpus_per_job=1, poll_interval_s=0.2))
    assert summary.interrupted and summary.counts[JobState.INTERRUPTED] == 1
    with StateStore.open(sched_paths) as store:
        row = store.get(job.job_id)
    assert row.state is JobState.INTERRUPTED and row.exit_code == 130 and row.attempt == 1
    node = _node(sched_paths, job)
    assert node["exit_code"] == 130 and node["requeued"] is False and node["restarts"] == 0
    log_text = JobPaths.of(sched_paths, job.job_id).log.read_text(encoding="utf-8")
    assert "interrupted at step" in log_text and "requeues" not in log_text
    assert _ckpt_step(sched_paths, job) < 400
    assert _slurm_state(node["slurm_job_id"]) not in ("PENDING", "RUNNING")  # cancelled, not put back in the queue
