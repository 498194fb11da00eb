"""The scheduler's state store: one SQLite database under ``results/.autoseg/state.sqlite``.

SQLite (stdlib) in WAL mode with short transactions and a busy timeout, so ``autoseg status``
can read it from another terminal while ``train-all`` writes, and a re-run knows which jobs are
done, which were interrupted and how many attempts each has used.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import record_from_dict, record_to_dict
from autoseg.common.paths import Paths
from autoseg.schedule.jobs import JobSpec, JobState

DB_NAME = "state.sqlite"
BUSY_TIMEOUT_MS = 10_000
"""How long a writer waits for another's lock before failing (status reads never block writers in WAL)."""

_COLUMNS = ("job_id", "spec", "state", "attempt", "gpu", "cpus", "executor", "external_id", "host",
            "started_at", "ended_at", "exit_code", "log_path", "message", "run_id", "workers", "updated_at")
ADDED_COLUMNS = {"message": "TEXT", "run_id": "INTEGER", "workers": "INTEGER"}
"""Columns newer than the first table layout: added to an older database on first write access,
read as NULL from one opened read-only (``autoseg status`` of an older root)."""
_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    gpu TEXT, cpus INTEGER, executor TEXT, external_id TEXT, host TEXT,
    started_at REAL, ended_at REAL, exit_code INTEGER, log_path TEXT, message TEXT, run_id INTEGER,
    workers INTEGER, updated_at REAL NOT NULL
)"""


@dataclass(frozen=True)
class JobRow:
    """One job as the store knows it."""

    spec: JobSpec
    state: JobState
    attempt: int
    gpu: str | None
    cpus: int | None
    executor: str | None
    external_id: str | None
    host: str | None
    started_at: float | None
    ended_at: float | None
    exit_code: int | None
    log_path: str | None
    updated_at: float
    message: str | None = None
    """Why the job failed, when it said so: the ``error: ...`` line(s) of a user error (exit 2)."""
    run_id: int | None = None
    """The last scheduler run (``train-all`` or ``sweep`` invocation) that took this job; None in
    stores written before runs were numbered."""
    workers: int | None = None
    """Data-loader workers (trainings) or processes of its last start; ``cpus`` is its core count."""

    @property
    def job_id(self) -> str:
        return self.spec.job_id


def db_path(paths: Paths) -> Path:
    return paths.scheduler_dir() / DB_NAME


class StateStore:
    """Read/write access to the job table; one connection per process, opened per use."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if readonly:
            if not self.path.exists():
                raise AutosegError("no scheduler state yet (run `autoseg train-all` first)", self.path)
            uri = f"file:{self.path}?mode=ro"
            self._conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
                                         isolation_level=None, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                                         isolation_level=None, check_same_thread=False)
            try:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
                self._conn.execute(_SCHEMA_SQL)
            except sqlite3.OperationalError as e:
                self._conn.close()
                raise _disk_full_error(e, self.path) or e
        self._conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        present = {r[1] for r in self._conn.execute("PRAGMA table_info(jobs)").fetchall()}
        if not readonly:
            for name, sql_type in ADDED_COLUMNS.items():
                if name not in present:
                    self._conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {sql_type}")
                    present.add(name)
        self._select = ", ".join(c if c in present or c not in ADDED_COLUMNS else f"NULL AS {c}" for c in _COLUMNS)

    @classmethod
    def open(cls, paths: Paths, readonly: bool = False) -> "StateStore":
        """The store of a results root (created on first write access)."""
        return cls(db_path(paths), readonly=readonly)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writes
    def register(self, specs: Iterable[JobSpec], run_id: int | None = None) -> None:
        """Add new jobs as PENDING; known jobs keep their state and attempts, their spec is refreshed
        (and their run, when ``run_id`` is given: the job now belongs to that run)."""
        now = time.time()
        with self._transaction() as c:
            for spec in specs:
                spec_json = json.dumps(record_to_dict(spec))
                c.execute("INSERT INTO jobs (job_id, spec, state, attempt, run_id, updated_at) "
                          "VALUES (?, ?, ?, 0, ?, ?) ON CONFLICT(job_id) DO UPDATE SET spec = excluded.spec, "
                          "run_id = COALESCE(excluded.run_id, run_id)",
                          (spec.job_id, spec_json, JobState.PENDING.value, run_id, now))

    def new_run_id(self) -> int:
        """The number of the next run: one above every run recorded (the caller holds the `RunLock`)."""
        return int(self._conn.execute("SELECT COALESCE(MAX(run_id), 0) + 1 FROM jobs").fetchone()[0])

    def update(self, job_id: str, **fields: Any) -> None:
        """Set some columns of one job (state as a JobState)."""
        unknown = set(fields) - set(_COLUMNS[2:-1])
        if unknown:
            raise ValueError(f"unknown store columns {sorted(unknown)}")
        values = {k: (v.value if isinstance(v, JobState) else v) for k, v in fields.items()}
        values["updated_at"] = time.time()
        assignments = ", ".join(f"{k} = ?" for k in values)
        with self._transaction() as c:
            cur = c.execute(f"UPDATE jobs SET {assignments} WHERE job_id = ?", (*values.values(), job_id))
            if cur.rowcount != 1:
                raise KeyError(job_id)

    # ------------------------------------------------------------------ reads
    def get(self, job_id: str) -> JobRow | None:
        cur = self._conn.execute(f"SELECT {self._select} FROM jobs WHERE job_id = ?", (job_id,))
        row = cur.fetchone()
        return None if row is None else self._row(row)

    def rows(self) -> list[JobRow]:
        """Every job, in insertion order."""
        cur = self._conn.execute(f"SELECT {self._select} FROM jobs ORDER BY rowid")
        return [self._row(r) for r in cur.fetchall()]

    # ------------------------------------------------------------------ helpers
    def _row(self, row: tuple[Any, ...]) -> JobRow:
        data = dict(zip(_COLUMNS, row))
        spec = record_from_dict(JobSpec, json.loads(data.pop("spec")), where=f"{self.path}:{data['job_id']}")
        data.pop("job_id")
        data["state"] = JobState(data["state"])
        return JobRow(spec=spec, **data)

    def _transaction(self) -> "_Tx":
        return _Tx(self._conn, self.path)


def _disk_full_error(err: sqlite3.Error, path: Path) -> OSError | None:
    """SQLite's "database or disk is full" as the OSError every other write raises (ENOSPC, naming the file)."""
    if getattr(err, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL:
        return None
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    full.__cause__ = err
    return full


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): writers serialize, readers never wait.

    A full disk (SQLITE_FULL, from a statement or the COMMIT) is raised as an ENOSPC `OSError`."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn, self.path = conn, path

    def __enter__(self) -> sqlite3.Connection:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise _disk_full_error(e, self.path) or e
        return self.conn

    def __exit__(self, exc_type: object, exc: BaseException | None, *rest: object) -> None:
        if exc_type is not None:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error) and (full := _disk_full_error(exc, self.path)) is not None:
                raise full
            return
        try:
            self.conn.execute("COMMIT")
        except sqlite3.OperationalError as e:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise _disk_full_error(e, self.path) or e
