"""Scheduler benchmark: makespan of sleep jobs of known durations on K GPU slots vs the ideal, and overhead.

    python benchmarks/bench_scheduler.py [--jobs 16] [--gpus 4] [--scale 0.05]

Runs N stand-in jobs (``sleep d``) through the real LocalExecutor and runner (fake GPU ids), then
prints: the measured makespan, the lower bound max(sum/K, longest job), the LPT schedule's makespan
(what longest-first should achieve), and the per-job scheduling overhead in ms
((makespan - LPT makespan) / N, which covers process start-up, polling and state writes).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import subprocess
import tempfile
import time
from pathlib import Path

from autoseg.common.paths import Paths
from autoseg.schedule.executors import Launch, LocalExecutor
from autoseg.schedule.jobs import JobKind, JobSpec, JobState, Resources
from autoseg.schedule.resources import PoolConfig
from autoseg.schedule.runner import RunOptions, run_locked, simulate_schedule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--scale", type=float, default=0.05, help="seconds per duration unit")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rng = random.Random(args.seed)
    durations = [rng.randint(1, 20) * args.scale for _ in range(args.jobs)]
    jobs = [JobSpec.make(JobKind.TRAIN, "Dataset001_Bench", config="3d_fullres", fold=k,
                         resources=Resources(gpus=1, est_duration_s=d)) for k, d in enumerate(durations)]
    by_id = {j.job_id: j for j in jobs}
    gpus = tuple(str(i) for i in range(args.gpus))
    # one core per slot so the CPU cap does not limit concurrency: the benchmark measures the scheduler
    pool = PoolConfig(gpus=gpus, cpu_slots=1, cores=tuple(range(args.gpus + 1)))

    def sleep_command(launch: Launch) -> list[str]:
        return ["sleep", f"{by_id[launch.job.job_id].resources.est_duration_s:.3f}"]

    lpt = max(a.end_s for a in simulate_schedule(jobs, pool))
    lower = max(sum(durations) / args.gpus, max(durations))
    with tempfile.TemporaryDirectory() as tmp:
        paths = Paths.under(Path(tmp))
        t0 = time.perf_counter()
        summary = run_locked(paths, jobs, LocalExecutor(command_for=sleep_command),
                             RunOptions(pool=pool, poll_interval_s=0.01))
        makespan = time.perf_counter() - t0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, commit {commit}")
    print(f"{args.jobs} sleep jobs ({sum(durations):.2f} s total, longest {max(durations):.2f} s) on {args.gpus} slots: "
          f"{summary.counts[JobState.DONE]} done")
    print(f"makespan {makespan:.2f} s | ideal max(sum/K, longest) {lower:.2f} s | LPT {lpt:.2f} s | "
          f"efficiency vs ideal {lower / makespan:.1%} | overhead {(makespan - lpt) / args.jobs * 1000:.0f} ms/job")


if __name__ == "__main__":
    main()
