"""One ``train-all`` per results root: a `PidLock` on ``results/.autoseg/train-all.lock``.

The lock file holds the owner's pid and host, so a refused second run says who holds it. The
kernel drops a flock when its process dies (even by SIGKILL), so a crashed run never leaves a
stale lock behind (`autoseg.common.locks`).
"""

from __future__ import annotations

from pathlib import Path

from autoseg.common.errors import AutosegError
from autoseg.common.locks import PidLock, holder_alive
from autoseg.common.paths import Paths

LOCK_NAME = "train-all.lock"


class SchedulerBusyError(AutosegError):
    """Another scheduler holds the lock of this results root."""


def lock_path(paths: Paths) -> Path:
    return paths.scheduler_dir() / LOCK_NAME


class RunLock(PidLock):
    """Exclusive, non-blocking lock on a results root; use as a context manager."""

    def __init__(self, paths: Paths) -> None:
        root = str(paths.results).replace("{", "{{").replace("}", "}}")
        super().__init__(lock_path(paths), f"another autoseg train-all ({{holder}}) is running on {root}",
                         error=SchedulerBusyError, with_host=True)
        self.paths = paths


def scheduler_alive(paths: Paths) -> bool:
    """Whether a ``train-all`` holds this results root now, judged without touching the lock.

    A scheduler killed by SIGKILL leaves its pid in the lock file; that pid no longer running on
    this host means nobody is driving the jobs it marked running. A holder on another host
    cannot be checked from here and counts as alive. Taking the flock to test it could make a
    scheduler starting at that instant refuse to run, so the pid is checked instead.
    """
    return holder_alive(lock_path(paths))
