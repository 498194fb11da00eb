"""A machine without the real Hippocampus cases says so at the end of the run, not only in -rs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import HIPPOCAMPUS_ENV

REPO = Path(__file__).resolve().parents[1]


def test_missing_real_data_is_named_in_the_summary(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_msd_folder"
    env = {**os.environ, HIPPOCAMPUS_ENV: str(missing)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/data/test_hippocampus.py"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert " skipped" in run.stdout and " passed" not in run.stdout
    warning = [line for line in run.stdout.splitlines() if line.startswith("WARNING: real-data tests skipped")]
    assert len(warning) == 1 and str(missing) in warning[0] and HIPPOCAMPUS_ENV in warning[0]
