"""The order of a job graph: checks, topological order, longest-first priorities, and a dry run.

Pure functions of the `JobSpec` list (and a `PoolConfig` for `simulate_schedule`): `run_jobs`
in `autoseg.schedule.runner` uses them to start jobs; ``--dry-run`` prints `simulate_schedule`.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from autoseg.common.errors import AutosegError
from autoseg.schedule.jobs import JobKind, JobSpec
from autoseg.schedule.resources import PoolConfig, Slot, SlotPool, augment_device

UNKNOWN_DURATION_S = 60.0
"""Duration assumed for ordering when a job has no estimate (plan/preprocess/find-best)."""

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


def ancestors_of(jobs: list[JobSpec]) -> dict[str, frozenset[str]]:
    """Every in-graph job each job waits for, directly or through others."""
    by_id = {j.job_id: j for j in jobs}
    out: dict[str, frozenset[str]] = {}
    for jid in topological_order(jobs):
        deps = [d for d in by_id[jid].depends_on if d in by_id]
        out[jid] = frozenset(deps).union(*(out[d] for d in deps if d in out))
    return out


def startable_alongside(pending: list[JobSpec], busy: set[str],
                        ancestors: dict[str, frozenset[str]]) -> list[JobSpec]:
    """The ``pending`` jobs that wait for none of the ``busy`` ones (running or starting now).

    Only these can take a slot that is idle now while the busy jobs run, so only these count
    when cores are kept back for later starters (a training that waits for its plan job does
    not: it starts once the plan job has given its cores back).
    """
    return [j for j in pending if j.job_id not in busy and not (ancestors.get(j.job_id, frozenset()) & busy)]


def num_workers_for(job: JobSpec, cpus: int) -> int:
    """Data-loader workers for a training (one core stays with the main process); processes otherwise."""
    return max(0, cpus - 1) if job.kind is JobKind.TRAIN else max(1, cpus)


# ---------------------------------------------------------------------- dry run: who would run where


@dataclass(frozen=True)
class Assignment:
    """One job in a simulated schedule (estimated durations, the same placement rules as a real run)."""

    job_id: str
    gpu: str | None
    cpus: int
    start_s: float
    end_s: float
    cores: tuple[int, ...] = ()
    """Which cores (the child's affinity)."""
    workers: int = 0
    """Data-loader workers (trainings) or processes (plan/preprocess) from its share."""
    augment_device: str | None = None
    """Where a training's augmentation runs (cpu/device); None for other jobs."""


def simulate_schedule(jobs: list[JobSpec], pool: PoolConfig) -> list[Assignment]:
    """Place jobs as `run_jobs` would, with estimated durations; for ``--dry-run`` and benchmarks.

    The first wave (start 0) gets the shares a real run would give it (when no job of the graph
    is done yet: the simulation runs every job); later shares depend on which jobs really
    finish first.
    """
    check_graph(jobs)
    slots = SlotPool(pool)
    prio = priorities(jobs)
    ancestors = ancestors_of(jobs)
    by_id = {j.job_id: j for j in jobs}
    done: set[str] = set()
    started: set[str] = set()
    events: list[tuple[float, str]] = []
    out: list[Assignment] = []
    held: dict[str, Slot] = {}
    now = 0.0

    def later(starting: list[JobSpec]) -> list[JobSpec]:
        busy = set(held) | {j.job_id for j in starting}
        return startable_alongside([j for j in jobs if j.job_id not in started], busy, ancestors)

    while len(done) < len(jobs):
        ready = sorted((j for j in jobs if j.job_id not in started and set(j.depends_on) <= done),
                       key=lambda j: -prio[j.job_id])
        for j, slot in slots.acquire(ready, later=later):
            dur = j.resources.est_duration_s or UNKNOWN_DURATION_S
            held[j.job_id] = slot
            started.add(j.job_id)
            heapq.heappush(events, (now + dur, j.job_id))
            out.append(Assignment(j.job_id, slot.gpu, len(slot.cpus), now, now + dur, cores=slot.cpus,
                                  workers=num_workers_for(j, len(slot.cpus)),
                                  augment_device=augment_device(j, slot.gpu is not None)))
        if not events:
            raise AutosegError("jobs cannot be placed on this pool (a dependency cycle?)")
        now, jid = heapq.heappop(events)
        slots.release(held.pop(jid), by_id[jid])
        done.add(jid)
    return out
