"""Checkpoints under faults: a kill between two writes, a kill mid-write, broken and hostile files.

The files are written by the real code (a tiny phantom trained through the CLI, or `fit` on
synthetic batches); a "kill" is an exception raised where the process would have died.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import autoseg.train.checkpoint as checkpoint_module
import autoseg.train.loop as loop_module
from autoseg.cli import cli
from autoseg.common.errors import AutosegError
from autoseg.common.paths import Paths, TrainingId
from autoseg.dataset.phantom import PhantomRecipe, make_phantom_dataset
from autoseg.train.checkpoint import (
    BEST,
    FINAL,
    LATEST,
    PREVIOUS,
    CheckpointUnreadable,
    load_checkpoint,
    load_latest,
    remove_stale_temp_files,
)
from autoseg.train.config import TrainerConfig
from autoseg.train.loop import fit
from tests.train.conftest import cpu_runtime, make_setup

DATASET = "Dataset999_Phantom"
TID = TrainingId(DATASET, "3d_fullres", 0)
TINY = ["epochs=2", "iterations_per_epoch=2", "val_iterations=1", "batch_size=2", "num_workers=0",
        "save_every=1", "final_validation=off"]


class Killed(BaseException):
    """Stands for SIGKILL: nothing after the raise runs, nothing catches it."""


def _kill_at(monkeypatch: pytest.MonkeyPatch, should_die) -> list[tuple[str, int]]:
    """Make every checkpoint write call ``should_die(name, epoch, writes_so_far)`` first; True = killed."""
    writes: list[tuple[str, int]] = []
    real = checkpoint_module.save_checkpoint

    def save(path, ckpt):  # type: ignore[no-untyped-def]
        if should_die(Path(path).name, ckpt.epoch, writes):
            raise Killed(f"killed before writing {Path(path).name} of epoch {ckpt.epoch}")
        writes.append((Path(path).name, ckpt.epoch))
        return real(path, ckpt)

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", save)  # save_latest's
    monkeypatch.setattr(loop_module, "save_checkpoint", save)
    return writes


def _scripted_dice(monkeypatch: pytest.MonkeyPatch, values: list[float]) -> None:
    """Validation returns these mean pseudo-Dice values, one per call (so the best epoch is known)."""
    calls = iter(values)

    def validate(model, setup, rt):  # type: ignore[no-untyped-def]
        d = next(calls)
        return 1.0 - d, [d, d]

    monkeypatch.setattr(loop_module, "_validate", validate)


# (a) best before latest ---------------------------------------------------------------------

def test_a_kill_between_the_best_and_latest_writes_leaves_best_pt_consistent(tmp_path, monkeypatch) -> None:
    cfg = TrainerConfig(epochs=4, iterations_per_epoch=1, val_iterations=1, ema_alpha=0.0, save_every=1)
    # epoch 2 (the second) sets a new best (0.5) and the process dies between its two checkpoint writes
    _scripted_dice(monkeypatch, [0.2, 0.5, 0.3, 0.1, 0.1])
    with pytest.MonkeyPatch.context() as mp, pytest.raises(Killed):
        writes = _kill_at(mp, lambda name, epoch, done: epoch == 2 and any(e == 2 for _, e in done))
        fit(make_setup(tmp_path, cfg), cpu_runtime())
    latest = load_checkpoint(tmp_path / LATEST)
    assert (latest.epoch, latest.best_ema_pseudo_dice) == (1, 0.2)
    # the resumed run redoes epoch 2 (now 0.3: better than latest's 0.2, worse than best.pt's 0.5)
    result = fit(make_setup(tmp_path, cfg), cpu_runtime(), resume=latest)
    best = load_checkpoint(tmp_path / BEST)
    final = load_checkpoint(tmp_path / FINAL)
    assert best.best_ema_pseudo_dice == result.best_ema_pseudo_dice == final.best_ema_pseudo_dice == 0.5
    assert best.epoch == 2  # the 0.5 model was kept, not overwritten by the 0.3 one
    assert writes[-1] == (BEST, 2)  # best went first; latest of epoch 2 was never written
    assert not (tmp_path / PREVIOUS).exists()  # a finished run needs no fallback


def test_resume_judges_new_bests_against_what_best_pt_holds(tmp_path, monkeypatch) -> None:
    """save_every > 1: best.pt (epoch 3) is newer than latest (epoch 2) when the run dies."""
    cfg = TrainerConfig(epochs=5, iterations_per_epoch=1, val_iterations=1, ema_alpha=0.0, save_every=2)
    _scripted_dice(monkeypatch, [0.1, 0.2, 0.6, 0.3, 0.4, 0.4, 0.4])
    with pytest.MonkeyPatch.context() as mp, pytest.raises(Killed):
        _kill_at(mp, lambda name, epoch, done: epoch == 4)
        fit(make_setup(tmp_path, cfg), cpu_runtime())
    latest = load_checkpoint(tmp_path / LATEST)
    assert (latest.epoch, latest.best_ema_pseudo_dice, load_checkpoint(tmp_path / BEST).epoch) == (2, 0.2, 3)
    result = fit(make_setup(tmp_path, cfg), cpu_runtime(), resume=latest)  # redone epochs: 0.3, 0.4, 0.4
    best = load_checkpoint(tmp_path / BEST)
    assert (best.epoch, best.best_ema_pseudo_dice, result.best_ema_pseudo_dice) == (3, 0.6, 0.6)


# (b) stale temp files ------------------------------------------------------------------------

def _die_while_saving(fold_dir: Path, ckpt_file: Path) -> None:
    """A real process, SIGKILLed halfway through `save_checkpoint` (its temp file stays behind)."""
    script = textwrap.dedent(f"""
        import os, signal, torch
        from autoseg.train.checkpoint import load_checkpoint, save_checkpoint
        ckpt = load_checkpoint({str(ckpt_file)!r})
        real = torch.save
        def half(obj, f):
            f.write(b"PK" * 1000); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
        torch.save = half
        save_checkpoint({str(fold_dir / LATEST)!r}, ckpt)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr


def test_stale_temp_files_of_killed_writers_are_removed_only_when_ours(tmp_path) -> None:
    cfg = TrainerConfig(epochs=1, iterations_per_epoch=1, val_iterations=1)
    fit(make_setup(tmp_path, cfg), cpu_runtime())
    _die_while_saving(tmp_path, tmp_path / FINAL)
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(f".{LATEST}.") and p.name.endswith(".tmp")]
    assert len(stale) == 1 and stale[0].stat().st_size == 2000
    others = [tmp_path / ".plans.json.abc.tmp", tmp_path / "notes.tmp", tmp_path / ".checkpoint_latest.pt.txt"]
    for p in others:
        p.write_text("keep", encoding="utf-8")
    assert remove_stale_temp_files(tmp_path) == stale
    assert not stale[0].exists() and all(p.read_text(encoding="utf-8") == "keep" for p in others)
    load_checkpoint(tmp_path / LATEST)  # the real files are untouched


# (c) + (d) through the CLI, on a tiny phantom trained for real -------------------------------

def _cli(paths: Paths, *args: str):
    roots = ["--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed), "--results", str(paths.results)]
    return CliRunner().invoke(cli, [*roots, *args])


def _train(paths: Paths, *args: str):
    return _cli(paths, "train", "999", "3d_fullres", "0", "--quiet", "--device", "cpu",
                *[a for kv in TINY for a in ("--set", kv)], *args)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    """A phantom fold trained for its 2 epochs and killed just before writing checkpoint_final.pt."""
    paths = Paths.under(tmp_path_factory.mktemp("faults"))
    make_phantom_dataset(paths.raw, PhantomRecipe(num_training=5, num_test=0, shape=(8, 24, 24), shape_jitter=0))
    for step in ("plan", "preprocess"):
        assert _cli(paths, step, "999", "--configs", "3d_fullres").exit_code == 0
    with pytest.MonkeyPatch.context() as mp, pytest.raises(Killed):
        _kill_at(mp, lambda name, epoch, done: name == FINAL)
        _train(paths)
    fold_dir = paths.training_dir(TID)
    assert {LATEST, PREVIOUS, BEST} <= {p.name for p in fold_dir.iterdir()} and not (fold_dir / FINAL).exists()
    return paths


@pytest.fixture
def run(interrupted: Paths, tmp_path: Path) -> Paths:
    """A private copy of the interrupted run's results (raw and preprocessed data are shared)."""
    paths = Paths(raw=interrupted.raw, preprocessed=interrupted.preprocessed, results=tmp_path / "results")
    shutil.copytree(interrupted.results, paths.results)
    return paths


def _one_error_line(result, file: Path, *words: str) -> str:
    """Exit 2, and stderr is exactly one ``error: <file>: ...`` line (no traceback, no torch essay)."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {file}: "), result.stderr
    assert "Traceback" not in result.output and "weights_only" not in result.output, result.output
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def test_continue_falls_back_to_the_previous_latest_when_latest_is_truncated(run, caplog) -> None:
    fold_dir = run.training_dir(TID)
    latest = fold_dir / LATEST
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    result = _train(run, "--continue")
    assert result.exit_code == 0, result.output
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(str(latest) in w and str(fold_dir / PREVIOUS) in w and "truncated" in w for w in warned), warned
    final = load_checkpoint(fold_dir / FINAL)
    assert final.epoch == 2 and [r["epoch"] for r in final.history] == [0, 1]  # epoch 1 redone from prev
    assert load_checkpoint(latest).epoch == 2 and not (fold_dir / PREVIOUS).exists()


def test_continue_with_no_good_checkpoint_is_one_line_naming_the_file(run) -> None:
    fold_dir = run.training_dir(TID)
    (fold_dir / LATEST).write_bytes(b"garbage")
    (fold_dir / PREVIOUS).write_bytes(b"")
    line = _one_error_line(_train(run, "--continue"), fold_dir / LATEST, "--force", PREVIOUS)
    assert "not a torch checkpoint" in line and "truncated" in line  # latest's problem, then prev's
    (fold_dir / PREVIOUS).unlink()
    _one_error_line(_train(run, "--continue"), fold_dir / LATEST, "--force", f"no {PREVIOUS}")


def test_continue_removes_the_temp_file_of_a_killed_checkpoint_write(run) -> None:
    fold_dir = run.training_dir(TID)
    _die_while_saving(fold_dir, fold_dir / LATEST)
    stale = [p for p in fold_dir.iterdir() if p.name.endswith(".tmp")]
    assert len(stale) == 1
    assert _train(run, "--continue").exit_code == 0
    assert not stale[0].exists() and (fold_dir / FINAL).is_file()


def test_predict_names_the_unreadable_file_and_the_other_checkpoints(run, tmp_path) -> None:
    fold_dir = run.training_dir(TID)
    shutil.copyfile(fold_dir / LATEST, fold_dir / FINAL)
    (fold_dir / FINAL).write_bytes((fold_dir / FINAL).read_bytes()[:5000])
    args = ["predict", "-d", "999", "-c", "3d_fullres", "-f", "0", "-i", str(run.raw / DATASET / "imagesTr"),
            "-o", str(tmp_path / "out"), "--device", "cpu"]
    _one_error_line(_cli(run, *args), fold_dir / FINAL, "truncated", "try --checkpoint best or --checkpoint latest")
    torch.save({"weights": torch.zeros(2)}, fold_dir / BEST)  # a torch file, but not ours
    _one_error_line(_cli(run, *args, "--checkpoint", "best"), fold_dir / BEST, "not an autoseg checkpoint",
                    "--checkpoint final or --checkpoint latest")


# (d) hostile pickles ---------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return os.system, (f"touch {self.marker}",)


def _hostile_files(folder: Path, marker: Path) -> dict[str, bytes]:
    """The same payload as a torch zip checkpoint, a legacy torch file and a bare pickle."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "autoseg.checkpoint", "model_state": _Payload(marker)}, folder / "zip.pt")
    torch.save({"x": _Payload(marker)}, folder / "legacy.pt", _use_new_zipfile_serialization=False)
    (folder / "bare.pt").write_bytes(pickle.dumps(_Payload(marker)))
    return {p.stem: p.read_bytes() for p in folder.iterdir()}


def test_the_payload_is_live_when_unpickled_unsafely(tmp_path) -> None:
    """Guard against a vacuous test: loading these files without weights_only does run the payload."""
    files = _hostile_files(tmp_path / "h", tmp_path / "marker")
    pickle.loads(files["bare"])
    assert (tmp_path / "marker").exists()
    (tmp_path / "marker").unlink()
    torch.load(tmp_path / "h" / "zip.pt", weights_only=False)
    assert (tmp_path / "marker").exists()


def test_hostile_pickles_run_nothing_on_any_loading_path(run, tmp_path, caplog) -> None:
    marker = tmp_path / "PWNED"
    files = _hostile_files(tmp_path / "hostile", marker)
    fold_dir = run.training_dir(TID)
    good = {n: (fold_dir / n).read_bytes() for n in (LATEST, PREVIOUS, BEST)}
    predict = ["predict", "-d", "999", "-c", "3d_fullres", "-f", "0", "-i", str(run.raw / DATASET / "imagesTr"),
               "-o", str(tmp_path / "out"), "--device", "cpu"]
    for kind, payload in files.items():
        for n, data in good.items():
            (fold_dir / n).write_bytes(data)
        # load_checkpoint itself
        (tmp_path / "c.pt").write_bytes(payload)
        with pytest.raises(CheckpointUnreadable) as err:
            load_checkpoint(tmp_path / "c.pt")
        assert "\n" not in str(err.value) and str(err.value).startswith(f"{tmp_path / 'c.pt'}: ")
        # train --continue: a hostile latest and prev
        (fold_dir / LATEST).write_bytes(payload)
        (fold_dir / PREVIOUS).write_bytes(payload)
        _one_error_line(_train(run, "--continue"), fold_dir / LATEST, "--force")
        # train --continue on a "finished" fold whose checkpoint_final.pt is hostile
        (fold_dir / FINAL).write_bytes(payload)
        _one_error_line(_train(run, "--continue"), fold_dir / FINAL, "--force")
        # train --validation-only
        _one_error_line(_cli(run, "train", "999", "3d_fullres", "0", "--validation-only", "--device", "cpu"),
                        fold_dir / FINAL, "--force")
        # predict, every --checkpoint choice
        for choice, name in (("final", FINAL), ("latest", LATEST), ("best", BEST)):
            (fold_dir / name).write_bytes(payload)
            _one_error_line(_cli(run, *predict, "--checkpoint", choice), fold_dir / name)
        (fold_dir / FINAL).unlink()
        assert not marker.exists(), kind
    # the best.pt read on resume: a hostile best is refused with a warning, and training goes on
    for n, data in good.items():
        (fold_dir / n).write_bytes(data)
    (fold_dir / LATEST).write_bytes(good[PREVIOUS])  # resume at epoch 1, so epoch 2 is redone
    (fold_dir / BEST).write_bytes(files["zip"])
    assert _train(run, "--continue").exit_code == 0
    assert any(str(fold_dir / BEST) in r.getMessage() and "refused" in r.getMessage() for r in caplog.records)
    assert not marker.exists() and load_checkpoint(fold_dir / BEST).epoch == 2  # rewritten by the redone epoch


# (c) the messages themselves --------------------------------------------------------------------

def test_load_errors_are_one_line_with_the_callers_hint(tmp_path) -> None:
    cfg = TrainerConfig(epochs=1, iterations_per_epoch=1, val_iterations=1)
    fit(make_setup(tmp_path, cfg), cpu_runtime())
    data = (tmp_path / FINAL).read_bytes()
    cases = {"empty": (b"", "truncated"), "half": (data[: len(data) // 2], "truncated"),
             "garbage": (b"\x00garbage" * 10, "not a torch checkpoint"),
             "json": (b'{"format": "autoseg.checkpoint"}', "not a torch checkpoint")}
    cases["early"] = (data[:5000], "truncated")
    for name, (content, problem) in cases.items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(content)
        with pytest.raises(CheckpointUnreadable) as err:
            load_checkpoint(path, hint="try something else")
        text = str(err.value)
        assert "\n" not in text and text.startswith(f"{path}: ") and problem in text, text
        assert text.endswith("; try something else") and len(text) < 250 + len(str(path)), text
    with pytest.raises(AutosegError, match="checkpoint not found; try"):
        load_checkpoint(tmp_path / "missing.pt", hint="try something else")


def test_load_latest_prefers_latest_and_falls_back_once(tmp_path, caplog) -> None:
    cfg = TrainerConfig(epochs=3, iterations_per_epoch=1, val_iterations=1)
    with pytest.MonkeyPatch.context() as mp:
        _kill_at(mp, lambda name, epoch, done: name == FINAL)
        with pytest.raises(Killed):
            fit(make_setup(tmp_path, cfg), cpu_runtime())
    assert load_latest(tmp_path).epoch == 3 and not caplog.records
    (tmp_path / LATEST).write_bytes(b"")
    assert load_latest(tmp_path).epoch == 2
    assert load_checkpoint(tmp_path / LATEST).epoch == 2  # the good previous one replaced the broken one
    assert [r.levelname for r in caplog.records] == ["WARNING"]
