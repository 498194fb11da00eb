"""Run a job graph: dependencies, longest-first placement, retries, blocking, resume, Ctrl-C.

`run_jobs` is generic (train-all and sweeps both use it): it takes JobSpecs, an executor and a
state store, and keeps going until every job is DONE, FAILED for good, BLOCKED behind a failed
dependency, or the user interrupts. A re-run skips DONE jobs and resumes the others; train
commands always carry ``--continue`` so a resumed or retried training picks up its checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from autoseg.common.jsonio import disk_full_cause, save_record
from autoseg.common.paths import Paths
from autoseg.schedule.executors import EXIT_INTERRUPTED, Executor, JobHandle, Launch, job_environment
from autoseg.schedule.jobs import JobPaths, JobRecord, JobSpec, JobState
from autoseg.schedule.lock import RunLock
from autoseg.schedule.order import (ancestors_of, check_graph, dependents_of, num_workers_for, priorities,
                                    startable_alongside)
from autoseg.schedule.resources import PoolConfig, Slot, SlotPool, augment_device, format_cores
from autoseg.schedule.store import JobRow, StateStore

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
"""What an autoseg command exits with on a problem the user must fix (a broken dataset, a bad
option; `autoseg.cli.app.EXIT_USER_ERROR`, click's usage errors too): a retry would fail the same
way, so such a job fails at once with the command's own ``error:`` line(s)."""

USER_ERROR_TAIL_BYTES = 64 * 1024
"""How much of the end of a job's log is searched for its ``error:`` lines."""

ATTEMPT_HEADER = "=== autoseg scheduler: "
"""How each attempt's part of a job log begins (written by the executors' log header)."""

MAX_MESSAGE_CHARS = 500
"""A failure message longer than this (many dataset problems) is cut; the log has it all."""

DISK_FULL_GRACE_S = 60.0
"""How long running children get to checkpoint and exit when the scheduler stops on a full disk."""


@dataclass(frozen=True)
class RunOptions:
    """How to run a job graph."""

    retries: int = 1
    """Extra attempts after a failure (each resumes from the job's checkpoint)."""
    pool: PoolConfig = field(default_factory=PoolConfig)
    """Local slots (GPUs, packing, CPU slots, cores); ignored by executors without slots (Slurm)."""
    cpus_per_job: int = 8
    """CPU share per job where the executor has no local slot pool (Slurm ``--cpus-per-task``)."""
    poll_interval_s: float = 0.5
    observer: Callable[[list[JobRow]], None] | None = None
    """Called with the current rows every ``observe_every_s`` (the CLI's live table)."""
    observe_every_s: float = 2.0
    job_env: Callable[[JobSpec], dict[str, str]] | None = None
    """Extra variables per job on top of `job_environment`'s (the tracker spec and parent run of a
    train job, `autoseg.schedule.sweep.tracking`); recorded in job.json with the others."""
    run_id: int | None = None
    """The run the jobs are recorded under (`StateStore.new_run_id`); None: a new one. A sweep
    passes one id to both of its `run_jobs` calls, so that `autoseg status` shows them as one run."""


@dataclass(frozen=True)
class Failure:
    """A job that failed for good."""

    job_id: str
    exit_code: int | None
    attempts: int
    log_path: str
    message: str | None = None
    """The job's own ``error:`` line(s) when it failed with a user error."""


@dataclass(frozen=True)
class RunSummary:
    """What a run ended with: jobs per state, failures with their logs, and whether it was interrupted."""

    counts: dict[JobState, int]
    failures: tuple[Failure, ...]
    blocked: tuple[str, ...]
    interrupted: bool
    wall_s: float

    @property
    def ok(self) -> bool:
        return not self.failures and not self.blocked and not self.interrupted

    def one_line(self) -> str:
        """``8 jobs: 7 done, 1 failed (train:...:fold_3, exit 1, log ...), 1 blocked``."""
        total = sum(self.counts.values())
        parts = [f"{n} {s.value}" for s, n in self.counts.items() if n]
        text = f"{total} jobs: " + ", ".join(parts) + f" in {self.wall_s:.0f}s"
        if self.failures:
            f = self.failures[0]
            more = f" (+{len(self.failures) - 1} more, see `autoseg status`)" if len(self.failures) > 1 else ""
            why = f": {f.message}" if f.message else ""
            text += (f"; failed: {f.job_id} (exit {f.exit_code} after {f.attempts} attempt(s){why}), "
                     f"log: {f.log_path}{more}")
        if self.interrupted:
            text += "; interrupted: run the same command again to resume"
        return text


def user_error_message(log_path: Path) -> str | None:
    """The ``error: ...`` lines the last attempt printed (the CLI's one-line user errors), joined by ``; ``."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - USER_ERROR_TAIL_BYTES))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    last_attempt = text.rsplit(ATTEMPT_HEADER, 1)[-1]
    # "error: " is autoseg's one-line user error, "Error: " click's (an unknown option, a bad value)
    errors = [line[len("error: "):].strip() for line in last_attempt.splitlines()
              if line.startswith(("error: ", "Error: "))]
    if not errors:
        return None
    message = "; ".join(errors)
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS - 3] + "..."


@dataclass
class _Running:
    handle: JobHandle
    slot: Slot | None
    record: JobRecord
    interrupt_sent: bool = False


class _Run:
    """The state of one `run_jobs` call (kept out of module globals)."""

    def __init__(self, jobs: list[JobSpec], executor: Executor, paths: Paths, store: StateStore,
                 options: RunOptions) -> None:
        self.jobs, self.executor, self.paths, self.store, self.options = jobs, executor, paths, store, options
        self.by_id = {j.job_id: j for j in jobs}
        self.prio = priorities(jobs)
        self.ancestors = ancestors_of(jobs)
        self.pool = SlotPool(options.pool) if executor.uses_slots else None
        self.running: dict[str, _Running] = {}
        self.tries: dict[str, int] = {j.job_id: 0 for j in jobs}
        self.state: dict[str, JobState] = {}
        self.interrupting = False
        self.host = socket.gethostname()

    # ------------------------------------------------------------------ start of a run
    def reconcile(self) -> None:
        """Take over the store: DONE stays done, RUNNING without a scheduler is reattached or interrupted."""
        rows = {r.job_id: r for r in self.store.rows()}
        for job in self.jobs:
            row = rows[job.job_id]
            state = row.state
            if state is JobState.RUNNING:
                jp = JobPaths.of(self.paths, job.job_id)
                handle = self.executor.reclaim(row, jp) if row.executor == self.executor.name else None
                if handle is not None:
                    record = JobRecord(spec=job, attempt=row.attempt, state=JobState.RUNNING,
                                       executor=self.executor.name, command=(), env={}, gpu=row.gpu,
                                       cpus=row.cpus or 0, host=row.host or self.host,
                                       external_id=row.external_id, started_at=row.started_at)
                    self.running[job.job_id] = _Running(handle, None, record)
                    self.tries[job.job_id] = 1
                    log.info("%s: reattached to %s job %s", job.job_id, self.executor.name, row.external_id)
                    self.state[job.job_id] = JobState.RUNNING
                    continue
                log.info("%s: its earlier run was cut off; it resumes from its checkpoint", job.job_id)
                self.store.update(job.job_id, state=JobState.INTERRUPTED)
                state = JobState.INTERRUPTED
            self.state[job.job_id] = JobState.DONE if state is JobState.DONE else JobState.PENDING
            if state in (JobState.FAILED, JobState.BLOCKED):
                self.store.update(job.job_id, state=JobState.PENDING)

    # ------------------------------------------------------------------ the loop
    def step(self) -> bool:
        """Reap finished jobs and start ready ones; False once nothing is left to do."""
        self.reap()
        if not self.interrupting:
            self.launch_ready()
        if self.running:
            return True
        return not self.interrupting and bool(self.ready())

    def ready(self) -> list[JobSpec]:
        """Pending jobs whose dependencies are done (or in flight on an executor that chains them)."""
        out = []
        for j in self.jobs:
            if self.state[j.job_id] is not JobState.PENDING:
                continue
            deps_ok = all(self._dep_state(d) is JobState.DONE or (
                self.executor.supports_dependencies and d in self.running) for d in j.depends_on)
            if deps_ok:
                out.append(j)
        return sorted(out, key=lambda j: -self.prio[j.job_id])

    def _dep_state(self, dep: str) -> JobState:
        if dep in self.state:
            return self.state[dep]
        row = self.store.get(dep)
        return row.state if row is not None else JobState.PENDING

    def launch_ready(self) -> None:
        ready = self.ready()
        if self.pool is None:
            for job in ready:
                self.launch(job, None)
            return
        if ready:
            for job, slot in self.pool.acquire(ready, later=self.could_start_later):
                self.launch(job, slot)

    def could_start_later(self, starting: list[JobSpec]) -> list[JobSpec]:
        """Pending jobs that could start while the running ones and ``starting`` run (`startable_alongside`)."""
        busy = set(self.running) | {j.job_id for j in starting}
        pending = [j for j in self.jobs if self.state[j.job_id] is JobState.PENDING]
        return startable_alongside(pending, busy, self.ancestors)

    def launch(self, job: JobSpec, slot: Slot | None) -> None:
        jp = JobPaths.of(self.paths, job.job_id).make()
        cpus = len(slot.cpus) if slot is not None else (job.resources.cpus or self.options.cpus_per_job)
        workers = num_workers_for(job, cpus)
        gpu = slot.gpu if slot is not None else None
        cores = slot.cpus if slot is not None else ()
        env = job_environment(self.paths, gpu, cpus, jp, job.job_id, workers, pin_gpu=self.pool is not None)
        if self.options.job_env is not None:
            env.update(self.options.job_env(job))
        command = tuple(job.command(self.paths, num_workers=workers))
        row = self.store.get(job.job_id)
        attempt = (row.attempt if row else 0) + 1
        self.tries[job.job_id] += 1
        after = tuple(self.running[d].handle.external_id for d in job.depends_on if d in self.running)
        launch = Launch(job=job, command=command, env=env, job_paths=jp, slot=slot, cpus=cpus,
                        attempt=attempt, after=after)
        try:
            handle = self.executor.submit(launch)
        except Exception as e:  # the job log's header on a full disk: the job never started
            full = _disk_full(e, jp.log)
            if full is None:
                raise
            if slot is not None and self.pool is not None:
                self.pool.release(slot, job)
            self.state[job.job_id] = JobState.FAILED
            self.record_disk_full(job.job_id, JobState.FAILED, full, log_path=str(jp.log))
            raise full from e
        record = JobRecord(spec=job, attempt=attempt, state=JobState.RUNNING, executor=self.executor.name,
                           command=command, env=env, gpu=gpu, cpus=cpus, host=self.host,
                           external_id=handle.external_id, started_at=time.time(), cores=cores, workers=workers,
                           augment_device=augment_device(job, gpu is not None) if slot is not None else None)
        # tracked before anything else is written: a full disk from here on stops a known child
        self.running[job.job_id] = _Running(handle, slot, record)
        self.set_state(job.job_id, JobState.RUNNING, attempt=attempt, gpu=gpu, cpus=cpus, workers=workers,
                          executor=self.executor.name, external_id=handle.external_id, host=self.host,
                          started_at=record.started_at, ended_at=None, exit_code=None, log_path=str(jp.log),
                          message=None)
        try:
            save_record(jp.record, record)
        except Exception as e:
            full = _disk_full(e, jp.record)
            if full is None:
                raise
            raise full from e
        log.info("started %s (attempt %d, GPU %s, %d CPUs %s, %d workers)", job.job_id, attempt, gpu, cpus,
                 format_cores(cores) or "-", workers)

    def set_state(self, job_id: str, state: JobState, **fields: object) -> None:
        """The one place a job's state changes: this run's table, then the state store (with ``fields``).

        The attempt's ``job.json`` (`JobRecord`) is written beside it at the start and end of an
        attempt (`launch`, `finish`); `record_disk_full` is the best-effort variant on a full disk.
        """
        self.state[job_id] = state
        self.store.update(job_id, state=state, **fields)

    def reap(self) -> None:
        for job_id, run in list(self.running.items()):
            if job_id not in self.running:  # dropped while handling another job's failure
                continue
            rc = run.handle.poll()
            if rc is None:
                continue
            self.finish(job_id, run, rc)

    def finish(self, job_id: str, run: _Running, rc: int) -> None:
        del self.running[job_id]
        job = self.by_id[job_id]
        if run.slot is not None and self.pool is not None:
            self.pool.release(run.slot, job)
        message = None
        if rc == 0:
            state = JobState.DONE
        elif self.interrupting or (run.interrupt_sent and rc == EXIT_INTERRUPTED):
            state = JobState.INTERRUPTED
        elif rc == EXIT_USER_ERROR:  # the same input fails the same way: no retry
            state = JobState.FAILED
            message = user_error_message(JobPaths.of(self.paths, job_id).log)
            log.error("%s failed: %s (exit %d, not retried); log: %s", job_id, message or "a user error", rc,
                      JobPaths.of(self.paths, job_id).log)
        elif self.tries[job_id] <= self.options.retries:
            state = JobState.PENDING
            log.warning("%s failed (exit %d); retrying with --continue (attempt %d of %d)", job_id, rc,
                        self.tries[job_id] + 1, self.options.retries + 1)
        else:
            state = JobState.FAILED
            log.error("%s failed (exit %d); log: %s", job_id, rc, JobPaths.of(self.paths, job_id).log)
        ended = time.time()
        save_record(JobPaths.of(self.paths, job_id).record,
                    replace(run.record, state=state, ended_at=ended, exit_code=rc))
        self.set_state(job_id, state, ended_at=ended, exit_code=rc, message=message)
        if state is JobState.PENDING:
            self._recall_chained(job_id, blocked=False)
        elif state is JobState.FAILED:
            self._recall_chained(job_id, blocked=True)
            for dep in sorted(dependents_of(self.jobs, job_id)):
                if self.state[dep] in (JobState.PENDING, JobState.INTERRUPTED):
                    self.set_state(dep, JobState.BLOCKED)
                    log.warning("%s blocked: %s failed", dep, job_id)

    def _recall_chained(self, job_id: str, blocked: bool) -> None:
        """Jobs already queued behind ``job_id`` (Slurm afterok) are cancelled: re-queued later, or blocked."""
        for dep in dependents_of(self.jobs, job_id):
            run = self.running.pop(dep, None)
            if run is None:
                continue
            run.handle.kill()
            self.tries[dep] -= 1
            new = JobState.BLOCKED if blocked else JobState.PENDING
            self.set_state(dep, new, external_id=None)

    # ------------------------------------------------------------------ a full disk
    def record_disk_full(self, job_id: str, state: JobState, err: OSError, **fields: object) -> None:
        """Best effort: the store may sit on the full disk too (then `autoseg status` sees a dead scheduler)."""
        try:
            self.store.update(job_id, state=state, ended_at=time.time(), message=disk_full_reason(err), **fields)
        except Exception as e:
            if disk_full_cause(e) is None:
                raise
            log.warning("%s: cannot record it as %s: the state store's disk is full too", job_id, state.value)

    def stop_on_disk_full(self, err: OSError) -> None:
        """The scheduler cannot write (its store, a job log or record): stop every child cleanly, say why.

        Children get SIGINT (they checkpoint and exit) and ``DISK_FULL_GRACE_S`` before SIGKILL;
        their jobs become INTERRUPTED with the reason, so a run after freeing space resumes them.
        """
        if self.running:
            log.warning("the disk is full: interrupting %d running job(s); they checkpoint and stop", len(self.running))
        self.interrupt_all()
        deadline = time.monotonic() + DISK_FULL_GRACE_S
        while self.running and time.monotonic() < deadline:
            for job_id, run in list(self.running.items()):
                rc = run.handle.poll()
                if rc is not None:
                    del self.running[job_id]
                    self.record_disk_full(job_id, JobState.INTERRUPTED, err, exit_code=rc)
            time.sleep(0.1)
        for job_id, run in list(self.running.items()):
            run.handle.kill()
            del self.running[job_id]
            self.record_disk_full(job_id, JobState.INTERRUPTED, err)

    # ------------------------------------------------------------------ Ctrl-C
    def interrupt_all(self) -> None:
        """First Ctrl-C: every child checkpoints and stops (SIGINT to its process group)."""
        self.interrupting = True
        for run in self.running.values():
            run.interrupt_sent = True
            run.handle.interrupt()

    def kill_all(self) -> None:
        """Second Ctrl-C: stop now."""
        for run in self.running.values():
            run.handle.kill()

    def summary(self, started: float) -> RunSummary:
        counts = {s: 0 for s in JobState}
        failures, blocked = [], []
        for job in self.jobs:
            row = self.store.get(job.job_id)
            if row is None:
                continue
            counts[row.state] += 1
            if row.state is JobState.FAILED:
                failures.append(Failure(job.job_id, row.exit_code, row.attempt,
                                        row.log_path or str(JobPaths.of(self.paths, job.job_id).log), row.message))
            elif row.state is JobState.BLOCKED:
                blocked.append(job.job_id)
        return RunSummary(counts=counts, failures=tuple(failures), blocked=tuple(blocked),
                          interrupted=self.interrupting, wall_s=time.time() - started)


def run_jobs(jobs: list[JobSpec], executor: Executor, paths: Paths, store: StateStore,
             options: RunOptions = RunOptions()) -> RunSummary:
    """Run a job graph to the end; skips DONE jobs, resumes interrupted ones, retries, blocks dependents.

    The caller holds the results root's `RunLock`. Ctrl-C once: children checkpoint and stop,
    their jobs become INTERRUPTED; twice: they are killed.
    """
    started = time.time()
    done_before = {r.job_id for r in store.rows() if r.state is JobState.DONE}
    check_graph(jobs, done_before)
    ids = {j.job_id for j in jobs}

    def observe() -> None:  # this run's jobs only: the store also holds every earlier run's
        options.observer([r for r in store.rows() if r.job_id in ids])  # type: ignore[misc]

    with _ctrl_c_presses() as presses:
        store.register(jobs, options.run_id if options.run_id is not None else store.new_run_id())
        run = _Run(jobs, executor, paths, store, options)
        run.reconcile()
        last_observed = 0.0
        handled = 0
        while True:
            try:
                while handled < len(presses):
                    handled += 1
                    _on_ctrl_c(run, handled)
                if not run.step():
                    break
                if options.observer is not None and time.monotonic() - last_observed >= options.observe_every_s:
                    last_observed = time.monotonic()
                    observe()
                time.sleep(options.poll_interval_s)
            except KeyboardInterrupt:  # raised by hand, or SIGINT outside the main thread's handler
                presses.append(time.monotonic())
            except Exception as e:  # a full disk under the scheduler: stop the children, then fail in one line
                full = _disk_full(e, paths.scheduler_dir())
                if full is None:
                    raise
                run.stop_on_disk_full(full)
                raise full from e
    if options.observer is not None:
        observe()
    return run.summary(started)


def _disk_full(exc: BaseException, writing: str | os.PathLike[str]) -> OSError | None:
    """``exc``'s ENOSPC/EDQUOT error naming a file (its own, else ``writing``); None when it is another error."""
    full = disk_full_cause(exc)
    if full is None:
        return None
    return full if full.filename else OSError(full.errno, os.strerror(full.errno), str(writing))


def disk_full_reason(err: OSError) -> str:
    """What a job stopped by a full disk records: ``<file>: no space left on device (disk full); ...``."""
    return f"{err.filename}: {err.strerror.lower()} (disk full); free space and run the same command again"


@contextlib.contextmanager
def _ctrl_c_presses() -> Iterator[list[float]]:
    """SIGINT recorded in a list that the loop reads between steps.

    A KeyboardInterrupt raised wherever the loop happens to be (between starting a child and
    recording it, or between reaping a job and saving its state) would leave a job untracked
    or its state unsaved; a handler that only records the press keeps every step whole.
    """
    presses: list[float] = []
    if threading.current_thread() is not threading.main_thread():
        yield presses
        return

    def handler(signum: int, frame: object) -> None:
        presses.append(time.monotonic())

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield presses
    finally:
        signal.signal(signal.SIGINT, previous)


def _on_ctrl_c(run: _Run, press: int) -> None:
    """First Ctrl-C: every running job checkpoints and stops; any later one: kill them."""
    if press == 1:
        log.warning("interrupting %d running job(s); they save a checkpoint (Ctrl-C again to kill)", len(run.running))
        run.interrupt_all()
    else:
        log.warning("killing %d running job(s)", len(run.running))
        run.kill_all()


def run_locked(paths: Paths, jobs: list[JobSpec], executor: Executor,
               options: RunOptions = RunOptions()) -> RunSummary:
    """`run_jobs` under the results root's lock, with the root's state store (train-all, sweeps)."""
    with RunLock(paths), StateStore.open(paths) as store:
        return run_jobs(jobs, executor, paths, store, options)
