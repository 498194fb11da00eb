"""An orphaned training takes repeated stop signals as one: it finishes its checkpoint, not aborts.

The scheduler's children get SIGINT when it dies (``PR_SET_PDEATHSIG``), and Linux sends it
again each time the orphan is handed from one of the dead scheduler's threads to the next; a
new scheduler's clean-up sends one more. `stop_on_signals` must not read those as a person's
second Ctrl-C. A process whose parent is alive still aborts on the second signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import sys, time
    from autoseg.pipeline.isolation import stop_on_signals
    with stop_on_signals() as stop:
        print("ready", flush=True)
        while not stop.is_set():
            time.sleep(0.01)
        time.sleep(1.5)  # "saving the checkpoint": more signals arrive meanwhile
    print("saved", flush=True)
""")

PARENT = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=open(sys.argv[2], "w"),
                             start_new_session=True)
    print(child.pid, flush=True)
    time.sleep(600)
""")


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[1])


def _wait_for(path: Path, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(encoding="utf-8"):
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never said {text!r}: {path.read_text(encoding='utf-8') if path.exists() else ''}")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_an_orphan_ignores_repeated_stop_signals_and_finishes(tmp_path: Path) -> None:
    out = tmp_path / "child.txt"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(out)], stdout=subprocess.PIPE,
                              text=True, encoding="utf-8", env=_env())
    child = int(parent.stdout.readline())
    _wait_for(out, "ready")
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 30
    while _ppid(child) == parent.pid and time.monotonic() < deadline:
        time.sleep(0.02)
    for _ in range(3):  # the parent-death signal and its echoes
        os.kill(child, signal.SIGINT)
        time.sleep(0.2)
    _wait_for(out, "saved")
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "Traceback" not in out.read_text(encoding="utf-8")


def test_a_second_signal_still_aborts_while_the_parent_lives(tmp_path: Path) -> None:
    out = tmp_path / "child.txt"
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=out.open("w", encoding="utf-8"),
                             stderr=subprocess.PIPE, text=True, encoding="utf-8", env=_env())
    _wait_for(out, "ready")
    child.send_signal(signal.SIGINT)
    time.sleep(0.3)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode != 0 and "KeyboardInterrupt" in err
    assert "saved" not in out.read_text(encoding="utf-8")
