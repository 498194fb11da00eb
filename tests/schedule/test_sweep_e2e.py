"""A real sweep on the CPU: 2 x 2 variants x 2 folds of tiny trainings on real Hippocampus cases,
run through the local scheduler with fake GPU ids, in two steps (a subset first, then the whole
grid) so the second run shows that only the missing jobs ran."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import autoseg.cli
from autoseg.common.jsonio import load_record, read_json
from autoseg.common.paths import Paths, TrainingId
from autoseg.evaluate.summary import Summary
from autoseg.report.sweep_report import build_sweep_report
from autoseg.schedule.jobs import JobPaths, JobRecord, JobState
from autoseg.schedule.store import StateStore
from autoseg.schedule.sweep import SweepSpec, load_sweep
from autoseg.schedule.sweep.jobs import sweep_dir, sweep_record_file
from tests.dice_check import check_summary_against_files
from tests.helpers import HIPPOCAMPUS_MISSING, hippocampus_available, hippocampus_case_ids, link_hippocampus_subset
from tests.sweep_fixtures import write_sweep

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not hippocampus_available(), reason=HIPPOCAMPUS_MISSING)]

TINY = {"epochs": 1, "iterations_per_epoch": 2, "val_iterations": 1, "batch_size": 2, "augment.mirror": False,
        "plan.3d_fullres.patch_size": [16, 32, 16]}
"""The smallest schedule that still trains, validates and writes every file. No mirroring (its
test-time mirroring makes validation 8x slower on the CPU) and a small patch (a plan override in
``base``, so every training also goes through a derived plan) keep the 8 trainings cheap."""


@dataclass
class SweepRuns:
    paths: Paths
    spec: SweepSpec
    first_output: str
    second_output: str
    second_started_at: float
    first_exit: int
    second_exit: int


def _body(lrs: list[float], deep_supervision: list[bool]) -> dict:
    return {"name": "e2e", "datasets": ["Dataset004_Hippocampus"], "configs": ["3d_fullres"], "folds": [0, 1],
            "seeds": [0], "base": TINY, "grid": {"lr": lrs, "deep_supervision": deep_supervision}}


@pytest.fixture(scope="module")
def sweep_runs(tmp_path_factory: pytest.TempPathFactory) -> SweepRuns:
    """Run the baseline alone first (2 trainings), then the full 2 x 2 grid (6 more)."""
    root = tmp_path_factory.mktemp("sweep_e2e")
    paths = Paths.under(root / "data")
    link_hippocampus_subset(paths.raw, hippocampus_case_ids(8))
    roots = ["--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed), "--results", str(paths.results)]
    subset = write_sweep(root, _body([0.01], [True]), "subset.yaml")
    full = write_sweep(root, _body([0.01, 0.003], [True, False]), "full.yaml")
    first = CliRunner().invoke(autoseg.cli.cli, [*roots, "sweep", str(subset), "--gpus", "0,1", "--retries", "0"])
    started = time.time()
    second = CliRunner().invoke(autoseg.cli.cli, [*roots, "sweep", str(full), "--gpus", "0,1", "--retries", "0"])
    return SweepRuns(paths, load_sweep(full, paths), first.output, second.output, started,
                     first.exit_code, second.exit_code)


def _fold_dir(runs: SweepRuns, variant: str, fold: int) -> Path:
    v = runs.spec.variant(variant)
    return runs.paths.training_dir(TrainingId("Dataset004_Hippocampus", "3d_fullres", fold, v.run_name("e2e"), 0))


def test_every_job_ran_with_its_own_overrides(sweep_runs: SweepRuns) -> None:
    assert sweep_runs.first_exit == 0, sweep_runs.first_output
    assert sweep_runs.second_exit == 0, sweep_runs.second_output
    expected = {"baseline": (0.01, True), "deep_supervision=false": (0.01, False),
                "lr=0.003": (0.003, True), "lr=0.003,deep_supervision=false": (0.003, False)}
    assert [v.name for v in sweep_runs.spec.variants] == list(expected)
    for name, (lr, deep_supervision) in expected.items():
        for fold in (0, 1):
            folder = _fold_dir(sweep_runs, name, fold)
            cfg = read_json(folder / "trainer_config.json")
            assert (cfg["lr"], cfg["deep_supervision"], cfg["augment"]["mirror"]) == (lr, deep_supervision, False)
            assert (cfg["epochs"], cfg["iterations_per_epoch"], cfg["batch_size"], cfg["seed"]) == (1, 2, 2, 0)
            assert (folder / "checkpoint_final.pt").is_file()
            assert read_json(folder / "plans.json")["configurations"]["3d_fullres"]["patch_size"] == [16, 32, 16]
            assert (folder / "validation" / "summary.json").is_file()


def test_report_has_one_row_per_variant_and_a_valid_plot(sweep_runs: SweepRuns) -> None:
    report = build_sweep_report(sweep_runs.spec, sweep_runs.paths)
    assert [r.variant for r in report.rows] == [v.name for v in sweep_runs.spec.variants]
    assert [(r.n_finished, r.n_expected) for r in report.rows] == [(2, 2)] * 4
    for r in report.rows:  # each variant's Dice: the mean of its folds' Dice, recounted from the written masks
        folds = [_fold_dir(sweep_runs, r.variant, fold) / "validation" for fold in (0, 1)]
        dice = [check_summary_against_files(f, load_record(f / "summary.json", Summary)) for f in folds]
        fold_means = [np.mean([np.mean(list(case.values())) for case in d.values()]) for d in dice]
        assert r.dice.n == 2 and r.dice.mean == pytest.approx(np.mean(fold_means), abs=1e-6), r.variant
    assert report.missing == ()
    assert all(r.comparison is not None and r.comparison.n == 2 and r.comparison.p_text() == "n<5"
               for r in report.rows[1:])
    folder = sweep_dir(sweep_runs.paths, "e2e")
    with Image.open(folder / "report.png") as img:
        img.verify()
        assert img.format == "PNG"
    assert len((folder / "report.csv").read_text(encoding="utf-8").strip().splitlines()) == 1 + 4
    assert "8 of 8 runs finished" in (folder / "report.md").read_text(encoding="utf-8")
    assert "8 of 8 runs finished" in sweep_runs.second_output
    recorded = load_record(sweep_record_file(sweep_runs.paths, "e2e"), SweepSpec)
    assert [v.name for v in recorded.variants] == [v.name for v in sweep_runs.spec.variants]


def test_second_run_only_ran_the_missing_jobs(sweep_runs: SweepRuns) -> None:
    with StateStore.open(sweep_runs.paths, readonly=True) as store:
        rows = {r.job_id: r for r in store.rows()}
    trains = {jid: r for jid, r in rows.items() if jid.startswith("train:")}
    assert len(trains) == 8 and all(r.state is JobState.DONE and r.attempt == 1 for r in trains.values())
    for jid in trains:
        record = load_record(JobPaths.of(sweep_runs.paths, jid).record, JobRecord)
        ran_in_second = record.started_at >= sweep_runs.second_started_at
        assert ran_in_second == (":e2e.baseline:" not in jid), jid
        assert record.state is JobState.DONE and record.exit_code == 0
        assert list(record.spec.trainer_overrides[:5]) == ["epochs=1", "iterations_per_epoch=2", "val_iterations=1",
                                                           "batch_size=2", "augment.mirror=false"]
        assert record.spec.plans_file and record.spec.plans_file.endswith("/plans.json")
        assert "--plans" in record.command
    # first run: plan + preprocess (before derived plans can be made), then 2 trainings
    assert [ln.split(" in ")[0] for ln in sweep_runs.first_output.splitlines()[:2]] == ["2 jobs: 2 done"] * 2
    assert "8 jobs: 8 done" in sweep_runs.second_output  # 8 trainings, 2 of them skipped as done
    preprocess = [r for jid, r in rows.items() if jid.startswith("preprocess:")]
    assert len(preprocess) == 1 and preprocess[0].attempt == 1  # preprocessing reused, not redone
    # each sweep invocation is one run of `autoseg status`: the first's setup and trainings share run 1
    # (else the baseline would have moved from run 2 to 3), the second took all 8 trainings
    assert {r.run_id for r in trains.values()} == {2}
    assert {r.run_id for jid, r in rows.items() if not jid.startswith("train:")} == {1}
