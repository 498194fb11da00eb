"""`PidLock`: one holder at a time, a refusal naming the holder and the file, records a reader understands."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from autoseg.common.errors import AutosegError, ConfigError
from autoseg.common.locks import LockHolder, PidLock, holder_alive, read_holder


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_held_lock_refuses_a_second_holder_naming_the_holder_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / ".lock"
    with PidLock(path, "another process ({holder}) is doing it"):
        assert path.read_text(encoding="utf-8") == f"{os.getpid()}\n"
        assert read_holder(path) == LockHolder(pid=os.getpid()) and holder_alive(path)
        with pytest.raises(ConfigError) as info:
            PidLock(path, "another process ({holder}) is doing it", error=ConfigError).acquire()
    assert str(info.value) == (f"{path}: another process (pid {os.getpid()}) is doing it; "
                               "wait for it to finish or stop it first")
    assert path.read_text(encoding="utf-8") == "" and not holder_alive(path)  # released: no holder recorded
    with PidLock(path, "busy"):  # free again
        pass


def test_a_results_root_lock_records_pid_host_and_start(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    with PidLock(path, "x", with_host=True):
        record = json.loads(path.read_text(encoding="utf-8"))
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        holder = read_holder(path)
        assert holder.describe() == f"pid {os.getpid()} on host {socket.gethostname()}"


def test_a_stale_record_is_told_from_a_live_holder(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    path.write_text(f"{_dead_pid()}\n", encoding="utf-8")  # what a SIGKILLed holder leaves
    assert not holder_alive(path)
    path.write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere"}), encoding="utf-8")
    assert holder_alive(path)  # another host's pid cannot be checked from here
    for junk in ("", "not a pid", "[1]", '{"pid": true}'):
        path.write_text(junk, encoding="utf-8")
        assert read_holder(path) == LockHolder() and not holder_alive(path)
    assert LockHolder().describe() == "pid unknown"


def test_the_lock_is_not_taken_over_while_held(tmp_path: Path) -> None:
    lock = PidLock(tmp_path / ".lock", "busy").acquire()
    try:
        with pytest.raises(AutosegError, match="busy; wait"):
            PidLock(tmp_path / ".lock", "busy").acquire()
    finally:
        lock.release()
    lock.release()  # a second release is a no-op
