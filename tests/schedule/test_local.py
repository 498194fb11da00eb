"""The local executor with real child processes (stand-in jobs): pinning, isolation, CPU shares, crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

import autoseg.cli
from autoseg.common.jsonio import load_record
from autoseg.schedule.executors import LocalExecutor
from autoseg.schedule.jobs import JobKind, JobPaths, JobRecord, JobSpec, JobState
from autoseg.schedule.lock import RunLock
from autoseg.schedule.resources import PoolConfig, machine_cores
from autoseg.schedule.runner import RunOptions, run_locked
from autoseg.schedule.store import StateStore
from tests.schedule.conftest import DATASET, fake_command, train_jobs

REPO = Path(__file__).resolve().parents[2]


def _runs(paths, job: JobSpec) -> list[dict]:
    path = paths.training_dir(job.training_id()) / "runs.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def test_eight_jobs_on_four_gpus_are_pinned_isolated_and_share_cpus(sched_paths) -> None:
    jobs = train_jobs(8)
    cores = machine_cores()
    summary = run_locked(sched_paths, jobs, LocalExecutor(command_for=fake_command(sched_paths, 3, 0.05)),
                         RunOptions(pool=PoolConfig(gpus=("0", "1", "2", "3"), cores=cores), poll_interval_s=0.02))
    assert summary.ok and summary.counts[JobState.DONE] == 8
    spans = []
    for job in jobs:
        (run,) = _runs(sched_paths, job)
        record = load_record(JobPaths.of(sched_paths, job.job_id).record, JobRecord)
        assert run["cuda"] == record.gpu == record.env["CUDA_VISIBLE_DEVICES"] and run["cuda"] in "0123"
        assert int(run["omp"]) == record.cpus and set(run["affinity"]) <= set(cores)
        assert len(run["affinity"]) == record.cpus
        assert run["tmpdir"] == str(JobPaths.of(sched_paths, job.job_id).tmp)
        spans.append((run["start"], run["end"], run["cuda"], set(run["affinity"]), record.cpus))
    for i, a in enumerate(spans):
        running_at_start = [b for b in spans if b[0] <= a[0] < b[1]]  # includes a itself
        assert sum(b[4] for b in running_at_start) <= len(cores)
        for b in spans[i + 1:]:
            if b[0] < a[1] and a[0] < b[1]:
                assert a[2] != b[2] and not (a[3] & b[3])
    # every file written is inside the writer's own training dir or its own job dir
    allowed = {sched_paths.training_dir(j.training_id()) for j in jobs} | {
        JobPaths.of(sched_paths, j.job_id).folder for j in jobs}
    for f in sched_paths.results.rglob("*"):
        if f.is_file() and f.parent != sched_paths.scheduler_dir():
            assert any(d in f.parents for d in allowed), f
    for j in jobs:
        assert (JobPaths.of(sched_paths, j.job_id).tmp / "scratch.txt").is_file()


def test_failed_job_retried_then_failed_and_dependent_blocked(sched_paths) -> None:
    trains = train_jobs(3)
    best = JobSpec.make(JobKind.FIND_BEST, DATASET, depends_on=tuple(j.job_id for j in trains))
    bad = trains[1].job_id
    summary = run_locked(sched_paths, [*trains, best],
                         LocalExecutor(command_for=fake_command(sched_paths, 1, 0.01, fail=frozenset({bad}))),
                         RunOptions(retries=1, pool=PoolConfig(gpus=("0", "1")), poll_interval_s=0.02))
    assert [f.job_id for f in summary.failures] == [bad] and summary.blocked == (best.job_id,)
    assert summary.counts[JobState.DONE] == 2
    log = JobPaths.of(sched_paths, bad).log.read_text(encoding="utf-8")
    assert log.count("deliberate failure") == 2 and "attempt 2 started" in log


def test_sigkilled_scheduler_then_rerun_resumes(sched_paths) -> None:
    root = sched_paths.results.parent
    cmd = [sys.executable, "-m", "tests.schedule.driver", str(root), "3", "40", "0.05", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    jobs = train_jobs(3)
    first, second = jobs[0], jobs[1]  # longest first: fold_0 runs first, alone on GPU 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (_runs(sched_paths, first) and _ckpt_step(sched_paths, second) >= 3):
        time.sleep(0.05)
    assert _runs(sched_paths, first), "the first job did not finish in time"
    # a second train-all on the same root is refused while the first runs
    result = CliRunner().invoke(autoseg.cli.cli, ["--results", str(sched_paths.results), "--raw", str(sched_paths.raw),
                                                  "train-all", "--gpus", "0", "--quiet"])
    assert result.exit_code == 2
    assert f"another autoseg train-all (pid {proc.pid}" in result.stderr and str(sched_paths.results) in result.stderr
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with StateStore.open(sched_paths) as store:
        assert store.get(second.job_id).state is JobState.RUNNING  # what a SIGKILLed scheduler leaves behind
    time.sleep(0.5)  # the orphan got SIGINT (parent-death signal), saved its checkpoint, exited 130
    assert "interrupted at step" in JobPaths.of(sched_paths, second.job_id).log.read_text(encoding="utf-8")
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert len(_runs(sched_paths, first)) == 1  # not rerun
    assert "resumed from step" in JobPaths.of(sched_paths, second.job_id).log.read_text(encoding="utf-8")
    with StateStore.open(sched_paths) as store:
        assert {r.state for r in store.rows()} == {JobState.DONE}


def _ckpt_step(paths, job: JobSpec) -> int:
    path = paths.training_dir(job.training_id()) / "ckpt.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))["step"]
    except (OSError, ValueError):
        return 0


def test_lock_names_holder_and_is_released_when_holder_dies(sched_paths) -> None:
    code = ("import sys, time; from autoseg.common.paths import Paths; from autoseg.schedule.lock import RunLock; "
            f"RunLock(Paths.under({str(sched_paths.results.parent)!r})).acquire(); print('locked', flush=True); "
            "time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        try:
            RunLock(sched_paths).acquire()
            raise AssertionError("second lock granted")
        except Exception as e:  # noqa: BLE001
            assert f"pid {holder.pid}" in str(e) and "train-all.lock" in str(e)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with RunLock(sched_paths):
        pass
