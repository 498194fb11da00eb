"""End to end with real `autoseg plan/preprocess/train` children: SIGKILL train-all, run again, all done."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from autoseg.common.jsonio import load_record
from autoseg.common.paths import Paths
from autoseg.schedule.jobs import JobPaths, JobRecord, JobState
from autoseg.schedule.store import StateStore
from tests.schedule.conftest import DATASET as DS
from tests.schedule.conftest import TINY_TRAINING, epochs_logged, fold_dir, single_thread_env, train_all_command


@pytest.mark.slow
def test_killed_train_all_resumes_real_trainings(phantom_small: Paths, tmp_path: Path) -> None:
    paths = Paths(phantom_small.raw, tmp_path / "pre", tmp_path / "res")
    cmd = train_all_command(paths, "--configs", "3d_fullres", "--folds", "0", "--gpus", "0,1,2,3", "--quiet",
                            "--set", "epochs=2", *TINY_TRAINING)
    env = single_thread_env()
    folds = {0: fold_dir(paths, "3d_fullres", 0)}
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not any(len(epochs_logged(d)) == 1 for d in folds.values()):
        time.sleep(0.1)
    cut = next(k for k, d in folds.items() if len(epochs_logged(d)) == 1 and not (d / "checkpoint_final.pt").exists())
    before = epochs_logged(folds[cut])[0]
    first.send_signal(signal.SIGKILL)
    first.wait()
    cut_job = f"train:{DS}:3d_fullres:default:fold_{cut}"
    with StateStore.open(paths) as store:
        pid = int(store.get(cut_job).external_id)
    for _ in range(600):  # the orphan got SIGINT from the parent-death signal: it checkpoints and exits
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.1)

    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    with StateStore.open(paths) as store:
        rows = {r.job_id: r for r in store.rows()}
    assert {r.state for r in rows.values()} == {JobState.DONE} and len(rows) == 3
    for name in (f"plan:{DS}", f"preprocess:{DS}"):  # finished before the kill: not rerun
        assert JobPaths.of(paths, name).log.read_text(encoding="utf-8").count("=== autoseg scheduler") == 1
    logged = epochs_logged(folds[cut])
    assert [e["epoch"] for e in logged] == [0, 1] and logged[0] == before  # continued, not restarted
    job_log = JobPaths.of(paths, cut_job).log.read_text(encoding="utf-8")
    assert job_log.count("starting from scratch") == 1 and "attempt 2 started" in job_log
    records = [load_record(JobPaths.of(paths, j).record, JobRecord) for j in rows if j.startswith("train:")]
    for rec in records:
        assert rec.env["CUDA_VISIBLE_DEVICES"] == rec.gpu and rec.gpu in {"0", "1", "2", "3"}
        assert (folds[rec.spec.fold] / "checkpoint_final.pt").is_file()
