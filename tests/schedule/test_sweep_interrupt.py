"""A real Ctrl-C of `autoseg sweep`: SIGINT to the sweep process while one training is done and one
runs, then the same command again. test_sweep_e2e.py covers the re-run of a partial sweep; this one
covers the interrupt path itself (children checkpoint, jobs end INTERRUPTED, the re-run resumes)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoseg.cli.schedule import EXIT_INTERRUPTED
from autoseg.common.jsonio import load_record
from autoseg.common.paths import Paths
from autoseg.report.sweep_report import read_training_log
from autoseg.schedule.jobs import JobPaths, JobRecord, JobState
from autoseg.schedule.store import JobRow, StateStore, db_path
from autoseg.train.checkpoint import FINAL, LATEST
from autoseg.train.loop import LOG_FILE
from tests.sweep_fixtures import write_sweep

DS = "Dataset999_Phantom"
LONG_EPOCHS = 20
"""Enough that the long run is still training when the 1-epoch run (same start, same work per
epoch) has finished and validated, with a wide margin on a loaded machine."""

BODY = {
    "name": "ctrlc", "datasets": [DS], "configs": ["3d_fullres"], "folds": [0], "seeds": [0],
    "base": {"iterations_per_epoch": 2, "val_iterations": 1, "batch_size": 2, "augment.mirror": False,
             "plan.3d_fullres.patch_size": [8, 16, 16]},
    "variants": {"short": {"epochs": 1}, "long": {"epochs": LONG_EPOCHS}},
}
"""Two variants x 1 fold x 1 seed, so ``--gpus 0,1`` starts both trainings at once. A small patch
(through a plan override, so the run also goes through derived plans) and no mirroring keep an
epoch well under a second on the CPU."""

WAIT_S = 300.0
"""Bound on the waits for whole runs (plan + preprocess + trainings, on a loaded 2-core machine)."""

STOP_S = 120.0
"""Bound on the exit after Ctrl-C: the child stops after its current iteration, then the report."""


def _train_rows(paths: Paths) -> dict[str, JobRow]:
    if not db_path(paths).is_file():
        return {}
    try:
        with StateStore.open(paths, readonly=True) as store:
            return {r.job_id: r for r in store.rows() if r.job_id.startswith("train:")}
    except sqlite3.OperationalError:  # the sweep created the file but not its table yet
        return {}


def _fold_dir(paths: Paths, row: JobRow) -> Path:
    tid = row.spec.training_id()
    assert tid is not None
    return paths.training_dir(tid)


def _variant(row: JobRow) -> str:
    return row.spec.variant.removeprefix("ctrlc.")


def _wait_for_short_done_and_long_training(proc: subprocess.Popen, paths: Paths) -> None:
    """Until the short run is DONE and the long one RUNNING with an epoch logged (so a resume can show)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended (exit {proc.returncode}) before it could be interrupted")
        rows = {_variant(r): r for r in _train_rows(paths).values()}
        if (len(rows) == 2 and rows["short"].state is JobState.DONE and rows["long"].state is JobState.RUNNING
                and read_training_log(_fold_dir(paths, rows["long"]) / LOG_FILE)):
            return
        time.sleep(0.1)
    pytest.fail(f"no state with one training done and one running within {WAIT_S:.0f} s: {_train_rows(paths)}")


def _run_and_interrupt(cmd: list[str], env: dict[str, str], paths: Paths, log_file: Path) -> tuple[int, str]:
    """Start the sweep, SIGINT it once one training is done and one runs; (exit status, output)."""
    with open(log_file, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=log_file.parent, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_for_short_done_and_long_training(proc, paths)
            proc.send_signal(signal.SIGINT)  # what Ctrl-C sends (the children run in their own sessions)
            rc = proc.wait(timeout=STOP_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return rc, log_file.read_text(encoding="utf-8")


@pytest.mark.slow
def test_ctrl_c_interrupts_the_sweep_and_a_rerun_resumes_only_what_is_missing(phantom_small: Paths,
                                                                             tmp_path: Path) -> None:
    paths = Paths(phantom_small.raw, tmp_path / "pre", tmp_path / "res")
    file = write_sweep(tmp_path, BODY)
    cmd = [sys.executable, "-m", "autoseg", "--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed),
           "--results", str(paths.results), "sweep", str(file), "--gpus", "0,1", "--retries", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first_exit, first_output = _run_and_interrupt(cmd, env, paths, tmp_path / "first.log")
    assert first_exit == EXIT_INTERRUPTED, first_output[-3000:]
    assert "interrupted: run the same command again to resume" in first_output

    rows = {_variant(r): r for r in _train_rows(paths).values()}
    short, long = rows["short"], rows["long"]
    assert short.state is JobState.DONE and short.attempt == 1
    assert long.state is JobState.INTERRUPTED and long.exit_code == EXIT_INTERRUPTED, long
    long_dir = _fold_dir(paths, long)
    assert (long_dir / LATEST).is_file() and not (long_dir / FINAL).is_file()
    logged_before = read_training_log(long_dir / LOG_FILE)
    assert 1 <= len(logged_before) < LONG_EPOCHS
    short_record = load_record(JobPaths.of(paths, short.job_id).record, JobRecord)
    with StateStore.open(paths, readonly=True) as store:
        setup_before = {r.job_id: r for r in store.rows() if not r.job_id.startswith("train:")}
    assert sorted(j.split(":")[0] for j in setup_before) == ["plan", "preprocess"]

    second_started = time.time()
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, encoding="utf-8", timeout=WAIT_S)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert "2 of 2 runs finished" in second.stdout

    with StateStore.open(paths, readonly=True) as store:
        after = {r.job_id: r for r in store.rows()}
    assert {r.state for r in after.values()} == {JobState.DONE} and len(after) == 4
    for job_id, row in setup_before.items():  # finished in the first run: not run again
        assert (after[job_id].attempt, after[job_id].started_at) == (row.attempt, row.started_at)
    # the finished training was skipped: its record, row and log are those of the first run
    assert load_record(JobPaths.of(paths, short.job_id).record, JobRecord) == short_record
    assert (after[short.job_id].attempt, after[short.job_id].started_at) == (1, short.started_at)
    assert JobPaths.of(paths, short.job_id).log.read_text(encoding="utf-8").count("=== autoseg scheduler") == 1
    # the interrupted one ran again and continued from its checkpoint instead of starting over
    long_after = load_record(JobPaths.of(paths, long.job_id).record, JobRecord)
    assert long_after.attempt == 2 and long_after.started_at >= second_started and long_after.exit_code == 0
    assert "--continue" in long_after.command
    logged = read_training_log(long_dir / LOG_FILE)
    assert [e["epoch"] for e in logged] == list(range(LONG_EPOCHS))
    assert logged[:len(logged_before)] == logged_before  # the epochs of the first run, as they were
    job_log = JobPaths.of(paths, long.job_id).log.read_text(encoding="utf-8")
    assert job_log.count("starting from scratch") == 1 and "attempt 2 started" in job_log
    for row in (short, long):
        assert (_fold_dir(paths, row) / FINAL).is_file()
