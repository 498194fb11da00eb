"""Run a graph of stand-in jobs through the real LocalExecutor, as `train-all` would (for kill/resume tests).

Usage: python -m tests.schedule.driver ROOT N_JOBS STEPS STEP_SECONDS GPUS [STOP_SECONDS]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from autoseg.common.paths import Paths
from autoseg.schedule.executors import LocalExecutor
from autoseg.schedule.resources import PoolConfig, machine_cores, parse_gpus
from autoseg.schedule.runner import RunOptions, run_locked
from tests.schedule.conftest import fake_command, train_jobs


def main() -> int:
    root, n, steps, step_s, gpus = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    stop_s = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    paths = Paths.under(root)
    jobs = train_jobs(n, durations=[float(n - k) for k in range(n)])
    executor = LocalExecutor(command_for=fake_command(paths, steps, step_s, stop_s=stop_s))
    summary = run_locked(paths, jobs, executor,
                         RunOptions(pool=PoolConfig(gpus=parse_gpus(gpus), cores=machine_cores()), poll_interval_s=0.05))
    print(summary.one_line(), flush=True)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
