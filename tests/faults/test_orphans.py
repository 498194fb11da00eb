"""A SIGKILLed `autoseg train` / `autoseg preprocess -j 2` leaves no worker behind and no fold lock held.

Real processes and the real kernel: the kernel's parent-death signal has to kill the workers
(nothing of the dead parent runs), and the fold's ``flock`` has to go with the parent even
though its forked workers shared the lock's file descriptor.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from autoseg.cli import cli
from autoseg.common.errors import AutosegError
from autoseg.common.paths import Paths, TrainingId
from autoseg.dataset.phantom import PhantomRecipe, make_phantom_dataset
from autoseg.pipeline.folds import fold_lock
from autoseg.preprocess import list_preprocessed_cases
from tests.faults.procs_util import cmdline, descendants, start_time, survivors

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")

DATASET = "Dataset999_Phantom"
NUM_CASES = 6
TINY = ("epochs=2", "iterations_per_epoch=2", "val_iterations=1", "batch_size=2", "final_validation=off")
GONE_WITHIN_S = 5.0


# ---------------------------------------------------------------------- processes, read from /proc

def _kill_when(proc: subprocess.Popen[str], ready, what: str, timeout_s: float = 120.0) -> dict[int, str]:
    """SIGKILL ``proc`` once ``ready(descendants)``; returns the descendants it had just before."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        kids = descendants(proc.pid)
        if ready(kids):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return {**kids, **descendants(proc.pid)}  # none: a dead process has no children left
        if proc.poll() is not None:
            pytest.fail(f"{what} ended (rc {proc.returncode}) before its workers were seen: {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no {what} workers within {timeout_s:.0f} s")


# ---------------------------------------------------------------------- a tiny planned phantom

def _roots(paths: Paths) -> list[str]:
    return ["--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed), "--results", str(paths.results)]


def _autoseg(paths: Paths, *args: str) -> list[str]:
    return [sys.executable, "-m", "autoseg", *_roots(paths), *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def planned(tmp_path: Path) -> Paths:
    paths = Paths.under(tmp_path)
    make_phantom_dataset(paths.raw, PhantomRecipe(num_training=NUM_CASES, num_test=0, shape=(8, 24, 24),
                                                  shape_jitter=0))
    result = CliRunner().invoke(cli, [*_roots(paths), "plan", "999", "--configs", "3d_fullres"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return paths


def _preprocess(paths: Paths) -> None:
    result = CliRunner().invoke(cli, [*_roots(paths), "preprocess", "999", "--configs", "3d_fullres"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output


def _train_command(paths: Paths, *args: str) -> list[str]:
    sets = [a for kv in TINY for a in ("--set", kv)]
    return _autoseg(paths, "train", "999", "3d_fullres", "0", "--device", "cpu", "--quiet",
                    "--num-workers", "2", *sets, *args)


# ---------------------------------------------------------------------- tests

@pytest.mark.slow  # two `autoseg train` processes: ~35 s on 2 shared cores, most of it importing torch
def test_killed_trainer_leaves_no_worker_and_continue_trains(planned: Paths) -> None:
    _preprocess(planned)
    train = subprocess.Popen(_train_command(planned), env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    workers = _kill_when(train, lambda kids: len(kids) >= 2, "train")
    assert not survivors(workers, GONE_WITHIN_S)

    again = subprocess.run(_train_command(planned, "--continue"), env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is training this fold" not in again.stderr
    fold = planned.training_dir(TrainingId(DATASET, "3d_fullres", 0))
    assert (fold / "checkpoint_final.pt").is_file()


def test_killed_preprocess_leaves_no_pool_worker_and_reruns(planned: Paths) -> None:
    prep = subprocess.Popen(_autoseg(planned, "preprocess", "999", "--configs", "3d_fullres", "-j", "2"),
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pool_workers = lambda kids: sum("spawn_main" in cmdline(k) for k in kids) >= 2  # noqa: E731
    children = _kill_when(prep, pool_workers, "preprocess")
    assert not survivors(children, GONE_WITHIN_S)

    _preprocess(planned)
    folder = planned.preprocessed_data(DATASET, "3d_fullres")
    assert len(list_preprocessed_cases(folder)) == NUM_CASES


HOLDER = textwrap.dedent("""
    import multiprocessing, sys, time
    from pathlib import Path
    from autoseg.pipeline.folds import fold_lock

    with fold_lock(Path(sys.argv[1])):
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))  # a loader worker
        child.start()
        print(child.pid, flush=True)
        time.sleep(60)
""")


def test_a_forked_worker_does_not_hold_the_fold_lock(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    started = start_time(child)
    try:
        with pytest.raises(AutosegError, match=f"pid {holder.pid}"):  # the live holder has it
            with fold_lock(tmp_path):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert start_time(child) == started  # the forked child outlives it (no parent-death signal here)
        with fold_lock(tmp_path):  # ... yet the lock went with the holder
            assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    finally:
        if start_time(child) == started:
            os.kill(child, signal.SIGKILL)


def test_a_worker_whose_parent_died_before_it_got_going_exits() -> None:
    # die_with_parent is told a parent it no longer has: what a worker sees when the parent died before its prctl
    code = "from autoseg.common.procs import die_with_parent; die_with_parent(1); print('still here')"
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert ran.returncode == -signal.SIGKILL and "still here" not in ran.stdout
