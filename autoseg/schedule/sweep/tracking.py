"""A sweep as nested tracker runs: one parent, a child per variant, its fold runs below.

The parent run is the sweep (its params: datasets, configs, folds, seeds, base overrides). A
variant whose trainings are several (folds x seeds x datasets x configs) gets a child run of its
own that the fold runs nest under, and that later holds the variant's row of the report
(`autoseg.report.sweep_tracking`); a variant of one training has its fold run as the child. The
scheduler hands each train job its place through the environment (`TrackContext`: experiment,
parent run, the variant's axes as params), so the children log from their own processes.

Run ids are kept in ``results/sweeps/<name>/tracking.json``: running the same sweep again
(to fill in missing folds) resumes the same parent and variant runs. The experiment is
``sweep/<name>`` (MLflow experiment, W&B group).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from autoseg.common.jsonio import load_record, save_record
from autoseg.common.paths import Paths
from autoseg.schedule.jobs import JobKind, JobSpec
from autoseg.schedule.sweep.jobs import sweep_dir
from autoseg.schedule.sweep.spec import SweepSpec, Variant
from autoseg.track.base import RunRequest, RunStatus
from autoseg.track.logger import RunLogger
from autoseg.track.registry import open_run
from autoseg.track.spec import TrackContext, TrackSpec, child_env, load_same_tracker

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"
EXPERIMENT_PREFIX = "sweep/"
SWEEP_TAG = "autoseg.sweep"
VARIANT_TAG = "autoseg.sweep_variant"
KIND_TAG = "autoseg.kind"


@dataclass(frozen=True)
class SweepTrackingRecord:
    """``sweeps/<name>/tracking.json``: the tracker and the run ids of the sweep and its variants."""

    SCHEMA: ClassVar[str] = "autoseg.sweep_tracking"
    VERSION: ClassVar[int] = 1

    backend: str
    target: str
    experiment: str
    parent_run_id: str | None = None
    variant_run_ids: dict[str, str] = field(default_factory=dict)


@dataclass
class SweepTracking:
    """The open runs of one sweep: what `job_env` hands the train jobs, what the report is logged to."""

    spec: TrackSpec
    sweep: SweepSpec
    folder: Path
    experiment: str
    parent: RunLogger | None
    parent_id: str | None
    variants: dict[str, RunLogger] = field(default_factory=dict)
    """Variant name -> its run, for variants with several trainings."""
    variant_ids: dict[str, str] = field(default_factory=dict)

    def job_env(self, job: JobSpec) -> dict[str, str]:
        """The tracking variables of one job: train jobs log under their variant (or the sweep itself)."""
        variant = _variant_of(self.sweep, job)
        if job.kind is not JobKind.TRAIN or variant is None:
            return child_env(None)
        parent = self.variant_ids.get(variant.name) or self.parent_id
        context = TrackContext(experiment=self.experiment, parent_run_id=parent,
                               tags={SWEEP_TAG: self.sweep.name, VARIANT_TAG: variant.name},
                               params=variant_params(self.sweep, variant))
        return child_env(self.spec, context)

    def end(self, status: RunStatus, error: str | None = None) -> None:
        """End the variant runs, then the parent (after the report was logged to them)."""
        for logger in self.variants.values():
            logger.end(status, error)
        if self.parent is not None:
            self.parent.end(status, error)


def variant_params(sweep: SweepSpec, variant: Variant) -> dict[str, str]:
    """``sweep.name``, ``sweep.variant`` and ``sweep.axis.<key>`` for each override of the variant."""
    params = {"sweep.name": sweep.name, "sweep.variant": variant.name, "sweep.baseline": str(variant.baseline)}
    for item in (*variant.trainer_overrides, *(f"plan.{p}" for p in variant.plan_overrides)):
        key, _, value = item.partition("=")
        params[f"sweep.axis.{key}"] = value
    return params


def start_sweep_tracking(sweep: SweepSpec, paths: Paths, spec: TrackSpec) -> SweepTracking:
    """Open (or resume) the sweep's parent run and its variant runs; waits for their ids (children need them).

    A tracker that does not answer within `autoseg.track.logger.START_TIMEOUT_S` leaves the children
    without a parent (one warning): they still log, as top-level runs tagged with the sweep.
    """
    folder = sweep_dir(paths, sweep.name)
    record = _previous(folder, spec)
    experiment = record.experiment if record else EXPERIMENT_PREFIX + sweep.name
    parent = open_run(spec, RunRequest(name=f"sweep {sweep.name}", experiment=experiment, folder=folder,
                                       resume_id=record.parent_run_id if record else None,
                                       tags={SWEEP_TAG: sweep.name, KIND_TAG: "sweep"}))
    parent_id = parent.wait_started() if parent is not None else None
    if parent is not None and parent_id is None:
        log.warning("tracking (%s): the sweep's run was not created in time; its trainings log as top-level runs",
                    spec.backend)
    tracking = SweepTracking(spec, sweep, folder, experiment, parent, parent_id)
    if parent is not None:
        parent.log_params(sweep_params(sweep))
    for v in sweep.variants:
        if trainings_per_variant(sweep) < 2 or parent_id is None:
            continue
        logger = open_run(spec, RunRequest(
            name=f"{sweep.name}/{v.name}", experiment=experiment, folder=folder / "variants" / v.dirname,
            parent_id=parent_id, resume_id=(record.variant_run_ids.get(v.name) if record else None),
            tags={SWEEP_TAG: sweep.name, VARIANT_TAG: v.name, KIND_TAG: "variant"}))
        if logger is None:
            continue
        logger.log_params(variant_params(sweep, v))
        tracking.variants[v.name] = logger
    for name, logger in tracking.variants.items():
        run_id = logger.wait_started()
        if run_id is not None:
            tracking.variant_ids[name] = run_id
    save_record(folder / TRACKING_FILE, SweepTrackingRecord(spec.backend, spec.target, experiment, parent_id,
                                                            dict(tracking.variant_ids)))
    return tracking


def sweep_params(sweep: SweepSpec) -> dict[str, str]:
    return {"sweep.name": sweep.name, "sweep.description": sweep.description,
            "sweep.datasets": ",".join(sweep.datasets), "sweep.configs": ",".join(sweep.configs),
            "sweep.folds": ",".join(map(str, sweep.folds)), "sweep.seeds": ",".join(map(str, sweep.seeds)),
            "sweep.variants": str(len(sweep.variants)), "sweep.baseline": sweep.baseline.name,
            "sweep.base": " ".join((*sweep.base_trainer_overrides, *sweep.base_plan_overrides))}


def trainings_per_variant(sweep: SweepSpec) -> int:
    return len(sweep.datasets) * len(sweep.configs) * len(sweep.folds) * len(sweep.seeds)


def read_sweep_tracking(paths: Paths, sweep: str) -> SweepTrackingRecord | None:
    """The sweep's ``tracking.json``, None when it was never tracked."""
    file = sweep_dir(paths, sweep) / TRACKING_FILE
    return load_record(file, SweepTrackingRecord) if file.is_file() else None


def _previous(folder: Path, spec: TrackSpec) -> SweepTrackingRecord | None:
    return load_same_tracker(folder / TRACKING_FILE, SweepTrackingRecord, spec, "the sweep's tracking")


def _variant_of(sweep: SweepSpec, job: JobSpec) -> Variant | None:
    return next((v for v in sweep.variants if v.run_name(sweep.name) == job.variant), None)
