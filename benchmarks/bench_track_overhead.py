"""What ``--track mlflow`` costs a training: step time with and without tracking, side by side in one run.

Trains the same tiny phantom fold again and again in this process (`train_fold`, as ``autoseg
train`` does), alternating untracked and tracked (a local sqlite MLflow store) run by run, so that
the drift of a shared machine's load hits both alike, and compares each tracked run with the
untracked runs on either side of it: the training step time (1 / iterations_per_s of every epoch
after the first, from training_log.jsonl) and the CPU seconds per step of the whole process
(``train_cpu_s``: every thread, the tracker's worker included, so it counts tracking's own work).
The first tracked run (MLflow imported, the store created) and the first untracked one are
warm-ups and not counted. It also times what tracking puts on the training thread itself: the
per-epoch ``log_metrics`` call into the `RunLogger` queue, and opening the run (importing MLflow,
once per training process, before the loaders start).

    python benchmarks/bench_track_overhead.py [--pairs 6] [--epochs 3] [--iterations 15] [--workdir DIR]

The phantom's steps are short (tenths of a second on a CPU), so the relative overhead is larger
here than for a real training, whose epochs are 250 longer steps with the same per-epoch logging.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autoseg.common.paths import Paths, TrainingId  # noqa: E402
from autoseg.dataset.phantom import PhantomRecipe, make_phantom_dataset  # noqa: E402
from autoseg.pipeline.run import train_fold  # noqa: E402
from autoseg.planning.planner import PlanRequest, plan_and_save  # noqa: E402
from autoseg.preprocess import preprocess_dataset  # noqa: E402
from autoseg.track.base import RunRequest, RunStatus  # noqa: E402
from autoseg.track.logger import RunLogger  # noqa: E402
from autoseg.track.mlflow_backend import MlflowBackend  # noqa: E402
from autoseg.track.spec import TrackRequest, TrackSpec, resolve_spec  # noqa: E402
from autoseg.train.config import TrainerConfig, apply_overrides  # noqa: E402
from benchmarks.common import git_commit  # noqa: E402

DATASET = "Dataset999_Phantom"


def _train(paths: Paths, variant: str, args: argparse.Namespace, track: TrackRequest | None) -> dict:
    """One tiny training in this process; per-step wall and CPU seconds of its epochs after the first."""
    sets = [f"epochs={args.epochs}", f"iterations_per_epoch={args.iterations}", "val_iterations=2",
            "batch_size=2", "final_validation=off", "num_workers=1"]
    tid = TrainingId(DATASET, "3d_fullres", 0, variant)
    train_fold(paths, tid, apply_overrides(TrainerConfig(), sets), device="cpu", force=True, quiet=True, track=track)
    log = paths.training_dir(tid) / "training_log.jsonl"
    records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()][1:]  # epoch 1 warms up
    return {"step_s": statistics.median(1.0 / r["iterations_per_s"] for r in records),
            "cpu_step_s": statistics.median(r["train_cpu_s"] / args.iterations for r in records)}


def _hook_cost(store: Path, epochs: int = 200) -> tuple[float, float]:
    """Seconds on the training thread: one epoch's ``log_metrics`` (median) and opening the run."""
    t0 = time.perf_counter()
    run = RunLogger(MlflowBackend(TrackSpec("mlflow", f"sqlite:///{store / 'hook.db'}")),
                    RunRequest("hook", "bench", store))
    start = time.perf_counter() - t0
    metrics = {k: 0.5 for k in ("train_loss", "val_loss", "pseudo_dice_mean", "ema_pseudo_dice", "lr",
                                "epoch_time_s", "iterations_per_s", "data_wait_fraction", "samples_per_s",
                                "pseudo_dice/organ", "pseudo_dice/lesion")}
    costs = []
    for epoch in range(epochs):
        t = time.perf_counter()
        run.log_metrics(metrics, step=epoch)
        costs.append(time.perf_counter() - t)
    run.end(RunStatus.FINISHED, timeout_s=120)
    return statistics.median(costs), start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=6, help="tracked runs, each between two untracked ones")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=15, help="iterations per epoch")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_track_"))
    paths = Paths.under(workdir / "data")
    if not paths.plans_file(DATASET).is_file():
        make_phantom_dataset(paths.raw, PhantomRecipe(num_training=6, num_test=0, shape=(12, 32, 32), shape_jitter=0))
        plan_and_save(paths, DATASET, PlanRequest(configs=("3d_fullres",), progress_bar=False))
        preprocess_dataset(paths, DATASET, ["3d_fullres"], num_workers=1)
    hook_s, start_s = _hook_cost(workdir)  # first: this is where MLflow is imported
    track = TrackRequest(resolve_spec(TrackSpec("mlflow", str(workdir / "tracking")), Path.cwd()))
    _train(paths, "bench_off", args, None)  # warm-ups: the store's creation, first-run caches
    _train(paths, "bench_mlflow", args, track)
    off = [_train(paths, "bench_off", args, None)]
    tracked = []
    for i in range(args.pairs):
        tracked.append(_train(paths, "bench_mlflow", args, track))
        off.append(_train(paths, "bench_off", args, None))
        print(f"{i + 1}: off {off[i]['step_s']:.4f} s ({off[i]['cpu_step_s']:.4f} CPU-s), mlflow "
              f"{tracked[i]['step_s']:.4f} s ({tracked[i]['cpu_step_s']:.4f} CPU-s), off {off[i + 1]['step_s']:.4f} s "
              f"({off[i + 1]['cpu_step_s']:.4f} CPU-s)", flush=True)

    def ratio(key: str) -> float:  # each tracked run against the mean of its two untracked neighbours
        return statistics.median(t[key] / ((off[i][key] + off[i + 1][key]) / 2) for i, t in enumerate(tracked))

    wall_pct, cpu_pct = 100 * (ratio("step_s") - 1), 100 * (ratio("cpu_step_s") - 1)
    med = {k: (statistics.median(r[k] for r in off), statistics.median(r[k] for r in tracked))
           for k in ("step_s", "cpu_step_s")}
    print(f"\n## Tracking overhead (issue 23) — {datetime.date.today()} — 2-core CPU, shared/loaded\n")
    print(f"`OMP_NUM_THREADS=1 python benchmarks/bench_track_overhead.py --pairs {args.pairs} --epochs {args.epochs} "
          f"--iterations {args.iterations}` (commit {git_commit()}, Python {platform.python_version()}, "
          f"torch {torch.__version__}; phantom 3d_fullres patch 12x32x32, batch 2, one data worker; "
          f"{args.pairs} tracked trainings each between two untracked ones, in one process, "
          f"{args.iterations * (args.epochs - 1)} timed steps per training):\n")
    print("| | median step (wall) | median step (CPU-s of the process) |")
    print("|---|---|---|")
    print(f"| `--track none` | {med['step_s'][0]:.4f} s | {med['cpu_step_s'][0]:.4f} s |")
    print(f"| `--track mlflow` (local sqlite) | {med['step_s'][1]:.4f} s | {med['cpu_step_s'][1]:.4f} s |")
    print(f"\nTracked vs its untracked neighbours (median of the {args.pairs} ratios): step time {wall_pct:+.2f} % "
          f"wall, {cpu_pct:+.2f} % CPU (target < 1 %). On the training thread one epoch's metrics cost "
          f"{hook_s * 1e6:.0f} µs; opening the run (MLflow's import, once per training process, before the "
          f"loaders start) {start_s:.2f} s.")


if __name__ == "__main__":
    main()
