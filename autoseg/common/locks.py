"""One exclusive pid-file lock for every "only one process may do this here" rule.

Used for a fold dir while it trains (``fold_k/.lock``), a preprocessed data folder while a run
writes into it (``<data_identifier>/.lock``) and a results root while a ``train-all`` or a
sweep drives it (``results/.autoseg/train-all.lock``).

The lock is an ``fcntl.flock`` on the file. The kernel drops it when the holder dies, even by
SIGKILL, so a killed run never leaves a stale lock behind; what it may leave is its record in
the file (its pid, and its host where asked), which `holder_alive` tells from a live holder
without touching the lock. A refused process gets one `AutosegError` line naming the holder's
pid (and host) and the lock file.

The flock belongs to the open file description, which a forked child (a data-loader worker)
would share and keep alive after the holder died, so forked children close their copy at
once (`autoseg.common.procs.fork_private`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from autoseg.common.errors import AutosegError
from autoseg.common.procs import fork_private

WAIT_HINT = "wait for it to finish or stop it first"
"""What a refused process is told to do (appended to every refusal)."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or last held) a lock, as its record in the lock file says; fields None when unknown."""

    pid: int | None = None
    host: str | None = None
    since: float | None = None
    """Seconds since the epoch when the holder took the lock."""

    def describe(self) -> str:
        """``pid 123``, ``pid 123 on host node7``, or ``pid unknown``."""
        who = f"pid {self.pid if self.pid is not None else 'unknown'}"
        return who + (f" on host {self.host}" if self.host else "")


def read_holder(path: Path) -> LockHolder:
    """The holder recorded in a lock file: a plain pid line, or a JSON object with pid/host/since."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError:
        return LockHolder()
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return LockHolder()
    if isinstance(value, int) and not isinstance(value, bool):
        return LockHolder(pid=value)
    if not isinstance(value, dict):
        return LockHolder()
    pid, host, since = value.get("pid"), value.get("host"), value.get("since")
    return LockHolder(pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
                      host=host if isinstance(host, str) else None,
                      since=float(since) if isinstance(since, (int, float)) else None)


def holder_alive(path: Path) -> bool:
    """Whether the lock file names a holder that still runs, judged without touching the lock.

    A holder killed by SIGKILL leaves its pid in the file; that pid no longer running on this
    host means the lock is stale. A holder on another host cannot be checked from here and
    counts as alive. Taking the flock to test it could make a process starting at that instant
    refuse to run, so the pid is checked instead.
    """
    holder = read_holder(path)
    if holder.pid is None:
        return False
    if holder.host not in (None, socket.gethostname()):
        return True
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PidLock:
    """Exclusive, non-blocking ``flock`` on ``path`` with the holder's record inside; a context manager.

    ``busy`` is the refusal, with ``{holder}`` for the holder (``pid 123``), e.g.
    ``"another process ({holder}) is training this fold"``; ``error`` its `AutosegError` class.
    ``with_host`` records pid, host and start time as JSON (results roots, which several hosts
    may share) instead of a plain pid line.
    """

    def __init__(self, path: Path, busy: str, error: type[AutosegError] = AutosegError,
                 with_host: bool = False) -> None:
        self.path = Path(path)
        self.busy = busy
        self.error = error
        self.with_host = with_host
        self._fd: int | None = None
        self._owner: int | None = None
        self._private: contextlib.ExitStack | None = None

    def acquire(self) -> PidLock:
        """Take the lock or raise ``error`` naming the holder and the lock file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(self.path)
            os.close(fd)
            raise self.error(f"{self.busy.format(holder=holder.describe())}; {WAIT_HINT}", self.path) from None
        self._fd, self._owner = fd, os.getpid()
        self._private = contextlib.ExitStack()
        self._private.enter_context(fork_private(fd))
        with contextlib.suppress(OSError):  # the record is for messages only: a full disk must not stop us here
            os.ftruncate(fd, 0)
            os.pwrite(fd, self._record().encode() + b"\n", 0)
        return self

    def _record(self) -> str:
        if not self.with_host:
            return str(os.getpid())
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})

    def release(self) -> None:
        """Empty the record and drop the lock (a no-op when not held, or in a forked child)."""
        if self._fd is None or os.getpid() != self._owner:  # a forked child has no fd to unlock
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        if self._private is not None:
            self._private.close()
            self._private = None

    def __enter__(self) -> PidLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
