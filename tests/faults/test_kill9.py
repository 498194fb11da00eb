"""kill -9 at seeded moments of `autoseg train`, `preprocess` and `train-all`, then the same command again.

Real ``python -m autoseg`` processes on a tiny phantom dataset, killed with SIGKILL (nothing of
theirs runs afterwards). After each kill the test checks, from /proc and the files:

- no orphan: every descendant the killed process had at the kill is gone (parent-death signals);
- at most one epoch lost: the checkpoint ``--continue`` resumes from is at most one epoch behind
  the epochs logged before the kill, and the rerun's ``training_log.jsonl`` keeps those lines
  byte for byte (it continued there rather than starting over);
- finished results untouched: files complete before the kill (a finished ``checkpoint_final.pt``,
  a finished fold's ``validation/summary.json``, complete preprocessed cases) are byte-identical
  after the rerun, and complete preprocessed cases are not even rewritten;
- nothing partial passes for complete: the rerun ends with every output complete and loadable.

The moments come from ``random.Random(KILL_SEED)``: times after the start, times after an epoch
was logged, and the events "a checkpoint temp file exists" (a checkpoint write in progress),
"validation/ exists without summary.json" (the final validation) and "a preprocessed case has
files but no json" (a case half written). Each moment is its own test id, and each test prints
what the process was doing when it was killed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from autoseg.cli import cli
from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import load_record
from autoseg.common.paths import Paths, TrainingId
from autoseg.dataset.phantom import PhantomRecipe, make_phantom_dataset
from autoseg.evaluate.summary import SUMMARY_FILE, Summary
from autoseg.preprocess import case_files, list_preprocessed_cases, load_preprocessed_case
from autoseg.schedule.jobs import JobState
from autoseg.schedule.store import StateStore
from autoseg.splits import fold_cases, load_splits
from autoseg.train import checkpoint as ckpt_files
from autoseg.train.checkpoint import load_checkpoint
from autoseg.train.loop import LOG_FILE
from tests.faults.procs_util import descendants, kill9_when, survivors

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals and /proc are Linux only"),
    pytest.mark.slow,  # each case starts a real `autoseg` process (~6 s of imports on 2 shared cores)
]

KILL_SEED = 20261204
DATASET = "Dataset999_Phantom"
CONFIG = "3d_fullres"
NUM_CASES = 6
EPOCHS = 4
TINY = (f"epochs={EPOCHS}", "iterations_per_epoch=2", "val_iterations=1", "batch_size=2", "save_every=1",
        "final_validation=no_mirroring")
GONE_WITHIN_S = 5.0
"""How long the descendants of a SIGKILLed process may take to die (parent-death signal, then exit)."""
CHECKPOINT_TEMP_RE = re.compile(r"^\.checkpoint_.*\.tmp$")


# ---------------------------------------------------------------------- the seeded kill moments

@dataclass(frozen=True)
class Moment:
    """When to SIGKILL: ``delay_s`` after the anchor (the start, or ``after_epochs`` epochs logged),
    or at an event (``checkpoint_write``: the first checkpoint temp file after ``after_epochs``
    epochs; ``validation``: validation/ exists without summary.json; ``partial_case``: a
    preprocessed case has files but no json yet, after ``after_cases`` complete ones)."""

    anchor: str
    after_epochs: int = 0
    delay_s: float = 0.0
    after_cases: int = 0

    @property
    def name(self) -> str:
        return {"start": f"{self.delay_s:.2f}s-after-start",
                "epoch": f"{self.delay_s:.2f}s-after-{self.after_epochs}-epochs",
                "checkpoint_write": f"checkpoint-write-after-{self.after_epochs}-epochs",
                "validation": "during-final-validation",
                "cases": f"{self.delay_s:.3f}s-after-{self.after_cases}-cases",
                "partial_case": f"half-written-case-after-{self.after_cases}-cases"}[self.anchor]


def _moments() -> tuple[list[Moment], list[Moment], list[Moment]]:
    rng = random.Random(KILL_SEED)
    train = [Moment("start", delay_s=round(rng.uniform(0.5, 3.0), 2))  # a fast machine trains in ~5 s
             for _ in range(2)]
    train += [Moment("epoch", after_epochs=rng.randrange(EPOCHS), delay_s=round(rng.uniform(0.0, 0.8), 2))
              for _ in range(3)]
    train += [Moment("checkpoint_write", after_epochs=rng.randrange(EPOCHS)), Moment("validation")]
    prep = [Moment("partial_case", after_cases=rng.randint(1, NUM_CASES - 2)),
            Moment("cases", after_cases=rng.randint(1, NUM_CASES - 2), delay_s=round(rng.uniform(0.0, 0.02), 3))]
    train_all = [Moment("epoch", after_epochs=rng.randrange(2), delay_s=round(rng.uniform(0.0, 0.8), 2))]
    return train, prep, train_all


TRAIN_MOMENTS, PREPROCESS_MOMENTS, TRAIN_ALL_MOMENTS = _moments()

def _params(moments: list[Moment]) -> list:
    """One test id per moment."""
    return [pytest.param(m, id=f"{i}-{m.name}") for i, m in enumerate(moments)]


# ---------------------------------------------------------------------- data, commands, files

def _roots(paths: Paths) -> list[str]:
    return ["--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed), "--results", str(paths.results)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _start(paths: Paths, args: list[str], log: Path) -> subprocess.Popen:
    """``python -m autoseg ARGS`` as a real process, its output in ``log``."""
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "autoseg", *_roots(paths), *args], env=_env(),
                                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _rerun(paths: Paths, args: list[str]) -> None:
    """The same command again, to the end (in this process: the killed one was the real one)."""
    result = CliRunner().invoke(cli, [*_roots(paths), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output[-3000:]


def _sets(extra: tuple[str, ...] = ()) -> list[str]:
    return [a for kv in (*TINY, *extra) for a in ("--set", kv)]


def _train_args(fold: int = 0) -> list[str]:
    return ["train", "999", CONFIG, str(fold), "--device", "cpu", "--quiet", "--num-workers", "1", *_sets()]


def _log_lines(fold_dir: Path) -> list[bytes]:
    """The complete lines of training_log.jsonl (a line being written is left out)."""
    try:
        data = (fold_dir / LOG_FILE).read_bytes()
    except OSError:
        return []
    return data.split(b"\n")[:-1]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _resume_epoch(fold_dir: Path) -> int:
    """The epoch `--continue` goes on from: final, else latest, else the previous latest, else 0."""
    for name in (ckpt_files.FINAL, ckpt_files.LATEST, ckpt_files.PREVIOUS):
        try:
            return load_checkpoint(fold_dir / name).epoch
        except AutosegError:
            continue
    return 0


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    """One tiny planned and preprocessed phantom, shared (read only) by every case of the module."""
    paths = Paths.under(tmp_path_factory.mktemp("kill9"))
    make_phantom_dataset(paths.raw, PhantomRecipe(num_training=NUM_CASES, num_test=0, shape=(8, 24, 24),
                                                  shape_jitter=0))
    for args in (["plan", "999", "--configs", CONFIG], ["preprocess", "999", "--configs", CONFIG]):
        _rerun(paths, args)
    return paths


def _fold(paths: Paths, fold: int = 0) -> Path:
    return paths.training_dir(TrainingId(DATASET, CONFIG, fold))


def _check_finished_fold(paths: Paths, fold: int = 0) -> list[dict]:
    """A finished fold: final checkpoint loads at the last epoch, its history is the log, validation complete."""
    fold_dir = _fold(paths, fold)
    final = load_checkpoint(fold_dir / ckpt_files.FINAL)
    logged = [json.loads(line) for line in _log_lines(fold_dir)]
    assert final.epoch == len(logged) and [r["epoch"] for r in logged] == list(range(final.epoch))
    assert final.history == logged
    summary = load_record(fold_dir / "validation" / SUMMARY_FILE, Summary)
    assert sorted(c.case_id for c in summary.cases) == sorted(fold_cases(load_splits(paths, DATASET), fold)[1])
    assert all((fold_dir / "validation" / Path(c.prediction).name).is_file() for c in summary.cases)
    leftovers = [p.name for p in fold_dir.iterdir()
                 if CHECKPOINT_TEMP_RE.match(p.name) or p.name.startswith(".validation.")]
    assert not leftovers, f"left behind: {leftovers}"
    assert not (fold_dir / ckpt_files.PREVIOUS).exists()
    return logged


class StalePredictionPath(AssertionError):
    """summary.json names a prediction file that is not there."""


def _check_prediction_paths(fold_dir: Path) -> None:
    summary = load_record(fold_dir / "validation" / SUMMARY_FILE, Summary)
    missing = [c.prediction for c in summary.cases if not Path(c.prediction).is_file()]
    if missing:
        raise StalePredictionPath(f"summary.json names missing predictions: {missing}")


# ---------------------------------------------------------------------- train

def _train_ready(moment: Moment, proc: subprocess.Popen, fold_dir: Path) -> Callable[[], bool]:
    t0 = time.monotonic()
    anchored: list[float] = []

    def at_anchor() -> bool:
        if moment.anchor == "start":
            return True
        if len(_log_lines(fold_dir)) < moment.after_epochs:
            return False
        return moment.after_epochs > 0 or bool(descendants(proc.pid))  # epoch 0 runs once a loader worker is up

    def ready() -> bool:
        if moment.anchor == "validation":
            return (fold_dir / "validation").is_dir() and not (fold_dir / "validation" / SUMMARY_FILE).exists()
        if moment.anchor == "checkpoint_write":
            return len(_log_lines(fold_dir)) >= moment.after_epochs and fold_dir.is_dir() and any(
                CHECKPOINT_TEMP_RE.match(n) for n in _listdir(fold_dir))
        if not anchored and at_anchor():
            anchored.append(t0 if moment.anchor == "start" else time.monotonic())
        return bool(anchored) and time.monotonic() >= anchored[0] + moment.delay_s

    return ready


def _listdir(folder: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(folder)]
    except OSError:
        return []


def _phase(fold_dir: Path) -> str:
    names = _listdir(fold_dir)
    parts = [f"{len(_log_lines(fold_dir))} epoch(s) logged"]
    parts += [f"writing {n}" for n in names if CHECKPOINT_TEMP_RE.match(n)]
    if (fold_dir / ckpt_files.FINAL).exists():
        parts.append("final checkpoint written")
    if (fold_dir / "validation").is_dir():
        parts.append(f"validation/ holds {len(_listdir(fold_dir / 'validation'))} file(s)")
    return ", ".join(parts)


@pytest.mark.parametrize("moment", _params(TRAIN_MOMENTS))
def test_train_killed_resumes_with_continue(moment: Moment, prepared: Paths, tmp_path: Path) -> None:
    paths = Paths(prepared.raw, prepared.preprocessed, tmp_path / "results")
    fold_dir = _fold(paths)
    proc = _start(paths, _train_args(), tmp_path / "train.log")
    kids = kill9_when(proc, _train_ready(moment, proc, fold_dir), "train", poll_s=0.001)
    print(f"kill -9 of train (seed {KILL_SEED}) at {moment.name}: {_phase(fold_dir)}; "
          f"{len(kids)} descendant(s) {sorted(kids)}")

    assert not survivors(kids, GONE_WITHIN_S), "descendants of the killed train outlived it"
    logged_before = _log_lines(fold_dir)
    resume_epoch = _resume_epoch(fold_dir)
    assert len(logged_before) - 1 <= resume_epoch <= len(logged_before), "more than one epoch lost"
    finished = {n: _digest(fold_dir / n) for n in (ckpt_files.FINAL, "trainer_config.json", "plans.json",
                                                   "dataset.json") if (fold_dir / n).is_file()}
    if moment.anchor == "validation":
        assert ckpt_files.FINAL in finished, "killed during validation, yet no final checkpoint"

    _rerun(paths, [*_train_args(), "--continue"])
    logged = _log_lines(fold_dir)
    assert logged[:resume_epoch] == logged_before[:resume_epoch], "the rerun did not continue at the checkpoint"
    assert len(_check_finished_fold(paths)) == EPOCHS
    assert {n: _digest(fold_dir / n) for n in finished} == finished, "a finished file changed"
    print(f"rerun continued at epoch {resume_epoch} ({len(logged_before) - resume_epoch} logged epoch(s) redone)")
    _check_prediction_paths(fold_dir)


# ---------------------------------------------------------------------- preprocess

def _case_state(folder: Path) -> tuple[list[str], list[str]]:
    """(complete cases, cases with some file but no json: half written) of a data folder."""
    names = _listdir(folder)
    complete = list_preprocessed_cases(folder)
    started = {n.lstrip(".").split(".")[0].removesuffix("_seg").removesuffix("_fg") for n in names
               if n.startswith((".phantom_", "phantom_"))}
    return complete, sorted(started - set(complete) - {n[:-5] for n in names if n.endswith(".json")})


@pytest.mark.parametrize("moment", _params(PREPROCESS_MOMENTS))
def test_preprocess_killed_reruns_to_the_same_files(moment: Moment, prepared: Paths, tmp_path: Path) -> None:
    paths = Paths(prepared.raw, tmp_path / "preprocessed", tmp_path / "results")
    planned = paths.preprocessed_dataset(DATASET)
    planned.mkdir(parents=True)
    for name in ("plans.json", "fingerprint.json"):
        shutil.copy2(prepared.preprocessed_dataset(DATASET) / name, planned / name)
    folder, reference = paths.preprocessed_data(DATASET, CONFIG), prepared.preprocessed_data(DATASET, CONFIG)
    workers = 1 if moment.anchor == "partial_case" else 2
    args = ["preprocess", "999", "--configs", CONFIG, "-j", str(workers)]
    proc = _start(paths, args, tmp_path / "preprocess.log")
    anchored: list[float] = []

    def ready() -> bool:
        complete, partial = _case_state(folder)
        if moment.anchor == "partial_case":
            return len(complete) >= moment.after_cases and bool(partial)
        if not anchored and len(complete) >= moment.after_cases:
            anchored.append(time.monotonic())
        return bool(anchored) and time.monotonic() >= anchored[0] + moment.delay_s

    kids = kill9_when(proc, ready, "preprocess", poll_s=0.0005)
    complete, partial = _case_state(folder)
    print(f"kill -9 of preprocess -j {workers} (seed {KILL_SEED}) at {moment.name}: {len(complete)} complete "
          f"case(s), half written: {partial}; {len(kids)} descendant(s) {sorted(kids)}")
    assert not survivors(kids, GONE_WITHIN_S), "pool workers of the killed preprocess outlived it"
    if moment.anchor == "partial_case":
        assert partial, "no half-written case at the kill"
    before = {c: {k: (p.stat().st_ino, p.stat().st_mtime_ns, _digest(p)) for k, p in case_files(folder, c).items()}
              for c in complete}

    _rerun(paths, args)
    assert list_preprocessed_cases(folder) == list_preprocessed_cases(reference)
    assert len(list_preprocessed_cases(folder)) == NUM_CASES
    for case in list_preprocessed_cases(folder):
        loaded = load_preprocessed_case(folder, case, mmap=False)
        assert loaded.data.shape[1:] == loaded.seg.shape[1:]
        for kind, path in case_files(folder, case).items():  # half-written cases redone, to the same bytes
            assert path.read_bytes() == case_files(reference, case)[kind].read_bytes(), f"{path.name} differs"
    after = {c: {k: (p.stat().st_ino, p.stat().st_mtime_ns, _digest(p)) for k, p in case_files(folder, c).items()}
             for c in complete}
    assert after == before, "a case complete before the kill was rewritten"
    assert not [n for n in _listdir(folder) if n.endswith(".tmp")], "the killed run's temp files are still there"


# ---------------------------------------------------------------------- train-all

@pytest.mark.parametrize("moment", _params(TRAIN_ALL_MOMENTS))
def test_train_all_killed_children_die_and_rerun_finishes(moment: Moment, prepared: Paths, tmp_path: Path) -> None:
    paths = Paths(prepared.raw, tmp_path / "preprocessed", tmp_path / "results")
    shutil.copytree(prepared.preprocessed, paths.preprocessed)  # planned and preprocessed: only trainings run
    data = paths.preprocessed_data(DATASET, CONFIG)
    inputs = {p.name: _digest(p) for p in sorted(data.iterdir())}
    epochs = 2
    args = ["train-all", DATASET, "--configs", CONFIG, "--folds", "0,1", "-j", "1", "--quiet",
            *_sets((f"epochs={epochs}",))]  # -j 1: fold 0 trains to the end, then fold 1
    first, second = _fold(paths, 0), _fold(paths, 1)
    proc = _start(paths, args, tmp_path / "train-all.log")
    anchored: list[float] = []

    def ready() -> bool:
        if not anchored and (second / "trainer_config.json").exists() \
                and len(_log_lines(second)) >= moment.after_epochs:
            anchored.append(time.monotonic())
        return bool(anchored) and time.monotonic() >= anchored[0] + moment.delay_s

    kids = kill9_when(proc, ready, "train-all", timeout_s=240, poll_s=0.005)
    print(f"kill -9 of train-all (seed {KILL_SEED}) at fold 1 {moment.name}: {_phase(second)}; "
          f"{len(kids)} descendant(s) {sorted(kids)}")
    # the trainer gets SIGINT from its parent-death signal: it saves a checkpoint, then exits
    assert not survivors(kids, 60.0), "children of the killed train-all outlived it"
    assert (first / ckpt_files.FINAL).is_file() and (first / "validation" / SUMMARY_FILE).is_file()
    done = {n: _digest(first / n) for n in (ckpt_files.FINAL, ckpt_files.BEST, LOG_FILE, f"validation/{SUMMARY_FILE}")}
    logged_before = _log_lines(second)
    resume_epoch = _resume_epoch(second)
    assert len(logged_before) - 1 <= resume_epoch <= len(logged_before), "more than one epoch lost"

    _rerun(paths, args)
    with StateStore.open(paths) as store:
        assert {r.job_id: r.state for r in store.rows()} == {
            f"train:{DATASET}:{CONFIG}:default:fold_{k}": JobState.DONE for k in (0, 1)}
    assert {n: _digest(first / n) for n in done} == done, "the finished fold changed"
    assert _log_lines(second)[:resume_epoch] == logged_before[:resume_epoch]
    assert len(_check_finished_fold(paths, 1)) == epochs and len(_check_finished_fold(paths, 0)) == epochs
    assert {p.name: _digest(p) for p in sorted(data.iterdir())} == inputs, "the preprocessed inputs changed"
    print(f"rerun continued fold 1 at epoch {resume_epoch}")
