"""A preprocessing run locks its data folder and removes the temp files of killed runs there."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from autoseg.common.errors import AutosegError
from autoseg.common.paths import Paths
from autoseg.planning.planner import PlanRequest, plan_and_save
from autoseg.preprocess import list_preprocessed_cases, preprocess_dataset
from tests.preprocess.conftest import own_roots

DATASET = "Dataset999_Phantom"


@pytest.fixture
def planned(phantom_small: Paths, tmp_path: Path) -> Paths:
    paths = own_roots(phantom_small, tmp_path)
    plan_and_save(paths, DATASET, PlanRequest(progress_bar=False, configs=("3d_fullres",)))
    return paths


def test_a_rerun_removes_the_temp_files_of_a_killed_run(planned: Paths) -> None:
    folder = planned.preprocessed_data(DATASET, "3d_fullres")
    folder.mkdir(parents=True)
    # what a kill -9 mid-write leaves: a case array and a case json half written under temp names
    stale = [folder / ".phantom_003.npy.k2x9_aqe.tmp", folder / ".phantom_005.json.0abcdefg.tmp"]
    for f in stale:
        f.write_bytes(b"\x93NUMPY half")
    kept = folder / ".notes.txt"  # not a temp file of ours
    kept.write_text("mine")

    preprocess_dataset(planned, DATASET, ["3d_fullres"])

    assert not [f.name for f in stale if f.exists()]
    assert kept.read_text() == "mine"
    assert len(list_preprocessed_cases(folder)) == 8


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from autoseg.preprocess.dataset import _folder_lock

    with _folder_lock(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(60)
""")


def test_a_second_run_into_the_same_folder_is_refused_with_the_holders_pid(planned: Paths) -> None:
    folder = planned.preprocessed_data(DATASET, "3d_fullres")
    folder.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(AutosegError, match=f"another process \\(pid {holder.pid}\\) is preprocessing"):
            preprocess_dataset(planned, DATASET, ["3d_fullres"])
        assert list_preprocessed_cases(folder) == []
    finally:
        holder.kill()
        holder.wait()
    preprocess_dataset(planned, DATASET, ["3d_fullres"])  # the lock went with its (killed) holder
    assert len(list_preprocessed_cases(folder)) == 8
