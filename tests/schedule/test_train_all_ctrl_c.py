"""Ctrl-C of a real `autoseg train-all`: one SIGINT to the process (as a terminal sends it; the trainings
run in their own sessions, so only train-all gets it), then the same command again. With stand-in jobs
(tests/schedule/fake_job.py): a second SIGINT kills the children at once, and a SIGINT in the middle
of starting a job still stops and records that job."""

from __future__ import annotations

import _thread
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import autoseg.cli
from autoseg.cli.schedule import EXIT_INTERRUPTED
from autoseg.common.paths import Paths
from autoseg.schedule.executors import LocalExecutor
from autoseg.schedule.jobs import JobPaths, JobState
from autoseg.schedule.resources import PoolConfig
from autoseg.schedule.runner import RunOptions, run_locked
from autoseg.schedule.store import JobRow, StateStore, db_path
from autoseg.train.checkpoint import FINAL, LATEST
from tests.schedule.conftest import (DATASET, TINY_TRAINING, epochs_logged, fake_command, fold_dir, single_thread_env,
                                     train_all_command, train_jobs)

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 20
"""Enough that both trainings are still running, with an epoch logged, when the test presses Ctrl-C."""
WAIT_S = 300.0
"""Bound on the waits for whole runs (preprocessing and two trainings on a loaded 2-core machine)."""
STOP_S = 120.0
"""Bound on train-all's exit after Ctrl-C: each child finishes its iteration and saves a checkpoint."""
FOLDS = (0, 1)


def _rows(paths: Paths) -> dict[str, JobRow]:
    if not db_path(paths).is_file():
        return {}
    try:
        with StateStore.open(paths, readonly=True) as store:
            return {r.job_id: r for r in store.rows()}
    except Exception:
        return {}


def _train_job(fold: int) -> str:
    return f"train:{DATASET}:3d_fullres:default:fold_{fold}"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] not in ("Z", "X")
    except OSError:
        return False


def _wait_until_both_train(proc: subprocess.Popen, paths: Paths) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"train-all ended (exit {proc.returncode}) before it could be interrupted")
        rows = _rows(paths)
        if all(_train_job(k) in rows and rows[_train_job(k)].state is JobState.RUNNING
               and epochs_logged(fold_dir(paths, "3d_fullres", k)) for k in FOLDS):
            return
        time.sleep(0.1)
    pytest.fail(f"the two trainings were not both running with an epoch logged within {WAIT_S:.0f} s")


@pytest.mark.slow
def test_one_ctrl_c_checkpoints_and_stops_the_trainings_and_a_rerun_resumes_them(phantom_small: Paths,
                                                                                 tmp_path: Path) -> None:
    paths = Paths(phantom_small.raw, tmp_path / "pre", tmp_path / "res")
    planned = CliRunner().invoke(autoseg.cli.cli, [  # a small patch keeps an epoch well under a second
        "--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed), "--results", str(paths.results),
        "plan", DATASET, "--configs", "3d_fullres", "--set", "3d_fullres.patch_size=8,16,16"])
    assert planned.exit_code == 0, planned.output
    cmd = train_all_command(paths, "--configs", "3d_fullres", "--folds", "0,1", "--gpus", "0,1", "--retries", "0",
                            "--quiet", "--set", f"epochs={EPOCHS}", "--set", "augment.mirror=false", *TINY_TRAINING)
    env = single_thread_env()
    with open(tmp_path / "first.log", "wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_until_both_train(proc, paths)
            children = {k: int(_rows(paths)[_train_job(k)].external_id) for k in FOLDS}
            proc.send_signal(signal.SIGINT)  # one Ctrl-C
            rc = proc.wait(timeout=STOP_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = (tmp_path / "first.log").read_text(encoding="utf-8")
    assert rc == EXIT_INTERRUPTED, output[-3000:]
    summary = output.strip().splitlines()[-1]  # the one line it ends with
    assert summary.startswith("3 jobs: ") and "1 done" in summary and "2 interrupted" in summary, output[-3000:]
    assert summary.endswith("interrupted: run the same command again to resume")
    assert output.count("interrupted: run the same command again") == 1 and "Traceback" not in output

    rows = _rows(paths)
    assert rows[f"preprocess:{DATASET}"].state is JobState.DONE
    before = {}
    for k in FOLDS:
        row = rows[_train_job(k)]
        assert row.state is JobState.INTERRUPTED and row.exit_code == EXIT_INTERRUPTED and row.attempt == 1
        assert not _alive(children[k])  # the training stopped, it was not left behind
        job_log = JobPaths.of(paths, row.job_id).log.read_text(encoding="utf-8")
        assert "SIGINT received: stopping after the current iteration" in job_log
        assert "send again to abort" in job_log and "Traceback" not in job_log  # one signal, a clean stop
        folder = fold_dir(paths, "3d_fullres", k)
        assert (folder / LATEST).is_file() and not (folder / FINAL).is_file()
        before[k] = epochs_logged(folder)
        assert 1 <= len(before[k]) < EPOCHS

    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, encoding="utf-8", timeout=WAIT_S)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert second.stdout.strip().startswith("2 jobs: 2 done")  # preprocessing is complete: not a job any more
    rows = _rows(paths)
    assert {r.state for r in rows.values()} == {JobState.DONE} and len(rows) == 3
    assert rows[f"preprocess:{DATASET}"].attempt == 1  # finished before Ctrl-C: not run again
    for k in FOLDS:
        row = rows[_train_job(k)]
        assert row.attempt == 2 and row.exit_code == 0
        logged = epochs_logged(fold_dir(paths, "3d_fullres", k))
        assert [e["epoch"] for e in logged] == list(range(EPOCHS))  # the epoch counter went on
        assert logged[:len(before[k])] == before[k]  # the first run's epochs, as they were
        job_log = JobPaths.of(paths, row.job_id).log.read_text(encoding="utf-8")
        assert job_log.count("starting from scratch") == 1 and "attempt 2 started" in job_log
        assert (fold_dir(paths, "3d_fullres", k) / FINAL).is_file()


def _log(paths: Paths, job_id: str) -> str:
    path = JobPaths.of(paths, job_id).log
    return path.read_text(encoding="utf-8") if path.exists() else ""


def _stepping(paths: Paths, job_id: str) -> bool:
    """Whether a stand-in job has saved a step (its signal handlers are in place by then)."""
    row = _rows(paths).get(job_id)
    return row is not None and (paths.training_dir(row.spec.training_id()) / "ckpt.json").is_file()


def test_a_second_ctrl_c_kills_the_jobs_at_once(sched_paths) -> None:
    """Stand-in jobs that take 60 s to "save" after SIGINT: the second Ctrl-C must not wait for them."""
    root = sched_paths.results.parent
    cmd = [sys.executable, "-m", "tests.schedule.driver", str(root), "2", "1000", "0.05", "0,1", "60"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            encoding="utf-8")
    try:
        deadline = time.monotonic() + 60
        pids: dict[str, int] = {}
        while time.monotonic() < deadline and not (len(pids) == 2 and all(_stepping(sched_paths, j) for j in pids)):
            pids = {j: int(r.external_id) for j, r in _rows(sched_paths).items()
                    if r.state is JobState.RUNNING and r.external_id}
            time.sleep(0.05)
        assert len(pids) == 2 and all(_stepping(sched_paths, j) for j in pids), "the stand-in jobs did not start"
        proc.send_signal(signal.SIGINT)  # first Ctrl-C: both begin their slow stop
        while time.monotonic() < deadline and not all("stopping at step" in _log(sched_paths, j) for j in pids):
            time.sleep(0.05)
        assert all("stopping at step" in _log(sched_paths, j) for j in pids), "the first Ctrl-C reached no job"
        proc.send_signal(signal.SIGINT)  # second Ctrl-C
        output, _ = proc.communicate(timeout=30)  # well before the 60 s their stop would take
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, output
    assert "killing 2 running job(s)" in output, output
    assert "2 interrupted" in output.strip().splitlines()[-1], output
    for job_id, pid in pids.items():
        assert not _alive(pid)
        assert "interrupted at step" not in _log(sched_paths, job_id)  # killed during its stop
    assert {r.state for r in _rows(sched_paths).values()} == {JobState.INTERRUPTED}


class _CtrlCRightAfterFirstStart(LocalExecutor):
    """Presses Ctrl-C the moment the first child has started, before the runner has recorded it."""

    def __init__(self, command_for) -> None:
        super().__init__(command_for=command_for)
        self.handles: list = []

    def submit(self, launch):
        handle = super().submit(launch)
        self.handles.append(handle)
        if len(self.handles) == 1:
            _thread.interrupt_main()  # SIGINT, as the terminal delivers it, in the middle of a launch
        return handle


def test_ctrl_c_during_a_launch_still_stops_and_records_that_job(sched_paths) -> None:
    jobs = train_jobs(2)
    executor = _CtrlCRightAfterFirstStart(fake_command(sched_paths, 1000, 0.05))
    summary = run_locked(sched_paths, jobs, executor,
                         RunOptions(pool=PoolConfig(gpus=("0", "1")), poll_interval_s=0.05))
    assert summary.interrupted and len(executor.handles) >= 1
    for handle in executor.handles:  # every child that was started got the SIGINT and stopped (a child still
        handle.proc.wait(timeout=30)  # starting up dies of it, one in its loop saves and exits 130)
    with StateStore.open(sched_paths) as store:
        states = {r.job_id: r.state for r in store.rows()}
    started = {h.proc.args[2] for h in executor.handles}
    assert JobState.RUNNING not in states.values()
    for job in jobs:
        was_started = str(sched_paths.training_dir(job.training_id())) in started
        assert states[job.job_id] is (JobState.INTERRUPTED if was_started else JobState.PENDING)
