"""Where tracking is switched on and how it reaches the scheduler's children: the spec text, its
precedence (--track > a sweep's track: > $AUTOSEG_TRACK), absolute targets for children in other
working directories, the one-line error for a missing extra, and each job's variables."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import autoseg.cli
from autoseg.common.errors import AutosegError, ConfigError
from autoseg.schedule.jobs import JobKind, JobSpec
from autoseg.schedule.sweep import load_sweep
from autoseg.schedule.sweep.tracking import SweepTracking, variant_params
from autoseg.schedule.train_all import train_all_job_env
from autoseg.track import base
from autoseg.track.spec import (CONTEXT_ENV, TRACK_ENV, TrackContext, TrackSpec, child_env, parse_track_spec,
                                resolve_spec, track_request_from_env)
from tests.sweep_fixtures import minimal_sweep, write_sweep


def test_spec_texts() -> None:
    assert parse_track_spec("mlflow") == TrackSpec("mlflow", "")
    assert parse_track_spec("mlflow:http://127.0.0.1:5000") == TrackSpec("mlflow", "http://127.0.0.1:5000")
    assert parse_track_spec(" TB:/x ") == TrackSpec("tensorboard", "/x")
    assert parse_track_spec("wandb:proj") == TrackSpec("wandb", "proj")
    assert parse_track_spec("none") is None and parse_track_spec("") is None and parse_track_spec(None) is None
    with pytest.raises(AutosegError, match="unknown tracker 'neptune'"):
        parse_track_spec("neptune")


def test_local_targets_become_absolute(tmp_path: Path) -> None:
    assert resolve_spec(TrackSpec("mlflow"), tmp_path).target == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_spec(TrackSpec("mlflow", "runs"), tmp_path).target == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert resolve_spec(TrackSpec("mlflow", "sqlite:///a.db"), tmp_path).target == f"sqlite:///{tmp_path / 'a.db'}"
    assert resolve_spec(TrackSpec("mlflow"), tmp_path, "http://h:5000").target == "http://h:5000"
    assert resolve_spec(TrackSpec("mlflow", "http://h:1"), tmp_path, "http://h:5000").target == "http://h:1"
    assert resolve_spec(TrackSpec("tensorboard", "tb"), tmp_path).target == str(tmp_path / "tb")
    assert resolve_spec(TrackSpec("tensorboard"), tmp_path).target == ""
    assert resolve_spec(TrackSpec("mlflow", "x"), tmp_path).artifact_root == tmp_path / "x" / "mlruns"
    with pytest.raises(AutosegError, match="file store"):
        resolve_spec(TrackSpec("mlflow", "file:///tmp/mlruns"), tmp_path)


def test_option_beats_the_sweep_file_which_beats_the_environment(tmp_path: Path) -> None:
    env = {TRACK_ENV: "tensorboard", "CUDA_VISIBLE_DEVICES": "3", "OMP_NUM_THREADS": "2"}
    assert track_request_from_env(env, None, tmp_path).spec.backend == "tensorboard"
    assert track_request_from_env(env, None, tmp_path, file_value="wandb").spec.backend == "wandb"
    assert track_request_from_env(env, "mlflow", tmp_path, file_value="wandb").spec.backend == "mlflow"
    assert track_request_from_env(env, "none", tmp_path) is None
    request = track_request_from_env(env, None, tmp_path)
    assert request.context.environment == {"CUDA_VISIBLE_DEVICES": "3", "OMP_NUM_THREADS": "2"}
    assert track_request_from_env({}, "mlflow", tmp_path).context.environment == {"CUDA_VISIBLE_DEVICES": "unset"}


def test_a_child_gets_the_spec_and_its_context_back() -> None:
    spec = TrackSpec("mlflow", "http://h:5000", checkpoints=True)
    context = TrackContext(experiment="sweep/s", parent_run_id="abc", tags={"t": "1"}, params={"sweep.axis.lr": "0.1"})
    env = child_env(spec, context)
    request = track_request_from_env(env, None, Path("/elsewhere"))
    assert request.spec == spec
    assert (request.context.experiment, request.context.parent_run_id, request.context.tags,
            request.context.params) == ("sweep/s", "abc", {"t": "1"}, {"sweep.axis.lr": "0.1"})
    assert child_env(None) == {TRACK_ENV: "none", CONTEXT_ENV: ""}  # an inherited $AUTOSEG_TRACK is overridden
    assert track_request_from_env({**env, **child_env(None)}, None, Path("/")) is None


def test_train_all_tracks_only_train_jobs_grouped_by_dataset() -> None:
    spec = TrackSpec("mlflow", "http://h:5000")
    train = JobSpec.make(JobKind.TRAIN, "Dataset004_Hippocampus", config="3d_fullres", fold=0)
    plan = JobSpec.make(JobKind.PLAN, "Dataset004_Hippocampus")
    context = TrackContext.from_json(train_all_job_env(train, spec)[CONTEXT_ENV])
    assert train_all_job_env(train, spec)[TRACK_ENV] == "mlflow:http://h:5000"
    assert context.experiment == "Dataset004_Hippocampus" and context.parent_run_id is None
    assert train_all_job_env(plan, spec)[TRACK_ENV] == "none"
    assert train_all_job_env(train, None)[TRACK_ENV] == "none"


def test_sweep_jobs_nest_under_their_variant_or_the_sweep(tmp_path: Path) -> None:
    sweep = load_sweep(write_sweep(tmp_path, minimal_sweep(track="mlflow")))
    assert sweep.track == "mlflow"
    tracking = SweepTracking(TrackSpec("mlflow", "sqlite:////x.db"), sweep, tmp_path, "sweep/toy", None, "parent",
                             variant_ids={"lr=0.003": "variant-run"})
    jobs = {v.name: JobSpec.make(JobKind.TRAIN, "Dataset004_Hippocampus", config="3d_fullres", fold=1,
                                 variant=v.run_name("toy"), seed=0) for v in sweep.variants}
    lr = TrackContext.from_json(tracking.job_env(jobs["lr=0.003"])[CONTEXT_ENV])
    assert lr.parent_run_id == "variant-run" and lr.experiment == "sweep/toy"
    assert lr.tags == {"autoseg.sweep": "toy", "autoseg.sweep_variant": "lr=0.003"}
    assert lr.params == variant_params(sweep, sweep.variant("lr=0.003")) and lr.params["sweep.axis.lr"] == "0.003"
    baseline = TrackContext.from_json(tracking.job_env(jobs["baseline"])[CONTEXT_ENV])
    assert baseline.parent_run_id == "parent" and baseline.params["sweep.baseline"] == "True"
    plan = JobSpec.make(JobKind.PLAN, "Dataset004_Hippocampus")
    assert tracking.job_env(plan)[TRACK_ENV] == "none"


def test_a_sweep_file_with_an_unknown_tracker_fails_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown tracker 'mlfow'") as info:
        load_sweep(write_sweep(tmp_path, minimal_sweep(track="mlfow")))
    assert info.value.where.endswith("sweep.yaml:track")


def test_a_missing_extra_is_one_line_naming_the_pip_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(base.PACKAGES, "mlflow", "mlflow_is_not_installed_here")
    result = CliRunner().invoke(autoseg.cli.cli, ["--results", str(tmp_path), "train", "4", "3d_fullres", "0",
                                                  "--track", "mlflow"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        'error: --track: mlflow tracking needs the mlflow_is_not_installed_here package: pip install '
        '"autoseg[track]" (or pip install mlflow_is_not_installed_here)']
