"""Scheduler logic on stand-in jobs in threads: order, placement, retries, blocking, resume."""

from __future__ import annotations

import threading
import time

import pytest

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import load_record
from autoseg.schedule.executors import InProcessExecutor, Launch
from autoseg.schedule.jobs import JobKind, JobPaths, JobRecord, JobSpec, JobState, Resources
from autoseg.schedule.resources import PoolConfig
from autoseg.schedule.order import check_graph, priorities, simulate_schedule
from autoseg.schedule.runner import RunOptions, run_jobs
from autoseg.schedule.store import StateStore
from tests.schedule.conftest import DATASET, train_jobs

FAST = dict(poll_interval_s=0.01)


class Recorder:
    """A job function that records (job, gpu, start, end, attempt) and fails the jobs it is told to."""

    def __init__(self, fail: dict[str, int] | None = None, sleep_s: float = 0.02) -> None:
        self.fail = dict(fail or {})  # job id -> how many attempts fail
        self.sleep_s = sleep_s
        self.events: list[tuple[str, str | None, float, float, int]] = []
        self.lock = threading.Lock()

    def __call__(self, launch: Launch, stop: threading.Event) -> int:
        start = time.monotonic()
        stop.wait(self.sleep_s)
        with self.lock:
            self.events.append((launch.job.job_id, launch.slot.gpu if launch.slot else None, start,
                                time.monotonic(), launch.attempt))
            if self.fail.get(launch.job.job_id, 0) > 0:
                self.fail[launch.job.job_id] -= 1
                return 1
        return 130 if stop.is_set() else 0


def _graph() -> list[JobSpec]:
    plan = JobSpec.make(JobKind.PLAN, DATASET)
    prep = JobSpec.make(JobKind.PREPROCESS, DATASET, depends_on=(plan.job_id,))
    trains = train_jobs(4, depends_on=(prep.job_id,))
    best = JobSpec.make(JobKind.FIND_BEST, DATASET, depends_on=tuple(j.job_id for j in trains))
    return [plan, prep, *trains, best]


def _run(paths, jobs, fn, gpus=("0", "1"), retries=1):
    with StateStore.open(paths) as store:
        return run_jobs(jobs, InProcessExecutor(fn), paths, store,
                        RunOptions(retries=retries, pool=PoolConfig(gpus=gpus, cores=tuple(range(8))), **FAST))


def test_dependencies_order_and_one_job_per_gpu(sched_paths) -> None:
    rec = Recorder()
    summary = _run(sched_paths, _graph(), rec)
    assert summary.ok and summary.counts[JobState.DONE] == 7
    start = {e[0]: e[2] for e in rec.events}
    end = {e[0]: e[3] for e in rec.events}
    jobs = {j.job_id: j for j in _graph()}
    for jid, job in jobs.items():
        for dep in job.depends_on:
            assert end[dep] <= start[jid]
    by_gpu: dict[str, list[tuple[float, float]]] = {}
    for jid, gpu, s, e, _ in rec.events:
        if jobs[jid].kind is JobKind.TRAIN:
            assert gpu in ("0", "1")
            by_gpu.setdefault(gpu, []).append((s, e))
        else:
            assert gpu is None
    for spans in by_gpu.values():
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_failure_is_retried_then_failed_and_dependents_blocked(sched_paths) -> None:
    jobs = _graph()
    bad = jobs[3].job_id  # fold 1
    flaky = jobs[4].job_id  # fold 2 fails once, then succeeds on retry
    rec = Recorder(fail={bad: 99, flaky: 1})
    summary = _run(sched_paths, jobs, rec, retries=1)
    assert not summary.ok
    assert [f.job_id for f in summary.failures] == [bad] and summary.failures[0].attempts == 2
    assert summary.blocked == (jobs[-1].job_id,)
    assert summary.counts[JobState.DONE] == 5  # plan, preprocess, folds 0, 2, 3
    assert [e[4] for e in rec.events if e[0] == flaky] == [1, 2]
    assert "failed: " + bad in summary.one_line() and "log.txt" in summary.one_line()
    record = load_record(JobPaths.of(sched_paths, bad).record, JobRecord)
    assert record.state is JobState.FAILED and record.exit_code == 1 and record.attempt == 2


def test_rerun_skips_done_and_retries_failed(sched_paths) -> None:
    jobs = _graph()
    bad = jobs[3].job_id
    _run(sched_paths, jobs, Recorder(fail={bad: 2}), retries=1)
    rec = Recorder()
    summary = _run(sched_paths, jobs, rec)
    assert summary.ok
    assert sorted(e[0] for e in rec.events) == sorted([bad, jobs[-1].job_id])
    assert [e[4] for e in rec.events if e[0] == bad] == [3]  # attempts keep counting across runs


def test_stale_running_job_is_resumed(sched_paths) -> None:
    jobs = train_jobs(2)
    with StateStore.open(sched_paths) as store:
        store.register(jobs)
        store.update(jobs[0].job_id, state=JobState.RUNNING, executor="inprocess", external_id="thread-1")
        store.update(jobs[1].job_id, state=JobState.DONE)
    rec = Recorder()
    assert _run(sched_paths, jobs, rec).ok
    assert [e[0] for e in rec.events] == [jobs[0].job_id]


def test_longest_jobs_start_first(sched_paths) -> None:
    jobs = train_jobs(4, durations=[1.0, 50.0, 5.0, 20.0])
    rec = Recorder()
    _run(sched_paths, jobs, rec, gpus=("0",))
    assert [e[0][-6:] for e in sorted(rec.events, key=lambda e: e[2])] == ["fold_1", "fold_3", "fold_2", "fold_0"]
    prio = priorities(_graph())
    assert prio["plan:" + DATASET] > prio["preprocess:" + DATASET] > prio["find_best:" + DATASET]


def test_simulated_makespan_matches_lpt() -> None:
    durations = [7.0, 5.0, 4.0, 3.0, 3.0, 2.0]
    jobs = train_jobs(6, durations=durations)
    placed = simulate_schedule(jobs, PoolConfig(gpus=("0", "1"), cores=tuple(range(8))))
    makespan = max(a.end_s for a in placed)
    assert makespan == 12.0  # LPT: {7,3,2} and {5,4,3}
    assert makespan >= sum(durations) / 2


def test_bad_graphs_are_refused() -> None:
    a = JobSpec(job_id="a", kind=JobKind.PLAN, dataset="D", depends_on=("b",))
    b = JobSpec(job_id="b", kind=JobKind.PLAN, dataset="D", depends_on=("a",))
    with pytest.raises(AutosegError, match="cycle"):
        check_graph([a, b])
    with pytest.raises(AutosegError, match="unknown"):
        check_graph([a])
    with pytest.raises(AutosegError, match="duplicate"):
        check_graph([b, b, a])


def test_interrupt_marks_running_jobs_interrupted(sched_paths) -> None:
    jobs = train_jobs(3, durations=[3.0, 2.0, 1.0])
    started = threading.Event()

    def fn(launch: Launch, stop: threading.Event) -> int:
        started.set()
        stop.wait(30)
        return 130

    def press_ctrl_c() -> None:
        started.wait(10)
        time.sleep(0.05)
        import _thread

        _thread.interrupt_main()

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    summary = _run(sched_paths, jobs, fn, gpus=("0",))
    assert summary.interrupted and summary.counts[JobState.INTERRUPTED] == 1
    assert summary.counts[JobState.PENDING] == 2
    assert "resume" in summary.one_line()


def test_resources_of_cpu_jobs(sched_paths) -> None:
    rec = Recorder()
    job = JobSpec.make(JobKind.PREPROCESS, DATASET, resources=Resources(cpus=2))
    assert _run(sched_paths, [job], rec).ok
    record = load_record(JobPaths.of(sched_paths, job.job_id).record, JobRecord)
    assert record.env["CUDA_VISIBLE_DEVICES"] == "" and record.gpu is None
    assert int(record.env["OMP_NUM_THREADS"]) == record.cpus >= 1
