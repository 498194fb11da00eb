"""A sweep's report in the tracker, and the report rebuilt from the tracker alone.

`finish_sweep_tracking` logs each variant's row (mean Dice, per-class Dice, HD95, the paired
difference to the baseline) to the variant's run, uploads report.md/csv/png to the sweep's run
and ends the runs with the sweep's outcome. `build_sweep_report_from_tracker` reads the sweep's
fold runs back from MLflow (their final validation metrics, their per-epoch histories) and puts
them through the same `summarize_runs` as the folder-based report, so both give the same table:
the results folders are not needed (``autoseg sweep-report FILE --from-tracker``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from autoseg.common.paths import Paths
from autoseg.report.sweep_report import ReportFiles, RunKey, RunResult, SweepReport, VariantRow, build_sweep_report
from autoseg.schedule.sweep import SweepSpec
from autoseg.schedule.sweep.run import SweepRun
from autoseg.schedule.sweep.tracking import (EXPERIMENT_PREFIX, KIND_TAG, SWEEP_TAG, VARIANT_TAG,
                                             read_sweep_tracking)
from autoseg.track.readback import MlflowReader, TrackedRun
from autoseg.track.spec import TrackSpec

log = logging.getLogger(__name__)

FINISHED = "FINISHED"


def row_metrics(row: VariantRow, prefix: str = "") -> dict[str, float]:
    """One report row as a variant run's metrics (``dice_mean``, ``dice/<class>``, ``delta_dice``, ...)."""
    out = {f"{prefix}dice_mean": row.dice.mean, f"{prefix}dice_std": row.dice.std,
           f"{prefix}hd95_mean": row.hd95.mean, f"{prefix}pseudo_dice_mean": row.pseudo_dice.mean,
           f"{prefix}runs_finished": float(row.n_finished), f"{prefix}runs_expected": float(row.n_expected)}
    out.update({f"{prefix}dice/{c}": m.mean for c, m in row.class_dice})
    if row.comparison is not None and row.comparison.n:
        out[f"{prefix}delta_{row.metric}"] = row.comparison.mean_delta
        if row.comparison.p_value is not None:
            out[f"{prefix}p_value"] = row.comparison.p_value
    return out


def finish_sweep_tracking(run: SweepRun, report: SweepReport, files: ReportFiles) -> None:
    """Log the report to the sweep's runs and end them (FINISHED, KILLED if interrupted, else FAILED)."""
    tracking = run.tracking
    if tracking is None:
        return
    groups = {(r.dataset, r.config) for r in report.rows}
    for row in report.rows:
        logger = tracking.variants.get(row.variant)
        if logger is not None:
            prefix = "" if len(groups) == 1 else f"{row.dataset}/{row.config}/"
            logger.log_metrics(row_metrics(row, prefix))
    if tracking.parent is not None:
        done = report.n_expected - len(report.missing)
        tracking.parent.log_metrics({"runs_finished": done, "runs_expected": report.n_expected})
        for path in (files.markdown, files.csv, files.runs_csv, files.png):
            tracking.parent.log_artifact(path, "report")
    tracking.end(run.status)


def build_sweep_report_from_tracker(spec: SweepSpec, paths: Paths, track: TrackSpec | None) -> SweepReport:
    """The sweep's report from its MLflow runs (the tracker in ``sweeps/<name>/tracking.json``, else ``track``)."""
    record = read_sweep_tracking(paths, spec.name)
    if record is not None:
        track, experiment = TrackSpec(record.backend, record.target), record.experiment
    else:
        experiment = EXPERIMENT_PREFIX + spec.name
    if track is None:
        track = TrackSpec("mlflow", "")
    reader = MlflowReader(track)
    runs = reader.runs(experiment, f"tags.`{SWEEP_TAG}` = '{spec.name}' and tags.`{KIND_TAG}` = 'fold'")
    latest: dict[tuple[str, str, str, str, str], TrackedRun] = {}
    for r in runs:  # oldest first: a fold run again (--force) replaces its older run
        latest[_key_of(r)] = r

    def read(folder: Path, key: RunKey) -> RunResult:
        found = latest.get((key.dataset, key.config, key.variant, str(key.seed), str(key.fold)))
        return _result(reader, found, key)

    return build_sweep_report(spec, paths, read)


def _key_of(run: TrackedRun) -> tuple[str, str, str, str, str]:
    p = run.params
    return (p.get("dataset", ""), p.get("configuration", ""), run.tags.get(VARIANT_TAG, ""), p.get("seed", ""),
            p.get("fold", ""))


def _result(reader: MlflowReader, run: TrackedRun | None, key: RunKey) -> RunResult:
    """What `autoseg.report.sweep_report.read_run` reads from a fold folder, from the fold's tracker run."""
    if run is None:
        return RunResult(key=key, finished=False, epochs_done=0, epochs=None)
    m = run.metrics
    times = [v for _, v in reader.history(run.run_id, "epoch_time_s")]
    speeds = [v for _, v in reader.history(run.run_id, "iterations_per_s")]
    classes = tuple(sorted((k[len("final/dice/"):], v) for k, v in m.items() if k.startswith("final/dice/")))
    epochs = run.params.get("trainer.epochs")
    return RunResult(
        key=key, finished=run.status == FINISHED, epochs_done=len(times),
        epochs=int(epochs) if epochs and epochs.isdigit() else None, dice=_finite(m, "final/dice_mean"),
        class_dice=classes, hd95=_finite(m, "final/hd95_mean"),
        pseudo_dice=_finite(m, "final/ema_pseudo_dice") if "final/ema_pseudo_dice" in m else _finite(m, "ema_pseudo_dice"),
        train_time_s=float(sum(times)) if times else None, iterations_per_s=float(np.mean(speeds)) if speeds else None)


def _finite(metrics: Mapping[str, float], key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if value is not None and math.isfinite(value) else None
