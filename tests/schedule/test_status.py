"""`autoseg status`: local jobs a dead scheduler left marked running show as interrupted; only the latest
run's jobs are shown unless ``--all``, also in train-all's live table; older stores stay readable."""

from __future__ import annotations

import io
import json
import socket
import sqlite3
import subprocess
import sys
from dataclasses import replace

from click.testing import CliRunner

import autoseg.cli
from autoseg.cli.schedule import LiveTable
from autoseg.common.jsonio import record_to_dict
from autoseg.schedule.executors import LocalExecutor
from autoseg.schedule.jobs import JobState
from autoseg.schedule.lock import RunLock, lock_path, scheduler_alive
from autoseg.schedule.resources import PoolConfig, machine_cores
from autoseg.schedule.runner import RunOptions, run_locked
from autoseg.schedule.status import collect_status, latest_run
from autoseg.schedule.store import StateStore, db_path
from tests.schedule.conftest import fake_command, train_jobs


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _store_with_running_jobs(paths) -> list[str]:
    jobs = train_jobs(2)
    with StateStore.open(paths) as store:
        store.register(jobs)
        store.update(jobs[0].job_id, state=JobState.RUNNING, executor="local", external_id="12345", started_at=1.0)
        store.update(jobs[1].job_id, state=JobState.RUNNING, executor="slurm", external_id="77", started_at=1.0)
    return [j.job_id for j in jobs]


def test_local_jobs_of_a_killed_scheduler_show_as_interrupted(sched_paths) -> None:
    local, slurm = _store_with_running_jobs(sched_paths)
    lock_path(sched_paths).parent.mkdir(parents=True, exist_ok=True)
    # what a SIGKILLed train-all leaves: its pid in the lock file, never released
    lock_path(sched_paths).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "since": 0.0}) + "\n")
    assert not scheduler_alive(sched_paths)
    states = {s.job_id: s for s in collect_status(sched_paths)}
    assert states[local].state is JobState.INTERRUPTED and states[local].elapsed_s is not None
    assert states[slurm].state is JobState.RUNNING  # a Slurm job outlives the scheduler


def test_jobs_of_a_live_scheduler_stay_running(sched_paths) -> None:
    local, slurm = _store_with_running_jobs(sched_paths)
    with RunLock(sched_paths):
        assert scheduler_alive(sched_paths)
        assert {s.job_id: s.state for s in collect_status(sched_paths)} == {local: JobState.RUNNING,
                                                                           slurm: JobState.RUNNING}
    assert not scheduler_alive(sched_paths)  # a released lock holds no pid
    assert lock_path(sched_paths).read_text() == ""


# ---------------------------------------------------------------------- one run's jobs, not every run's


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, so that train-all's live table draws."""

    def isatty(self) -> bool:
        return True


def _status(paths, *args: str) -> list[str]:
    result = CliRunner().invoke(autoseg.cli.cli, ["--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed),
                                                  "--results", str(paths.results), "status", *args])
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def test_a_second_run_shows_only_its_own_jobs_unless_all(sched_paths, monkeypatch) -> None:
    first, (second,) = train_jobs(2, config="3d_fullres"), train_jobs(1, config="2d")
    options = RunOptions(pool=PoolConfig(gpus=("0", "1"), cores=machine_cores()), poll_interval_s=0.02, retries=0)
    executor = LocalExecutor(command_for=fake_command(sched_paths, 2, 0.05, fail=frozenset({first[1].job_id})))
    assert not run_locked(sched_paths, first, executor, options).ok  # fold 1 failed: a row a live table shows
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    live = LiveTable(sched_paths, enabled=True)
    assert run_locked(sched_paths, [second], executor, replace(options, observer=live, observe_every_s=0.0)).ok
    monkeypatch.undo()
    frames = terminal.getvalue()
    assert second.job_id in frames and "3d_fullres" not in frames  # the first run's jobs are not this run's
    assert frames.rstrip().splitlines()[-1].endswith("1 done")

    lines = _status(sched_paths)
    assert [line.split()[0] for line in lines[2:-2]] == [second.job_id]
    assert lines[-2] == "1 done"
    assert lines[-1] == "2 job(s) of earlier runs not shown (1 done, 1 failed): `autoseg status --all` lists every run"
    lines = _status(sched_paths, "--all")
    assert lines[0].split()[:3] == ["run", "job", "state"]
    rows = [line.split()[:3] for line in lines[2:5]]
    assert rows == [["1", first[0].job_id, "done"], ["1", first[1].job_id, "failed"], ["2", second.job_id, "done"]]
    assert lines[5] == "2 done, 1 failed" and "not shown" not in "\n".join(lines)
    with StateStore.open(sched_paths, readonly=True) as store:
        assert {r.job_id: r.run_id for r in store.rows()} == {first[0].job_id: 1, first[1].job_id: 1,
                                                               second.job_id: 2}


def test_a_job_taken_again_moves_to_the_new_run(sched_paths) -> None:
    jobs = train_jobs(2)
    with StateStore.open(sched_paths) as store:
        store.register(jobs, run_id=store.new_run_id())
        store.register(jobs[1:], run_id=store.new_run_id())  # e.g. `train-all --folds 1` after `--folds 0,1`
        store.register(jobs[:1])  # no run given: the job keeps its run
        assert [(r.job_id, r.run_id) for r in store.rows()] == [(jobs[0].job_id, 1), (jobs[1].job_id, 2)]
    shown, hidden = latest_run(collect_status(sched_paths))
    assert [s.job_id for s in shown] == [jobs[1].job_id] and [s.job_id for s in hidden] == [jobs[0].job_id]


def test_a_store_from_before_run_numbers_is_read_and_migrated(sched_paths) -> None:
    (old,), (new,) = train_jobs(1), train_jobs(1, config="2d")
    db_path(sched_paths).parent.mkdir(parents=True)
    with sqlite3.connect(db_path(sched_paths)) as conn:  # the first table layout: no message, no run_id
        conn.execute("CREATE TABLE jobs (job_id TEXT PRIMARY KEY, spec TEXT NOT NULL, state TEXT NOT NULL, "
                     "attempt INTEGER NOT NULL DEFAULT 0, gpu TEXT, cpus INTEGER, executor TEXT, external_id TEXT, "
                     "host TEXT, started_at REAL, ended_at REAL, exit_code INTEGER, log_path TEXT, "
                     "updated_at REAL NOT NULL)")
        conn.execute("INSERT INTO jobs (job_id, spec, state, attempt, updated_at) VALUES (?, ?, 'done', 1, 1.0)",
                     (old.job_id, json.dumps(record_to_dict(old))))
    assert [(s.job_id, s.run_id) for s in collect_status(sched_paths)] == [(old.job_id, None)]  # read-only
    assert latest_run(collect_status(sched_paths))[1] == []  # unnumbered jobs alone are one run
    with StateStore.open(sched_paths) as store:  # write access adds the column
        store.register([new], run_id=store.new_run_id())
    lines = _status(sched_paths)
    assert [line.split()[0] for line in lines[2:-2]] == [new.job_id]
    assert lines[-1].startswith("1 job(s) of earlier runs not shown (1 done)")
