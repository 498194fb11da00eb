"""Sweep reports on synthetic fold folders: statistics, pairing, fallbacks, partial sweeps, files."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import wilcoxon

from autoseg.common.paths import Paths, TrainingId
from autoseg.report.sweep_report import (
    METRIC_DICE,
    METRIC_PSEUDO,
    MeanStd,
    RunKey,
    RunResult,
    build_sweep_report,
    format_markdown,
    paired_comparison,
    read_run,
    read_training_log,
    summarize_runs,
    write_sweep_report,
)
from autoseg.schedule.sweep import load_sweep
from autoseg.schedule.sweep.jobs import sweep_dir
from tests.sweep_fixtures import fake_fold, fake_summary, minimal_sweep, write_sweep


def _run(variant: str, fold: int, dice: float | None, pseudo: float | None = 0.5, seed: int = 0,
         finished: bool = True) -> RunResult:
    return RunResult(key=RunKey("D", "3d_fullres", variant, seed, fold), finished=finished, epochs_done=2, epochs=2,
                     dice=dice, class_dice=(("A", dice),) if dice is not None else (), hd95=2.0 if dice else None,
                     pseudo_dice=pseudo, train_time_s=20.0, iterations_per_s=4.0)


def test_mean_std_is_the_sample_std_and_ignores_missing() -> None:
    m = MeanStd.of([0.8, 0.9, None, float("nan"), 0.7])
    assert m.n == 3 and m.mean == pytest.approx(0.8) and m.std == pytest.approx(0.1)
    assert math.isnan(MeanStd.of([0.5]).std) and MeanStd.of([0.5]).text() == "0.5000"
    assert MeanStd.of([]).n == 0 and MeanStd.of([]).text() == "–"


def test_paired_comparison_below_five_pairs_has_no_p_value() -> None:
    base = {(0, f): 0.8 for f in range(4)}
    var = {(0, f): 0.8 + 0.01 * (f + 1) for f in range(4)}
    c = paired_comparison(base, var)
    assert c.n == 4 and c.p_value is None and c.p_text() == "n<5"
    assert c.mean_delta == pytest.approx(0.025)
    assert [k for k, _ in c.deltas] == ["s0/f0", "s0/f1", "s0/f2", "s0/f3"]


def test_paired_comparison_matches_scipy_and_pairs_only_common_runs() -> None:
    rng = np.random.default_rng(1)
    base = {(s, f): float(rng.uniform(0.7, 0.9)) for s in (0, 1) for f in range(5)}
    var = {k: v + float(rng.normal(0.01, 0.02)) for k, v in base.items()}
    var.pop((1, 4))
    base[(2, 0)] = 0.5  # no partner
    c = paired_comparison(base, var)
    deltas = [var[k] - base[k] for k in sorted(set(base) & set(var))]
    assert c.n == 9
    assert c.p_value == pytest.approx(float(wilcoxon(deltas).pvalue))
    assert paired_comparison(base, dict(base)).p_value == 1.0  # identical: no difference at all


def test_summarize_runs_one_row_per_variant_with_deltas() -> None:
    runs = [_run("baseline", f, 0.80 + 0.01 * f) for f in range(5)]
    runs += [_run("lr=0.003", f, 0.82 + 0.01 * f) for f in range(5)]
    runs += [_run("lr=0.001", f, 0.7, finished=(f < 2)) for f in range(5)]
    expected = {("D", "3d_fullres", v): 5 for v in ("baseline", "lr=0.003", "lr=0.001")}
    rows = summarize_runs(runs, ["baseline", "lr=0.003", "lr=0.001"], "baseline", expected)
    assert [r.variant for r in rows] == ["baseline", "lr=0.003", "lr=0.001"]
    assert [r.baseline for r in rows] == [True, False, False]
    assert [r.n_finished for r in rows] == [5, 5, 2]
    assert rows[0].comparison is None and rows[0].metric == METRIC_DICE
    assert rows[1].comparison.mean_delta == pytest.approx(0.02)
    assert rows[1].comparison.p_value == pytest.approx(float(wilcoxon([0.02] * 5).pvalue))
    assert rows[2].comparison.n == 2 and rows[2].comparison.p_value is None
    assert rows[1].dice.mean == pytest.approx(0.84) and rows[1].dice.std == pytest.approx(np.std(
        [0.82, 0.83, 0.84, 0.85, 0.86], ddof=1))
    assert dict(rows[1].class_dice)["A"].n == 5


def test_without_any_summary_the_comparison_uses_pseudo_dice_and_says_so() -> None:
    runs = [_run("baseline", f, None, pseudo=0.6) for f in range(3)] + [_run("x", f, None, pseudo=0.7) for f in range(3)]
    rows = summarize_runs(runs, ["baseline", "x"], "baseline", {("D", "3d_fullres", "baseline"): 3,
                                                                  ("D", "3d_fullres", "x"): 3})
    assert rows[1].metric == METRIC_PSEUDO
    assert rows[1].comparison.mean_delta == pytest.approx(0.1)
    assert rows[1].dice.n == 0
    md = format_markdown(__import__("autoseg.report.sweep_report", fromlist=["SweepReport"]).SweepReport(
        sweep="s", rows=tuple(rows), runs=tuple(runs), missing=(), n_expected=6))
    assert "pseudo-Dice (EMA, last epoch; not a validation Dice)" in md


def test_training_log_keeps_the_last_record_per_epoch_and_skips_torn_lines(tmp_path: Path) -> None:
    log = tmp_path / "training_log.jsonl"
    log.write_text('{"epoch": 0, "epoch_time_s": 1}\n{"epoch": 1, "epoch_time_s": 2}\n'
                   '{"epoch": 1, "epoch_time_s": 3}\n{"epoch": 2, "epo')
    recs = read_training_log(log)
    assert [r["epoch_time_s"] for r in recs] == [1, 3]
    assert read_training_log(tmp_path / "none.jsonl") == []


def test_read_run_takes_dice_from_the_summary_and_times_from_the_log(tmp_path: Path) -> None:
    folder = fake_fold(tmp_path / "f", epochs=3, ema=0.42, summary=fake_summary({1: 0.8, 2: 0.6}, hd95=4.0),
                       epoch_time_s=5.0, its=8.0)
    run = read_run(folder, RunKey("D", "c", "v", 0, 0))
    assert run.finished and run.epochs_done == 3 and run.epochs == 3
    assert run.dice == pytest.approx(0.7) and run.hd95 == pytest.approx(4.0)
    assert run.class_dice == (("Anterior", 0.8), ("Posterior", 0.6))
    assert run.pseudo_dice == pytest.approx(0.42)
    assert run.train_time_s == pytest.approx(15.0) and run.iterations_per_s == pytest.approx(8.0)
    empty = read_run(tmp_path / "nothing", RunKey("D", "c", "v", 0, 1))
    assert not empty.finished and empty.dice is None and empty.train_time_s is None


def test_partial_sweep_report_files(tmp_path: Path, paths: Paths) -> None:
    spec = load_sweep(write_sweep(tmp_path, minimal_sweep(folds=[0, 1, 2, 3, 4])))
    rng = np.random.default_rng(0)
    for v in spec.variants:
        for fold in spec.folds:
            if v.name == "lr=0.003,augment.mirror=false" and fold >= 3:
                continue  # not run yet
            folder = paths.training_dir(TrainingId("Dataset004_Hippocampus", "3d_fullres", fold,
                                                   v.run_name(spec.name), 0))
            d = float(rng.uniform(0.6, 0.9))
            fake_fold(folder, summary=fake_summary({1: d, 2: d - 0.05}))
    report = build_sweep_report(spec, paths)
    assert len(report.rows) == 4 and report.n_expected == 20
    assert {k.fold for k in report.missing} == {3, 4} and len(report.missing) == 2
    assert [r.n_finished for r in report.rows] == [5, 5, 5, 3]
    files = write_sweep_report(report, sweep_dir(paths, spec.name))
    md = files.markdown.read_text(encoding="utf-8")
    assert "baseline** (baseline)" in md and "3/5" in md and "Missing (2 runs not finished)" in md
    assert "Dice Anterior" in md
    rows = list(csv.DictReader(io.StringIO(files.csv.read_text(encoding="utf-8"))))
    assert [r["variant"] for r in rows] == [v.name for v in spec.variants]
    assert rows[0]["baseline"] == "true" and rows[1]["p_value"] != "" and rows[3]["p_value"] == ""
    assert float(rows[1]["dice_Anterior_mean"]) > 0
    assert len(list(csv.DictReader(io.StringIO(files.runs_csv.read_text(encoding="utf-8"))))) == 20
    with Image.open(files.png) as img:
        img.verify()
        assert img.format == "PNG"
