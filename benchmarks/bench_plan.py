"""Fingerprint + plan of the real MSD Hippocampus (260 cases): wall time per step.

Peak memory comes from running it under ``/usr/bin/time -v`` (maximum resident set size;
the workers are separate processes, so also see the per-worker figure printed here):

    /usr/bin/time -v python benchmarks/bench_plan.py [--workers 2] [--cases 260]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autoseg.common.paths import Paths  # noqa: E402
from autoseg.dataset.spec import load_dataset  # noqa: E402
from autoseg.fingerprint import extract_fingerprint  # noqa: E402
from autoseg.planning.plan import plan_dataset  # noqa: E402
from benchmarks.common import git_commit  # noqa: E402
from tests.helpers import hippocampus_available, hippocampus_case_ids, link_hippocampus_subset  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cases", type=int, default=260)
    parser.add_argument("--gpu-memory", type=float, default=8.0)
    args = parser.parse_args()
    if not hippocampus_available():
        sys.exit("../shared/datasets/msd_hippocampus not present")
    with tempfile.TemporaryDirectory() as tmp:
        paths = Paths.under(Path(tmp))
        root = link_hippocampus_subset(paths.raw, hippocampus_case_ids(args.cases))
        spec = load_dataset(root)
        t0 = time.perf_counter()
        fp = extract_fingerprint(spec, num_workers=args.workers, progress_bar=False)
        t1 = time.perf_counter()
        plan = plan_dataset(fp, args.gpu_memory)
        t2 = time.perf_counter()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s); "
          f"python {platform.python_version()}; commit {git_commit()}")
    print(f"cases: {len(fp.cases)}  workers: {args.workers}  budget: {args.gpu_memory:g} GB")
    print(f"fingerprint: {t1 - t0:.2f} s ({len(fp.cases) / (t1 - t0):.0f} cases/s)")
    print(f"plan:        {(t2 - t1) * 1000:.1f} ms")
    print(f"peak RSS: main {own:.0f} MB, largest worker {children:.0f} MB")
    for name, c in plan.configurations.items():
        print(f"{name:>10}: spacing {c.spacing} patch {c.patch_size} batch {c.batch_size} "
              f"pools {c.num_pools_per_axis} est. {c.estimated_vram_gb:.2f} GB")


if __name__ == "__main__":
    main()
