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
from autoseg.schedule.sweep.tracking import SweepTracking, start_sweep_tracking
from autoseg.track.base import RunStatus
from autoseg.track.logger import error_line
from autoseg.track.spec import TrackSpec, child_env


@dataclass(frozen=True)
class SweepRun:
    """What `run_sweep` did: the recorded spec, the jobs and the runner's summaries."""

    spec: SweepSpec
    jobs: SweepJobs
    summaries: tuple[RunSummary, ...]
    """One RunSummary per run_jobs call (setup first when a dataset had to be planned)."""
    tracking: SweepTracking | None = None
    """The sweep's open tracker runs (ended by `autoseg.report.sweep_tracking.finish_sweep_tracking`)."""

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.summaries)

    @property
    def status(self) -> RunStatus:
        """How the sweep's tracker run ends: FINISHED, KILLED when interrupted, else FAILED."""
        if self.ok:
            return RunStatus.FINISHED
        return RunStatus.KILLED if any(s.interrupted for s in self.summaries) else RunStatus.FAILED


def run_sweep(spec: SweepSpec, paths: Paths, executor: Executor, options: RunOptions,
              track: TrackSpec | None = None) -> SweepRun:
    """Record the sweep, then run its jobs through the scheduler (`run_jobs`), skipping DONE ones.

    When a dataset has no plan yet and the sweep overrides plan fields, its plan/preprocess jobs
    run first: derived plans are made from the dataset's plan. Re-running runs only what is
    missing; interrupted trainings resume from their checkpoints. With ``track`` the sweep is a
    parent run with its variants' and folds' runs below (`autoseg.schedule.sweep.tracking`), left
    open for the report; an error on the way ends them FAILED.
    """
    summaries = []
    with RunLock(paths), StateStore.open(paths) as store:
        spec = record_sweep(spec, paths)
        tracking = start_sweep_tracking(spec, paths, track) if track is not None else None
        options = replace(options, job_env=tracking.job_env if tracking is not None else lambda job: child_env(None))
        try:
            return _run(spec, paths, executor, options, store, summaries, tracking)
        except BaseException as e:
            if tracking is not None:
                tracking.end(RunStatus.FAILED, error_line(e))
            raise


def _run(spec: SweepSpec, paths: Paths, executor: Executor, options: RunOptions, store: StateStore,
         summaries: list[RunSummary], tracking: SweepTracking | None) -> SweepRun:
    """`run_sweep`'s setup and training phases, under its lock."""
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
            return SweepRun(spec, first, tuple(summaries), tracking)
    jobs = build_sweep_jobs(spec, paths, write_plans=True)
    summaries.append(run_jobs(list(jobs.jobs), executor, paths, store, options))
    return SweepRun(spec, jobs, tuple(summaries), tracking)
