"""What ``--track mlflow`` costs a training: step time with and without tracking, side by side in one run.

Trains the same tiny phantom fold again and again as separate ``autoseg train`` processes,
alternating untracked and tracked (``--track mlflow:<tmp>``, a local sqlite store) so that a
drift of the machine's load hits both alike, and compares the median training step time
(1 / iterations_per_s of every epoch after the first, from training_log.jsonl) and the epoch
time. It also times what tracking puts on the training thread itself: the per-epoch
``log_metrics`` call into the `RunLogger` queue, and the one-off start (MLflow imported and the
run opened before the loaders start).

    python benchmarks/bench_track_overhead.py [--pairs 3] [--epochs 4] [--iterations 20] [--workdir DIR]

The phantom's steps are short (tenths of a second on a CPU), so the relative overhead is larger
here than for a real training, whose epochs are 250 longer steps with the same per-epoch logging.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autoseg.common.paths import Paths  # noqa: E402
from autoseg.dataset.phantom import PhantomRecipe, make_phantom_dataset  # noqa: E402
from autoseg.track.base import RunRequest, RunStatus  # noqa: E402
from autoseg.track.logger import RunLogger  # noqa: E402
from autoseg.track.mlflow_backend import MlflowBackend  # noqa: E402
from autoseg.track.spec import TrackSpec  # noqa: E402
from benchmarks.common import git_commit  # noqa: E402

DATASET = "Dataset999_Phantom"


def _autoseg(paths: Paths, *args: str) -> float:
    """Run ``python -m autoseg ARGS`` on ``paths``; its wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "autoseg", "--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed),
            "--results", str(paths.results), *args]
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _train(paths: Paths, variant: str, args: argparse.Namespace, track: str | None) -> dict:
    sets = [f"epochs={args.epochs}", f"iterations_per_epoch={args.iterations}", "val_iterations=2",
            "batch_size=2", "final_validation=off", "num_workers=1"]
    extra = ["--track", track] if track else ["--track", "none"]
    wall = _autoseg(paths, "train", "999", "3d_fullres", "0", "--variant", variant, "--force", "--quiet",
                    "--device", "cpu", *[a for kv in sets for a in ("--set", kv)], *extra)
    log = paths.results / DATASET / "3d_fullres" / variant / "fold_0" / "training_log.jsonl"
    records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()][1:]  # epoch 1 warms up
    return {"step_s": [1.0 / r["iterations_per_s"] for r in records], "epoch_s": [r["epoch_time_s"] for r in records],
            "wall_s": wall}


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
    ap.add_argument("--pairs", type=int, default=3, help="untracked/tracked pairs of trainings")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=20, help="iterations per epoch")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_track_"))
    paths = Paths.under(workdir / "data")
    if not paths.plans_file(DATASET).is_file():
        make_phantom_dataset(paths.raw, PhantomRecipe(num_training=6, num_test=0, shape=(12, 32, 32), shape_jitter=0))
        for step in ("plan", "preprocess"):
            _autoseg(paths, step, "999", "--configs", "3d_fullres")
    store = workdir / "tracking"
    runs: dict[str, list[dict]] = {"off": [], "mlflow": []}
    for i in range(args.pairs):
        for mode in ("off", "mlflow") if i % 2 == 0 else ("mlflow", "off"):
            runs[mode].append(_train(paths, f"bench_{mode}", args, f"mlflow:{store}" if mode == "mlflow" else None))
            r = runs[mode][-1]
            print(f"pair {i + 1} {mode:>6}: median step {statistics.median(r['step_s']):.4f} s, "
                  f"epoch {statistics.median(r['epoch_s']):.2f} s, process {r['wall_s']:.1f} s", flush=True)
    step = {m: statistics.median([s for r in rs for s in r["step_s"]]) for m, rs in runs.items()}
    epoch = {m: statistics.median([s for r in rs for s in r["epoch_s"]]) for m, rs in runs.items()}
    wall = {m: statistics.median([r["wall_s"] for r in rs]) for m, rs in runs.items()}
    hook_s, start_s = _hook_cost(workdir)
    overhead = 100 * (step["mlflow"] - step["off"]) / step["off"]
    hook_pct = 100 * hook_s / (epoch["off"])
    print(f"\n## Tracking overhead (issue 23) — {datetime.date.today()} — 2-core CPU, shared/loaded\n")
    print(f"`OMP_NUM_THREADS=1 python benchmarks/bench_track_overhead.py --pairs {args.pairs} --epochs {args.epochs} "
          f"--iterations {args.iterations}` (commit {git_commit()}, Python {platform.python_version()}, "
          f"phantom 3d_fullres, batch 2, {args.pairs} untracked and {args.pairs} tracked trainings alternating, "
          f"{args.iterations * (args.epochs - 1)} timed steps each):\n")
    print("| | median step | median epoch | process wall (median) |")
    print("|---|---|---|---|")
    for m, label in (("off", "`--track none`"), ("mlflow", "`--track mlflow` (local sqlite)")):
        print(f"| {label} | {step[m]:.4f} s | {epoch[m]:.2f} s | {wall[m]:.1f} s |")
    print(f"\nStep time with tracking: {overhead:+.2f} % (target < 1 %). On the training thread, one epoch's "
          f"metrics cost {hook_s * 1e6:.0f} µs ({hook_pct:.4f} % of an epoch here); opening the run "
          f"(MLflow's import, before the loaders start) {start_s:.2f} s once per training.")


if __name__ == "__main__":
    main()
