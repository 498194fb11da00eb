"""A full disk (ENOSPC) under the results or preprocessed root: one-line errors, nothing lost, a rerun resumes.

Each test mounts a small tmpfs (root only; skipped otherwise) where the command writes, fills
it with a filler file and runs the real CLI in a subprocess, as a user would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from autoseg.common.paths import Paths
from autoseg.dataset.phantom import PhantomRecipe, make_phantom_dataset
from autoseg.train import checkpoint as ckpt_files
from autoseg.train.checkpoint import load_checkpoint

DATASET = "Dataset999_Phantom"
TINY = ("--set", "iterations_per_epoch=2", "--set", "val_iterations=1", "--set", "batch_size=2",
        "--set", "final_validation=off")
"""An epoch of two steps and no final validation: a run of a few epochs takes seconds."""


@contextlib.contextmanager
def tmpfs(where: Path, size: str = "8m") -> Iterator[Path]:
    """A fresh tmpfs of ``size`` mounted at ``where`` for the block; always unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a disk that can be filled) needs root")
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {where}: {done.stderr.strip() or done.returncode}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(root: Path, leave_bytes: int = 0) -> Path:
    """Write a filler file on ``root``'s filesystem until only about ``leave_bytes`` are free."""
    st = os.statvfs(root)
    want = max(0, st.f_bavail * st.f_frsize - leave_bytes)
    filler = root / "filler.bin"
    chunk = b"\0" * (1 << 16)
    with open(filler, "wb") as f:
        with contextlib.suppress(OSError):
            while want > 0:
                want -= f.write(chunk[:min(len(chunk), want)])
            f.flush()
    return filler


def autoseg(paths: Paths, *args: str, **kwargs) -> list[str]:  # type: ignore[no-untyped-def]
    return [sys.executable, "-m", "autoseg", "--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed),
            "--results", str(paths.results), *args]


def run(paths: Paths, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(autoseg(paths, *args), capture_output=True, text=True, encoding="utf-8",
                          timeout=timeout, env=single_thread_env())


def single_thread_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "AUTOSEG_FAKE_GPUS": "1"}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    """A phantom dataset planned with a tiny network (checkpoints under 1 MB) and preprocessed."""
    root = tmp_path_factory.mktemp("full_disk")
    paths = Paths(root / "raw", root / "pre", root / "unused_results")
    make_phantom_dataset(paths.raw, PhantomRecipe(num_training=8, num_test=0, shape=(12, 40, 40), shape_jitter=4))
    for args in (("plan", DATASET, "--configs", "3d_fullres", "--set", "3d_fullres.features_per_stage=4,8,16,32"),
                 ("preprocess", DATASET)):
        done = run(paths, *args)
        assert done.returncode == 0, done.stderr[-2000:]
    return paths


def test_a_failed_atomic_write_keeps_the_old_file_and_names_it(tmp_path: Path) -> None:
    """torch.save hides ENOSPC in a RuntimeError ("unexpected pos"); the write re-raises it naming the file."""
    import errno

    import torch

    from autoseg.common.jsonio import atomic_write_with

    with tmpfs(tmp_path / "disk", size="1m") as disk:
        target = disk / "checkpoint_latest.pt"
        atomic_write_with(target, lambda f: torch.save({"w": torch.ones(1000)}, f))
        fill(disk, leave_bytes=64 * 1024)
        with pytest.raises(OSError) as caught:
            atomic_write_with(target, lambda f: torch.save({"w": torch.zeros(100_000)}, f))  # 400 kB
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
        assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(1000))
        assert sorted(p.name for p in disk.iterdir()) == ["checkpoint_latest.pt", "filler.bin"]


def fold_dir(paths: Paths) -> Path:
    return paths.results / DATASET / "3d_fullres" / "default" / "fold_0"


@pytest.mark.slow
def test_train_on_a_full_disk_fails_in_one_line_and_keeps_the_last_checkpoint(planned: Paths, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "results") as results:
        paths = Paths(planned.raw, planned.preprocessed, results)
        latest = fold_dir(paths) / ckpt_files.LATEST
        # a first run stopped by Ctrl-C once its first checkpoint is there, so --continue has one to keep
        first = subprocess.Popen(autoseg(paths, "train", DATASET, "3d_fullres", "0", "--set", "epochs=4", *TINY),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=single_thread_env())
        deadline = time.monotonic() + 120
        while not latest.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=120) == 130
        before = load_checkpoint(latest)
        assert before.epoch < 3  # the continued run writes checkpoint_latest.pt before its final one
        filler = fill(results, leave_bytes=latest.stat().st_size // 3)  # room for logs and plots, not a checkpoint

        full = run(paths, "train", DATASET, "3d_fullres", "0", "--continue")

        assert full.returncode == 2, full.stderr[-3000:]
        assert "Traceback" not in full.stderr, full.stderr[-3000:]
        [line] = error_lines(full.stderr)
        written = line.removeprefix("error: ").split(": ")[0]  # which checkpoint write ran out depends on the epoch
        assert Path(written).parent == fold_dir(paths) and Path(written).name.startswith("checkpoint_"), line
        assert line == f"error: {written}: no space left on device (disk full); free space and rerun with --continue"
        kept = load_checkpoint(latest)
        assert kept.epoch >= before.epoch and kept.history[:before.epoch] == before.history
        for name in (ckpt_files.BEST, ckpt_files.FINAL):  # whatever is there is whole
            if (fold_dir(paths) / name).exists():
                load_checkpoint(fold_dir(paths) / name)
        assert [p.name for p in fold_dir(paths).iterdir() if p.name.endswith(".tmp")] == []

        filler.unlink()
        again = run(paths, "train", DATASET, "3d_fullres", "0", "--continue")
        assert again.returncode == 0, again.stderr[-3000:]
        assert load_checkpoint(fold_dir(paths) / ckpt_files.FINAL).epoch == 4


@pytest.mark.slow
@pytest.mark.parametrize(("free_bytes", "stopped_as"), [(0, "failed"), (4096, "interrupted")],
                         ids=["log-header-fails", "record-fails-after-the-child-started"])
def test_train_all_stops_in_one_line_when_the_scheduler_runs_out_of_disk(planned: Paths, tmp_path: Path,
                                                                         free_bytes: int, stopped_as: str) -> None:
    """The scheduler's job folders on a full disk: with no room its job log cannot start (the job never
    starts); with one page the child starts and then its job.json cannot be written (the reported crash)."""
    from autoseg.schedule.store import StateStore

    paths = Paths(planned.raw, planned.preprocessed, tmp_path / "results")
    job = f"train:{DATASET}:3d_fullres:default:fold_0"
    train_all = ("train-all", DATASET, "--configs", "3d_fullres", "--folds", "0", "--gpus", "0", "--quiet",
                 "--set", "epochs=1", *TINY)
    with tmpfs(paths.scheduler_dir() / "jobs", size="1m") as jobs:
        filler = fill(jobs, leave_bytes=free_bytes)

        full = run(paths, *train_all)

        assert full.returncode == 2, full.stderr[-3000:]
        assert "Traceback" not in full.stderr, full.stderr[-3000:]
        [line] = error_lines(full.stderr)
        assert line.startswith(f"error: {jobs}/") and "no space left on device (disk full)" in line, line
        with StateStore.open(paths, readonly=True) as store:
            row = store.get(job)
        assert row is not None and row.state.value == stopped_as and "no space left on device" in (row.message or "")
        status = run(paths, "status")
        assert status.returncode == 0 and f"{job}  {stopped_as}" in status.stdout, status.stdout

        filler.unlink()
        again = run(paths, *train_all)
        assert again.returncode == 0, again.stderr[-3000:]
        with StateStore.open(paths, readonly=True) as store:
            assert store.get(job).state.value == "done"
        assert (fold_dir(paths) / ckpt_files.FINAL).is_file()


def test_preprocess_into_a_full_root_leaves_no_case_that_looks_complete(planned: Paths, tmp_path: Path) -> None:
    from autoseg.preprocess import list_preprocessed_cases

    with tmpfs(tmp_path / "pre", size="1m") as pre:
        paths = Paths(planned.raw, pre, tmp_path / "results")
        plans = planned.preprocessed / DATASET / "plans.json"
        (pre / DATASET).mkdir()
        (pre / DATASET / "plans.json").write_bytes(plans.read_bytes())
        filler = fill(pre, leave_bytes=128 * 1024)  # a case or two, not eight

        full = run(paths, "preprocess", DATASET)

        assert full.returncode == 2, full.stderr[-3000:]
        assert "Traceback" not in full.stderr, full.stderr[-3000:]
        [line] = error_lines(full.stderr)
        assert line.startswith(f"error: {pre / DATASET}") and "no space left on device (disk full)" in line, line
        folder = pre / DATASET / "3d_fullres"
        complete = list_preprocessed_cases(folder)
        assert len(complete) < 8 and not [p for p in folder.rglob("*.tmp")]

        filler.unlink()
        again = run(paths, "preprocess", DATASET)
        assert again.returncode == 0, again.stderr[-3000:]
        assert len(list_preprocessed_cases(folder)) == 8
        assert f"{8 - len(complete)} case(s) to preprocess, {len(complete)} already done" in again.stderr


def test_a_checkpoint_copy_onto_a_full_disk_names_the_file_and_leaves_no_temp(tmp_path: Path) -> None:
    """The prev/latest copy falls back to copyfile across filesystems; its ENOSPC named no file."""
    import errno

    from autoseg.train.checkpoint import _atomic_copy

    source = tmp_path / "checkpoint_latest.pt"
    source.write_bytes(b"x" * 400_000)
    with tmpfs(tmp_path / "disk", size="1m") as disk:
        dest = disk / "checkpoint_latest.prev.pt"
        fill(disk, leave_bytes=64 * 1024)
        with pytest.raises(OSError) as caught:
            _atomic_copy(source, dest)  # os.link fails across filesystems: the copy path
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(dest)
        assert sorted(p.name for p in disk.iterdir()) == ["filler.bin"]
