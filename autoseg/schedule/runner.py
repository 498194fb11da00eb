"""Run a job graph: dependencies, longest-first placement, retries, blocking, resume, Ctrl-C.

`run_jobs` is generic (train-all and sweeps both use it): it takes JobSpecs, an executor and a
state store, and keeps going until every job is DONE, FAILED for good, BLOCKED behind a failed
dependency, or the user interrupts. A re-run skips DONE jobs and resumes the others; train
commands always carry ``--continue`` so a resumed or retried training picks up its checkpoint.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import save_record
from autoseg.common.paths import Paths
from autoseg.schedule.executors import EXIT_INTERRUPTED, Executor, JobHandle, Launch, job_environment
from autoseg.schedule.jobs import (CASCADE_FOLDS, JobKind, JobPaths, JobRecord, JobSpec, JobState, Resources,
                                   link_cascades, previous_stage_of)
from autoseg.schedule.resources import PoolConfig, Slot, SlotPool
from autoseg.schedule.store import JobRow, StateStore

log = logging.getLogger(__name__)

UNKNOWN_DURATION_S = 60.0
"""Duration assumed for ordering when a job has no estimate (plan/preprocess/find-best)."""


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


@dataclass(frozen=True)
class Failure:
    """A job that failed for good."""

    job_id: str
    exit_code: int | None
    attempts: int
    log_path: str


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
            text += f"; failed: {f.job_id} (exit {f.exit_code} after {f.attempts} attempt(s)), log: {f.log_path}{more}"
        if self.interrupted:
            text += "; interrupted: run the same command again to resume"
        return text


def check_graph(jobs: list[JobSpec], done_elsewhere: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Unique ids, known dependencies, no cycles; an `AutosegError` otherwise."""
    ids = [j.job_id for j in jobs]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise AutosegError(f"duplicate job ids {dupes}")
    known = set(ids)
    for j in jobs:
        missing = [d for d in j.depends_on if d not in known and d not in done_elsewhere]
        if missing:
            raise AutosegError(f"depends on unknown job(s) {missing}", j.job_id)
    order = topological_order(jobs)
    if len(order) != len(jobs):
        stuck = sorted(known - set(order))
        raise AutosegError(f"dependency cycle among {stuck}")


def topological_order(jobs: list[JobSpec]) -> list[str]:
    """Job ids with every job after its (in-graph) dependencies (Kahn's algorithm; cycles dropped)."""
    known = {j.job_id for j in jobs}
    indeg = {j.job_id: sum(1 for d in j.depends_on if d in known) for j in jobs}
    children: dict[str, list[str]] = {j.job_id: [] for j in jobs}
    for j in jobs:
        for d in j.depends_on:
            if d in known:
                children[d].append(j.job_id)
    queue = [i for i, n in indeg.items() if n == 0]
    order = []
    while queue:
        i = queue.pop(0)
        order.append(i)
        for c in children[i]:
            indeg[c] -= 1
            if indeg[c] == 0:
                queue.append(c)
    return order


def priorities(jobs: list[JobSpec]) -> dict[str, float]:
    """Critical-path length from each job to the end of the graph (longest first = LPT on a DAG)."""
    by_id = {j.job_id: j for j in jobs}
    children: dict[str, list[str]] = {j.job_id: [] for j in jobs}
    for j in jobs:
        for d in j.depends_on:
            if d in children:
                children[d].append(j.job_id)
    prio: dict[str, float] = {}
    for jid in reversed(topological_order(jobs)):
        own = by_id[jid].resources.est_duration_s or UNKNOWN_DURATION_S
        prio[jid] = own + max((prio[c] for c in children[jid]), default=0.0)
    return prio


def dependents_of(jobs: list[JobSpec], job_id: str) -> set[str]:
    """Every job that (transitively) depends on ``job_id``."""
    out: set[str] = set()
    frontier = {job_id}
    while frontier:
        nxt = {j.job_id for j in jobs if set(j.depends_on) & frontier} - out
        out |= nxt
        frontier = nxt
    return out


def num_workers_for(job: JobSpec, cpus: int) -> int:
    """Data-loader workers for a training (one core stays with the main process); processes otherwise."""
    return max(0, cpus - 1) if job.kind is JobKind.TRAIN else max(1, cpus)


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
        for job in self.ready():
            slot = None
            if self.pool is not None:
                slot = self.pool.acquire(job)
                if slot is None:
                    continue
            self.launch(job, slot)

    def launch(self, job: JobSpec, slot: Slot | None) -> None:
        jp = JobPaths.of(self.paths, job.job_id).make()
        cpus = len(slot.cpus) if slot is not None else (job.resources.cpus or self.options.cpus_per_job)
        workers = num_workers_for(job, cpus)
        gpu = slot.gpu if slot is not None else None
        env = job_environment(self.paths, gpu, cpus, jp, job.job_id, workers, pin_gpu=self.pool is not None)
        command = tuple(job.command(self.paths, num_workers=workers))
        row = self.store.get(job.job_id)
        attempt = (row.attempt if row else 0) + 1
        self.tries[job.job_id] += 1
        after = tuple(self.running[d].handle.external_id for d in job.depends_on if d in self.running)
        launch = Launch(job=job, command=command, env=env, job_paths=jp, slot=slot, cpus=cpus,
                        attempt=attempt, after=after)
        handle = self.executor.submit(launch)
        record = JobRecord(spec=job, attempt=attempt, state=JobState.RUNNING, executor=self.executor.name,
                           command=command, env=env, gpu=gpu, cpus=cpus, host=self.host,
                           external_id=handle.external_id, started_at=time.time())
        save_record(jp.record, record)
        self.store.update(job.job_id, state=JobState.RUNNING, attempt=attempt, gpu=gpu, cpus=cpus,
                          executor=self.executor.name, external_id=handle.external_id, host=self.host,
                          started_at=record.started_at, ended_at=None, exit_code=None, log_path=str(jp.log))
        self.state[job.job_id] = JobState.RUNNING
        self.running[job.job_id] = _Running(handle, slot, record)
        log.info("started %s (attempt %d, GPU %s, %d CPUs)", job.job_id, attempt, gpu, cpus)

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
        if rc == 0:
            state = JobState.DONE
        elif self.interrupting or (run.interrupt_sent and rc == EXIT_INTERRUPTED):
            state = JobState.INTERRUPTED
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
        self.store.update(job_id, state=state, ended_at=ended, exit_code=rc)
        self.state[job_id] = state
        if state is JobState.PENDING:
            self._recall_chained(job_id, blocked=False)
        elif state is JobState.FAILED:
            self._recall_chained(job_id, blocked=True)
            for dep in sorted(dependents_of(self.jobs, job_id)):
                if self.state[dep] in (JobState.PENDING, JobState.INTERRUPTED):
                    self.state[dep] = JobState.BLOCKED
                    self.store.update(dep, state=JobState.BLOCKED)
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
            self.state[dep] = new
            self.store.update(dep, state=new, external_id=None)

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
                                        row.log_path or str(JobPaths.of(self.paths, job.job_id).log)))
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
    with _ctrl_c_presses() as presses:
        store.register(jobs)
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
                    options.observer(store.rows())
                time.sleep(options.poll_interval_s)
            except KeyboardInterrupt:  # raised by hand, or SIGINT outside the main thread's handler
                presses.append(time.monotonic())
    if options.observer is not None:
        options.observer(store.rows())
    return run.summary(started)


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


# ---------------------------------------------------------------------- dry run: who would run where


@dataclass(frozen=True)
class Assignment:
    """One job in a simulated schedule (estimated durations, the same placement rules as a real run)."""

    job_id: str
    gpu: str | None
    cpus: int
    start_s: float
    end_s: float


def simulate_schedule(jobs: list[JobSpec], pool: PoolConfig) -> list[Assignment]:
    """Place jobs as `run_jobs` would, with estimated durations; for ``--dry-run`` and benchmarks."""
    check_graph(jobs)
    slots = SlotPool(pool)
    prio = priorities(jobs)
    by_id = {j.job_id: j for j in jobs}
    done: set[str] = set()
    started: set[str] = set()
    events: list[tuple[float, str]] = []
    out: list[Assignment] = []
    held: dict[str, Slot] = {}
    now = 0.0
    while len(done) < len(jobs):
        ready = sorted((j for j in jobs if j.job_id not in started and set(j.depends_on) <= done),
                       key=lambda j: -prio[j.job_id])
        for j in ready:
            slot = slots.acquire(j)
            if slot is None:
                continue
            dur = j.resources.est_duration_s or UNKNOWN_DURATION_S
            held[j.job_id] = slot
            started.add(j.job_id)
            heapq.heappush(events, (now + dur, j.job_id))
            out.append(Assignment(j.job_id, slot.gpu, len(slot.cpus), now, now + dur))
        if not events:
            raise AutosegError("jobs cannot be placed on this pool (a dependency cycle?)")
        now, jid = heapq.heappop(events)
        slots.release(held.pop(jid), by_id[jid])
        done.add(jid)
    return out


# ---------------------------------------------------------------------- train-all: the job graph

DEFAULT_CONFIGS_UNPLANNED = ("2d", "3d_fullres")
"""Configurations trained when a dataset is not planned yet and none are named (3d_lowres exists
only for large images, which is unknown before planning)."""

REFERENCE_VOXELS_PER_S = 6e6
"""Rough training throughput (patch voxels x batch per second) used only to order jobs longest-first."""

DEFAULT_EPOCHS = 1000
DEFAULT_ITERATIONS_PER_EPOCH = 250
DEFAULT_VAL_ITERATIONS = 50
"""nnU-Net's schedule (also TrainerConfig's defaults), for duration estimates without ``--set``."""


def _override_number(overrides: tuple[str, ...], keys: tuple[str, ...], default: float) -> float:
    value = default
    for item in overrides:
        key, _, text = item.partition("=")
        if key.strip() in keys:
            try:
                value = float(text)
            except ValueError:
                pass  # the trainer reports a bad value with its own message
    return value


def estimate_train_seconds(patch_size: tuple[int, ...], batch_size: int, overrides: tuple[str, ...] = ()) -> float:
    """Estimated training time from the plan and the schedule: patch voxels x batch x steps / throughput."""
    voxels = 1.0
    for s in patch_size:
        voxels *= s
    batch = _override_number(overrides, ("batch_size",), batch_size)
    epochs = _override_number(overrides, ("epochs",), DEFAULT_EPOCHS)
    steps = epochs * (_override_number(overrides, ("iterations_per_epoch",), DEFAULT_ITERATIONS_PER_EPOCH)
                      + _override_number(overrides, ("val_iterations",), DEFAULT_VAL_ITERATIONS))
    return voxels * batch * steps / REFERENCE_VOXELS_PER_S


def _planned(paths: Paths, dataset: str):  # type: ignore[no-untyped-def]
    from autoseg.planning.plan import load_plan

    return load_plan(paths, dataset) if paths.plans_file(dataset).is_file() else None


def _missing_preprocessing(paths: Paths, dataset: str, plan, configs: tuple[str, ...]) -> tuple[str, ...]:  # type: ignore[no-untyped-def]
    """Configurations whose preprocessed data (every raw case) or the dataset's splits.json are missing."""
    from autoseg.dataset.spec import load_dataset
    from autoseg.preprocess import list_preprocessed_cases

    n_cases = len(load_dataset(paths.raw_dataset(dataset)).cases) if paths.raw_dataset(dataset).is_dir() else 0
    missing = []
    for name in configs:
        folder = paths.preprocessed_data(dataset, plan.configuration(name).data_identifier)
        if not folder.is_dir() or len(list_preprocessed_cases(folder)) < n_cases:
            missing.append(name)
    if not missing and not paths.splits_file(dataset).is_file():
        missing = list(configs)
    return tuple(missing)


@dataclass(frozen=True)
class TrainAllRequest:
    """What ``autoseg train-all`` was asked for."""

    datasets: tuple[str, ...] = ()
    """Names or ids; empty = every dataset in the raw root."""
    configs: tuple[str, ...] = ()
    """Empty = every planned configuration (2d and 3d_fullres for datasets not planned yet)."""
    folds: tuple[int | str, ...] = (0, 1, 2, 3, 4)
    trainer_overrides: tuple[str, ...] = ()
    gpu_memory_gb: float | None = None
    variant: str = "default"


def build_train_all_jobs(paths: Paths, request: TrainAllRequest) -> list[JobSpec]:
    """Plan -> preprocess -> train per config x fold -> find-best, per dataset; finished stages omitted."""
    names = [paths.resolve_dataset(d) for d in request.datasets] or paths.list_raw_datasets()
    if not names:
        raise AutosegError("no datasets found (DatasetXXX_Name folders)", paths.raw)
    jobs: list[JobSpec] = []
    for ds in dict.fromkeys(names):
        jobs += _dataset_jobs(paths, ds, request)
    return jobs


def _dataset_jobs(paths: Paths, ds: str, req: TrainAllRequest) -> list[JobSpec]:
    plan = _planned(paths, ds)
    configs = req.configs or (tuple(plan.configurations) if plan else DEFAULT_CONFIGS_UNPLANNED)
    if plan is not None:
        for name in configs:
            plan.configuration(name)  # unknown configuration: an error listing the planned ones
    # a cascade needs its previous stage on every fold, even when not asked for
    previous = tuple(dict.fromkeys(p for p in (previous_stage_of(plan, c) for c in configs) if p))
    configs = tuple(dict.fromkeys((*previous, *configs)))
    jobs: list[JobSpec] = []
    train_deps: tuple[str, ...] = ()
    if plan is None:
        plan_job = JobSpec.make(JobKind.PLAN, ds, configs=configs,
                                resources=Resources(gpus=0, gpu_memory_gb=req.gpu_memory_gb))
        prep = JobSpec.make(JobKind.PREPROCESS, ds, configs=configs, depends_on=(plan_job.job_id,))
        jobs += [plan_job, prep]
        train_deps = (prep.job_id,)
    else:
        missing = _missing_preprocessing(paths, ds, plan, configs)
        if missing:
            prep = JobSpec.make(JobKind.PREPROCESS, ds, configs=missing)
            jobs.append(prep)
            train_deps = (prep.job_id,)
    train_ids: list[str] = []
    complete_configs = []
    ensembles = len(configs) > 1  # find-best can compare ensembles only with saved softmax maps
    for name in configs:
        conf = plan.configurations[name] if plan else None
        res = Resources(gpus=1, gpu_memory_gb=(conf.estimated_vram_gb or None) if conf else None,
                        est_duration_s=estimate_train_seconds(conf.patch_size, conf.batch_size,
                                                              req.trainer_overrides) if conf else None)
        folds = tuple(dict.fromkeys((*CASCADE_FOLDS, *req.folds))) if name in previous else req.folds
        for fold in folds:
            job = JobSpec.make(JobKind.TRAIN, ds, config=name, fold=fold, variant=req.variant,
                               trainer_overrides=req.trainer_overrides, depends_on=train_deps, resources=res,
                               save_probabilities=ensembles)
            jobs.append(job)
            train_ids.append(job.job_id)
            if ensembles and _needs_probabilities(paths, job):
                val = JobSpec.make(JobKind.VALIDATE, ds, config=name, fold=fold, variant=req.variant,
                                   depends_on=(job.job_id,), save_probabilities=True,
                                   resources=replace(res, est_duration_s=None))
                jobs.append(val)
                train_ids.append(val.job_id)
        if set(range(5)) <= set(folds):
            complete_configs.append(name)
    if complete_configs:
        jobs.append(JobSpec.make(JobKind.FIND_BEST, ds, configs=tuple(complete_configs), variant=req.variant,
                                 depends_on=tuple(train_ids)))
    return link_cascades(jobs, {ds: plan})


def _needs_probabilities(paths: Paths, job: JobSpec) -> bool:
    """A fold finished earlier without the validation softmax maps that ensembling needs.

    Its train job is DONE and will not run again, so a validate job adds the maps.
    """
    from autoseg.train.checkpoint import FINAL
    from autoseg.train.run import validation_complete

    tid = job.training_id()
    fold_dir = paths.training_dir(tid)
    if not (fold_dir / FINAL).is_file():
        return False  # the train job itself will save them
    try:
        return not validation_complete(paths, tid, fold_dir, with_probabilities=True)
    except AutosegError:  # no splits yet: nothing trained from them either
        return False


def run_locked(paths: Paths, jobs: list[JobSpec], executor: Executor,
               options: RunOptions = RunOptions()) -> RunSummary:
    """`run_jobs` under the results root's lock, with the root's state store (train-all, sweeps)."""
    from autoseg.schedule.lock import RunLock

    with RunLock(paths), StateStore.open(paths) as store:
        return run_jobs(jobs, executor, paths, store, options)
