"""Worker processes that die with their parent and never hold its locks.

A SIGKILLed parent (the OOM killer, Slurm's hard kill) runs no cleanup, so the kernel has to do
it: `die_with_parent` asks Linux for SIGKILL when the parent goes (``prctl(PR_SET_PDEATHSIG)``),
and `fork_private` makes a forked child close its copy of a lock's file descriptor, since a
child sharing the open file description would keep an ``flock`` alive after the parent died.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1
"""Linux prctl option: the signal this process gets when the thread that started it exits."""

_FORK_PRIVATE_FDS: set[int] = set()
"""File descriptors that a child forked from this process closes first thing (`fork_private`)."""


def load_libc() -> ctypes.CDLL | None:
    """The C library, for prctl (Linux); None where it is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    return libc if hasattr(libc, "prctl") else None


def set_parent_death_signal(sig: int) -> bool:
    """Have the kernel send ``sig`` to this process when its parent dies; False where unsupported (not Linux)."""
    libc = load_libc()
    return libc is not None and libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def die_with_parent(parent_pid: int) -> None:
    """Run first in a worker: SIGKILL it when ``parent_pid`` dies, and now if that already happened.

    The kernel signals when the *thread* that started the worker exits, not the process, so
    pools and loaders must be started from a thread that outlives them (the main thread in the
    CLI). The parent-pid check closes the race of a parent that died before the prctl.
    """
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


def spawn_pool(max_workers: int) -> ProcessPoolExecutor:
    """A process pool of spawned workers (the parent may hold threads that make fork unsafe) that die with us.

    Its workers start from the thread that submits work; submit from the main thread.
    """
    return ProcessPoolExecutor(max_workers=max_workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=die_with_parent, initargs=(os.getpid(),))


@contextlib.contextmanager
def fork_private(fd: int) -> Iterator[None]:
    """While inside, a child forked from this process (``os.fork``, multiprocessing's fork) closes ``fd``.

    Exec'd children never see it: Python opens fds non-inheritable and subprocess closes the rest.
    Closing a copy does not release the parent's ``flock``; only the parent's own unlock or death does.
    """
    _FORK_PRIVATE_FDS.add(fd)
    try:
        yield
    finally:
        _FORK_PRIVATE_FDS.discard(fd)


def _close_fork_private_fds() -> None:
    for fd in tuple(_FORK_PRIVATE_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _FORK_PRIVATE_FDS.clear()


os.register_at_fork(after_in_child=_close_fork_private_fds)
