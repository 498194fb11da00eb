"""Run a sweep: record it, then put its jobs through the scheduler (`run_jobs`) under the results lock.

Re-running the same sweep runs only what is missing: DONE jobs are skipped, interrupted trainings
resume from their checkpoints (train commands carry ``--continue``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from autoseg.common.paths import Paths
from autoseg.schedule.executors import Executor
from autoseg.schedule.lock import RunLock
from autoseg.schedule.runner import RunOptions, RunSummary, run_jobs
from autoseg.schedule.store import StateStore
from autoseg.schedule.sweep.spec import SweepSpec, split_preset
from autoseg.schedule.sweep.jobs import SweepJobs, build_sweep_jobs, record_sweep


@dataclass(frozen=True)
class SweepRun:
    """What `run_sweep` did: the recorded spec, the jobs and the runner's summaries."""

    spec: SweepSpec
    jobs: SweepJobs
    summaries: tuple[RunSummary, ...]
    """One RunSummary per run_jobs call (setup first when a dataset had to be planned)."""

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.summaries)


def run_sweep(spec: SweepSpec, paths: Paths, executor: Executor, options: RunOptions) -> SweepRun:
    """Record the sweep, then run its jobs through the scheduler (`run_jobs`), skipping DONE ones.

    When a dataset has no plan yet and the sweep overrides plan fields, its plan/preprocess jobs
    run first: derived plans are made from the dataset's plan. Re-running runs only what is
    missing; interrupted trainings resume from their checkpoints.
    """
    summaries = []
    with RunLock(paths), StateStore.open(paths) as store:
        spec = record_sweep(spec, paths)
        if options.run_id is None:  # setup and trainings: one run in `autoseg status`
            options = replace(options, run_id=store.new_run_id())
        needs_setup_first = any(split_preset(spec.plan_overrides(v))[1]
                                and not paths.plans_file(ds, spec.preset(v)).is_file()
                                for v in spec.variants for ds in spec.datasets)
        if needs_setup_first:
            first = build_sweep_jobs(spec, paths, write_plans=False)
            summary = run_jobs(list(first.setup), executor, paths, store, options)
            summaries.append(summary)
            if not summary.ok:
                return SweepRun(spec, first, tuple(summaries))
        jobs = build_sweep_jobs(spec, paths, write_plans=True)
        summaries.append(run_jobs(list(jobs.jobs), executor, paths, store, options))
    return SweepRun(spec, jobs, tuple(summaries))
