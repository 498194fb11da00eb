"""Processes read from /proc, for the fault tests that SIGKILL real `autoseg` processes.

A pid alone can be reused by the kernel, so a process is named by (pid, start time): a
survivor is a pid that is still alive *with the same start time* as before the kill.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest


def start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/<pid>/stat); None when gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return None if fields[0] in ("Z", "X") else fields[19]


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of ``pid`` -> its start time (so a reused pid is not mistaken for it)."""
    found: dict[int, str] = {}
    todo = children(pid)
    while todo:
        kid = todo.pop()
        started = start_time(kid)
        if started is not None and kid not in found:
            found[kid] = started
            todo += children(kid)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def survivors(procs: dict[int, str], within_s: float) -> dict[int, str]:
    """The processes of ``procs`` still alive after ``within_s`` seconds -> their command lines.

    Survivors are SIGKILLed before returning, so that a failing test leaks nothing.
    """
    deadline = time.monotonic() + within_s
    alive = procs
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = {p: t for p, t in alive.items() if start_time(p) == t}
    named = {pid: cmdline(pid) for pid in alive}
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    return named


def kill9_when(proc: subprocess.Popen, ready: Callable[[], bool], what: str, timeout_s: float = 180.0,
               poll_s: float = 0.002) -> dict[int, str]:
    """SIGKILL ``proc`` the first time ``ready()`` holds; returns the descendants it had at that instant.

    The process is first SIGSTOPped so that it cannot move on (finish the write the test waited
    for, start a worker) while its descendants are read; then it gets SIGKILL. Fails the test
    when ``proc`` ends on its own first.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            os.kill(proc.pid, signal.SIGSTOP)
            kids = descendants(proc.pid)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return kids
        if proc.poll() is not None:
            pytest.fail(f"{what} ended (rc {proc.returncode}) before its kill moment")
        time.sleep(poll_s)
    proc.kill()
    proc.wait()
    pytest.fail(f"{what}: kill moment not reached within {timeout_s:.0f} s")
