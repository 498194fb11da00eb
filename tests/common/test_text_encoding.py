"""No dependence on the locale's encoding (issue 24).

The failing environment: UTF-8 mode turned off (``PYTHONUTF8=0``) and ``LC_ALL=C``, which also
stops C-locale coercion; Python's preferred encoding is then ASCII (``ANSI_X3.4-1968``) and
torch.compile dies reading its UTF-8 kernel templates.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from autoseg.common.encoding import is_utf8, preferred_encoding
from autoseg.common.paths import Paths
from autoseg.schedule.executors import job_environment
from autoseg.schedule.jobs import JobPaths

ASCII_ENV = {"PYTHONUTF8": "0", "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0"}

PROBE = """
import locale, sys
import torch
from autoseg.common.errors import AutosegError
from autoseg.train.config import TrainerConfig
from autoseg.train.loop import resolve_runtime
print("ENCODING", locale.getpreferredencoding(False), flush=True)
try:
    rt = resolve_runtime(TrainerConfig(compile=sys.argv[1]), "cpu")
    if rt.compile:
        torch.compile(torch.nn.Linear(2, 2))  # inductor reads its templates here
except AutosegError as e:
    print("AUTOSEG", e)
    sys.exit(3)
print("COMPILED" if rt.compile else "EAGER")
"""


def _probe(extra_env: dict[str, str], compile_mode: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **extra_env, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", PROBE, compile_mode], env=env, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=300)


def test_compile_under_an_ascii_locale_says_so_in_one_line():
    r = _probe(ASCII_ENV, "true")
    assert "ENCODING ANSI_X3.4-1968" in r.stdout  # the environment really is the failing one
    assert "UnicodeDecodeError" not in r.stderr, r.stderr[-2000:]
    assert r.returncode == 3, r.stdout + r.stderr[-2000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("AUTOSEG")]
    assert len(line) == 1 and "PYTHONUTF8=1" in line[0] and "ANSI_X3.4-1968" in line[0]


def test_ascii_locale_without_compile_still_trains():
    r = _probe(ASCII_ENV, "false")
    assert r.returncode == 0 and "EAGER" in r.stdout, r.stdout + r.stderr[-2000:]


def test_scheduler_children_run_in_utf8_mode(tmp_path: Path):
    paths = Paths(tmp_path / "raw", tmp_path / "pre", tmp_path / "results")
    env = job_environment(paths, None, 1, JobPaths(tmp_path / "job"), "j", 0)
    assert env["PYTHONUTF8"] == "1"
    child = {**os.environ, **ASCII_ENV, **{"PYTHONUTF8": env["PYTHONUTF8"]}}
    out = subprocess.run([sys.executable, "-c", "import sys; print(sys.flags.utf8_mode)"], env=child,
                         capture_output=True, encoding="utf-8", check=True).stdout
    assert out.strip() == "1"


def test_preferred_encoding_helpers():
    assert is_utf8("UTF8") and is_utf8("utf-8") and not is_utf8("ANSI_X3.4-1968") and not is_utf8("nonsense")
    assert preferred_encoding()  # whatever this process runs with
