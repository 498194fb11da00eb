"""One bad trainer value, three sources (``--set``, a sweep file, a job record): the same one-line problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import autoseg.cli
from autoseg.common.errors import ConfigError
from autoseg.common.jsonio import record_from_dict, record_to_dict
from autoseg.common.paths import Paths
from autoseg.dataset.phantom import PhantomRecipe, make_phantom_dataset
from autoseg.schedule.jobs import JobKind, JobSpec
from autoseg.schedule.sweep import load_sweep
from autoseg.train.config import TrainerConfig, apply_overrides
from tests.schedule.conftest import DATASET
from tests.sweep_fixtures import minimal_sweep, write_sweep

PROBLEMS = [("epochs", "ten", "expected an integer, got 'ten'"),
            ("augment.mirror", "perhaps", "expected true/false, got 'perhaps'"),
            ("lr", "fast", "expected a number, got 'fast'")]


@pytest.mark.parametrize("key, value, problem", PROBLEMS)
def test_set_sweep_and_job_record_give_the_same_problem(tmp_path: Path, key: str, value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as cli_set:
        apply_overrides(TrainerConfig(), [f"{key}={value}"])
    assert (cli_set.value.where, cli_set.value.message) == (key, problem)

    sweep = write_sweep(tmp_path, minimal_sweep(base={"epochs": 1, key: value}))
    with pytest.raises(ConfigError) as from_yaml:
        load_sweep(sweep)
    assert (from_yaml.value.where, from_yaml.value.message) == (f"{sweep}:base.{key}", problem)

    good = JobSpec.make(JobKind.TRAIN, DATASET, config="3d_fullres", fold=0, trainer_overrides=("epochs=2",))
    body = json.loads(json.dumps(record_to_dict(good)))
    body["trainer_overrides"] = [f"{key}={value}"]
    with pytest.raises(ConfigError) as from_record:
        record_from_dict(JobSpec, body, where="job.json")
    assert (from_record.value.where, from_record.value.message) == (f"job.json:{key}", problem)


def test_train_all_set_fails_in_one_line_before_any_job(tmp_path: Path) -> None:
    paths = Paths(raw=tmp_path / "raw", preprocessed=tmp_path / "pre", results=tmp_path / "res")
    make_phantom_dataset(paths.raw, PhantomRecipe(num_training=4, num_test=0, shape=(8, 16, 16)))
    result = CliRunner().invoke(autoseg.cli.cli, [
        "--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed), "--results", str(paths.results),
        "train-all", "--configs", "3d_fullres", "--folds", "0", "--set", "epochs=ten", "--dry-run"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: epochs: expected an integer, got 'ten'"


def test_scheduler_reads_values_from_the_parsed_config() -> None:
    job = JobSpec.make(JobKind.TRAIN, DATASET, config="3d_fullres", fold=0,
                       trainer_overrides=("epochs=3", "augment.device=cpu", "batch_size=none"))
    cfg = job.trainer_config()
    assert (cfg.epochs, cfg.augment.device, cfg.batch_size) == (3, "cpu", None)
