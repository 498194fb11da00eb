"""A sweep tracked in MLflow: a real ``autoseg sweep`` of 4 variants (one tiny fold each, scheduler child
processes) gives one parent run and 4 child runs whose Dice is the report's table, and the report
rebuilt from the tracker alone (``sweep-report --from-tracker``) is the same table. With several folds a
variant gets its own run, the folds nest below it, and the variant's row of the report is logged to it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import autoseg.cli
from autoseg.common.paths import Paths, TrainingId
from autoseg.report.sweep_report import build_sweep_report, format_markdown, write_sweep_report
from autoseg.report.sweep_tracking import build_sweep_report_from_tracker, finish_sweep_tracking
from autoseg.schedule.sweep import SweepSpec, load_sweep
from autoseg.schedule.sweep.jobs import SweepJobs, sweep_dir
from autoseg.schedule.sweep.run import SweepRun
from autoseg.schedule.sweep.tracking import start_sweep_tracking
from autoseg.schedule.jobs import JobKind, JobSpec
from autoseg.track.base import RunRequest, RunStatus
from autoseg.track.readback import MlflowReader
from autoseg.track.registry import open_run
from autoseg.track.spec import TrackSpec, track_request_from_env
from tests.sweep_fixtures import fake_fold, fake_summary
from tests.track.conftest import DATASET, TINY

pytest.importorskip("mlflow", reason='needs the track extra: pip install -e ".[track]"')

pytestmark = pytest.mark.slow


@dataclass
class TrackedSweep:
    paths: Paths
    spec: SweepSpec
    track: TrackSpec
    output: str
    exit_code: int


def _sweep_file(folder: Path, name: str, folds: list[int], grid: dict, track: str) -> Path:
    body = {"name": name, "datasets": [DATASET], "configs": ["3d_fullres"], "folds": folds, "seeds": [0],
            "base": {k: yaml.safe_load(v) for k, v in (kv.split("=") for kv in TINY)}, "grid": grid, "track": track}
    file = folder / f"{name}.yaml"
    file.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return file


@pytest.fixture(scope="module")
def tracked_sweep(phantom: Paths, mlflow_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> TrackedSweep:
    file = _sweep_file(tmp_path_factory.mktemp("sweep_files"), "tracked", [0],
                       {"lr": [0.01, 0.003], "deep_supervision": [True, False]}, f"mlflow:{mlflow_folder}")
    roots = ["--raw", str(phantom.raw), "--preprocessed", str(phantom.preprocessed), "--results", str(phantom.results)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTOSEG_FAKE_GPUS", "1")
        mp.setenv("OMP_NUM_THREADS", "1")
        result = CliRunner().invoke(autoseg.cli.cli, [*roots, "sweep", str(file), "--gpus", "0,1", "--retries", "0"])
    return TrackedSweep(phantom, load_sweep(file, phantom), TrackSpec("mlflow", f"sqlite:///{mlflow_folder}/mlflow.db"),
                        result.output, result.exit_code)


def test_one_parent_and_a_child_per_variant_with_the_reports_dice(tracked_sweep: TrackedSweep) -> None:
    assert tracked_sweep.exit_code == 0, tracked_sweep.output
    reader = MlflowReader(tracked_sweep.track)
    runs = reader.runs("sweep/tracked")
    parents = [r for r in runs if r.tags.get("autoseg.kind") == "sweep"]
    children = [r for r in runs if r.tags.get("autoseg.kind") == "fold"]
    assert len(parents) == 1 and len(children) == 4 and len(runs) == 5
    parent = parents[0]
    assert parent.status == "FINISHED" and parent.params["sweep.variants"] == "4"
    assert all(c.parent_id == parent.run_id and c.status == "FINISHED" for c in children)
    assert "report/report.md" in reader.artifacts(parent.run_id)
    report = build_sweep_report(tracked_sweep.spec, tracked_sweep.paths)
    by_variant = {c.tags["autoseg.sweep_variant"]: c for c in children}
    assert sorted(by_variant) == sorted(v.name for v in tracked_sweep.spec.variants)
    for row in report.rows:
        child = by_variant[row.variant]
        assert row.dice.n == 1 and child.metrics["final/dice_mean"] == pytest.approx(row.dice.mean, abs=1e-12)
        axes = {k: v for k, v in child.params.items() if k.startswith("sweep.axis.")}
        assert axes == {f"sweep.axis.{kv.partition('=')[0]}": kv.partition("=")[2]
                        for kv in tracked_sweep.spec.variant(row.variant).trainer_overrides}


def test_the_report_from_the_tracker_is_the_same_table(tracked_sweep: TrackedSweep) -> None:
    from_folders = build_sweep_report(tracked_sweep.spec, tracked_sweep.paths)
    from_tracker = build_sweep_report_from_tracker(tracked_sweep.spec, tracked_sweep.paths, None)
    assert format_markdown(from_tracker) == format_markdown(from_folders)
    assert from_tracker.missing == () and len(from_tracker.rows) == 4
    p = tracked_sweep.paths
    roots = ["--raw", str(p.raw), "--preprocessed", str(p.preprocessed), "--results", str(p.results)]
    result = CliRunner().invoke(autoseg.cli.cli, [*roots, "sweep-report", tracked_sweep.spec.source, "--from-tracker"])
    assert result.exit_code == 0, result.output
    assert format_markdown(from_folders) in result.output


def test_several_folds_nest_under_a_run_per_variant(phantom: Paths, mlflow_folder: Path, tmp_path: Path) -> None:
    """No training here: the sweep's runs are opened as `autoseg sweep` opens them, two fold runs per
    variant log as a scheduled child would (from its environment), then the report is logged and ended."""
    track = TrackSpec("mlflow", f"sqlite:///{mlflow_folder}/mlflow.db")
    spec = load_sweep(_sweep_file(tmp_path, "nested", [0, 1], {"lr": [0.01, 0.003]}, "none"))
    paths = Paths.under(tmp_path / "data")
    tracking = start_sweep_tracking(spec, paths, track)
    assert tracking.parent_id is not None and sorted(tracking.variant_ids) == ["baseline", "lr=0.003"]
    for v, dice in zip(spec.variants, (0.8, 0.7)):
        for fold in (0, 1):
            tid = TrainingId(DATASET, "3d_fullres", fold, v.run_name(spec.name), 0)
            fake_fold(paths.training_dir(tid), summary=fake_summary({1: dice + fold / 100, 2: dice}))
            job = JobSpec.make(JobKind.TRAIN, DATASET, config="3d_fullres", fold=fold, variant=tid.variant, seed=0)
            request = track_request_from_env(tracking.job_env(job), None, tmp_path)
            child = open_run(request.spec, RunRequest(f"{v.name}/{fold}", request.context.experiment, tmp_path,
                                                      request.context.parent_run_id, tags=request.context.tags))
            child.end(RunStatus.FINISHED)
    report = build_sweep_report(spec, paths)
    files = write_sweep_report(report, sweep_dir(paths, spec.name))
    finish_sweep_tracking(SweepRun(spec, SweepJobs((), (), ()), (), tracking), report, files)
    runs = MlflowReader(track).runs("sweep/nested")
    variants = {r.tags["autoseg.sweep_variant"]: r for r in runs if r.tags.get("autoseg.kind") == "variant"}
    assert sorted(variants) == ["baseline", "lr=0.003"]
    assert all(r.parent_id == tracking.parent_id and r.status == "FINISHED" for r in variants.values())
    for row in report.rows:
        run = variants[row.variant]
        assert run.metrics["dice_mean"] == pytest.approx(row.dice.mean) and row.dice.n == 2
        assert run.metrics["dice/Anterior"] == pytest.approx(dict(row.class_dice)["Anterior"].mean)
        grandchildren = [r for r in runs if r.parent_id == run.run_id]
        assert len(grandchildren) == 2
