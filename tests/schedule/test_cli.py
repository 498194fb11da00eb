"""`autoseg train-all` and `autoseg status` through click, as a user runs them."""

from __future__ import annotations

import json

from click.testing import CliRunner

import autoseg.cli
from autoseg.dataset.phantom import PhantomRecipe, make_phantom_dataset
from autoseg.report.tables import render_table
from autoseg.schedule.jobs import JobState
from autoseg.schedule.store import StateStore
from tests.schedule.conftest import DATASET, train_jobs


def _cli(paths, *args: str):
    return CliRunner().invoke(autoseg.cli.cli, ["--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed),
                                                "--results", str(paths.results), *args])


def test_dry_run_shows_graph_and_gpus(sched_paths) -> None:
    make_phantom_dataset(sched_paths.raw, PhantomRecipe(num_training=5, num_test=0, shape=(8, 16, 16)))
    result = _cli(sched_paths, "train-all", "--configs", "3d_fullres", "--folds", "0-4", "--gpus", "0,1",
                  "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["job", "GPU", "CPUs", "workers", "augment", "start", "after"]
    names = [line.split()[0] for line in lines[2:10]]
    assert names == ["plan:" + DATASET, "preprocess:" + DATASET] + [
        f"train:{DATASET}:3d_fullres:default:fold_{k}" for k in range(5)] + ["find_best:" + DATASET]
    gpus = {line.split()[0]: line.split()[1] for line in lines[2:10]}
    assert {gpus[n] for n in names[2:7]} <= {"0", "1"} and gpus[names[0]] == "-"
    assert not (sched_paths.results / ".autoseg").exists()  # nothing started, nothing written
    partial = _cli(sched_paths, "train-all", "--configs", "3d_fullres", "--folds", "0,1", "--dry-run")
    assert "find_best" not in partial.stdout


def test_broken_dataset_fails_with_one_line_summary(sched_paths) -> None:
    make_phantom_dataset(sched_paths.raw, PhantomRecipe(num_training=4, num_test=0, shape=(8, 16, 16)))
    (sched_paths.raw / DATASET / "dataset.json").write_text("{ not json")
    result = _cli(sched_paths, "train-all", "--configs", "3d_fullres", "--folds", "0", "--gpus", "0", "--quiet",
                  "--retries", "1")
    assert result.exit_code == 1
    summary = [line for line in result.stderr.splitlines() if line.startswith("3 jobs")]
    assert len(summary) == 1
    assert "1 failed" in summary[0] and "2 blocked" in summary[0] and "failed: plan:" + DATASET in summary[0]
    # a user error (exit 2) is not retried, and the summary says what the plan job said
    assert "log: " in summary[0] and "(exit 2 after 1 attempt(s): " in summary[0] and "dataset.json" in summary[0]
    status = _cli(sched_paths, "status")
    assert status.exit_code == 0
    lines = status.stdout.splitlines()
    rows = {line.split()[0]: line.split()[1] for line in lines[2:-2]}
    assert rows["plan:" + DATASET] == "failed" and rows[f"train:{DATASET}:3d_fullres:default:fold_0"] == "blocked"
    assert lines[-1].startswith(f"plan:{DATASET} failed: ") and "dataset.json" in lines[-1]


def test_status_shows_training_progress(sched_paths) -> None:
    (job,) = train_jobs(1)
    with StateStore.open(sched_paths) as store:
        store.register([job])
        store.update(job.job_id, state=JobState.RUNNING, gpu="3", cpus=4, workers=3, attempt=1, started_at=1.0)
    fold_dir = sched_paths.training_dir(job.training_id())
    fold_dir.mkdir(parents=True)
    lines = [{"epoch": e, "epochs": 10, "mean_pseudo_dice": 0.5 + e / 10, "epoch_time_s": 30.0} for e in range(3)]
    (fold_dir / "training_log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"epo")
    result = _cli(sched_paths, "status")
    assert result.exit_code == 0
    header, _, row = result.stdout.splitlines()[:3]
    assert header.split() == ["job", "state", "GPU", "CPUs", "workers", "try", "epoch", "ETA", "pseudo-Dice", "val", "Dice", "elapsed",
                              "log"]
    cells = row.split()
    assert cells[1:10] == ["running", "3", "4", "3", "1", "3/10", "3m30s", "0.7000", "-"]

    lines = [{"epoch": e, "epochs": 10, "mean_pseudo_dice": 0.8, "epoch_time_s": 30.0} for e in range(10)]
    (fold_dir / "training_log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cells = _cli(sched_paths, "status").stdout.splitlines()[2].split()
    assert cells[6:10] == ["10/10", "validating", "0.8000", "-"]  # the final validation runs after the last epoch
    (fold_dir / "validation").mkdir()
    progress = {"cases_done": 3, "cases_total": 12, "started_at": 100.0, "updated_at": 130.0}
    (fold_dir / "validation" / "progress.json").write_text(json.dumps(progress))
    row = _cli(sched_paths, "status").stdout.splitlines()[2]
    assert row.split()[6:11] == ["10/10", "val", "3/12", "1m30s", "0.8000"]  # 10 s per case so far, 9 to go
    (fold_dir / "validation" / "summary.json").write_text(json.dumps({"foreground_mean": {"dice": 0.8512}}))
    cells = _cli(sched_paths, "status").stdout.splitlines()[2].split()
    assert cells[6:10] == ["10/10", "0s", "0.8000", "0.8512"]


def test_status_without_runs_and_render_table() -> None:
    text = render_table(("a", "n"), [["x", 1.5], ["longer", None]])
    assert text.splitlines() == ["a         n", "------  ---", "x       1.5", "longer    -"]
