"""One ``train-all`` per results root: an ``fcntl.flock`` on ``results/.autoseg/train-all.lock``.

The lock file holds the owner's pid and host, so a refused second run says who holds it. The
kernel drops a flock when its process dies (even by SIGKILL), so a crashed run never leaves a
stale lock behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from autoseg.common.errors import AutosegError
from autoseg.common.paths import Paths

LOCK_NAME = "train-all.lock"


class SchedulerBusyError(AutosegError):
    """Another scheduler holds the lock of this results root."""


def lock_path(paths: Paths) -> Path:
    return paths.scheduler_dir() / LOCK_NAME


class RunLock:
    """Exclusive, non-blocking lock on a results root; use as a context manager."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.path = lock_path(paths)
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise `SchedulerBusyError` naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(self.path)
            os.close(fd)
            who = f"pid {holder.get('pid', '?')}" + (f" on host {holder['host']}" if holder.get("host") else "")
            raise SchedulerBusyError(
                f"another autoseg train-all ({who}) is running on {self.paths.results}; "
                "wait for it, or stop it first", self.path) from None
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode() + b"\n", 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_holder(path: Path) -> dict[str, object]:
    """The pid/host written by the lock's holder ({} when unreadable)."""
    try:
        return dict(json.loads(Path(path).read_text(encoding="utf-8") or "{}"))
    except (OSError, ValueError):
        return {}


def scheduler_alive(paths: Paths) -> bool:
    """Whether a ``train-all`` holds this results root now, judged without touching the lock.

    A scheduler killed by SIGKILL leaves its pid in the lock file; that pid no longer running on
    this host means nobody is driving the jobs it marked running. A holder on another host
    cannot be checked from here and counts as alive. Taking the flock to test it could make a
    scheduler starting at that instant refuse to run, so the pid is checked instead.
    """
    holder = read_holder(lock_path(paths))
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    if holder.get("host") not in (None, socket.gethostname()):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
