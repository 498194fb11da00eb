"""`final_validation` (full / no_mirroring / off) and what `--continue` says about a changed `--set` on a
finished fold, on a tiny phantom through the CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

import autoseg.pipeline.validate as validate_module
from autoseg.cli import cli
from autoseg.common.paths import Paths, TrainingId
from autoseg.dataset.phantom import PhantomRecipe, make_phantom_dataset

DATASET = "Dataset999_Phantom"
TINY = ["epochs=1", "iterations_per_epoch=2", "val_iterations=1", "batch_size=2", "num_workers=0"]


def _run(paths: Paths, *args: str) -> str:
    roots = ["--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed), "--results", str(paths.results)]
    result = CliRunner().invoke(cli, [*roots, *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _train(paths: Paths, *args: str, sets: tuple[str, ...] = ()) -> str:
    return _run(paths, "train", "999", "3d_fullres", "0", "--quiet", "--device", "cpu",
                *[a for kv in (*TINY, *sets) for a in ("--set", kv)], *args)


@pytest.fixture
def planned(tmp_path: Path) -> Paths:
    paths = Paths.under(tmp_path)
    make_phantom_dataset(paths.raw, PhantomRecipe(num_training=5, num_test=0, shape=(8, 24, 24), shape_jitter=0))
    _run(paths, "plan", "999", "--configs", "3d_fullres")
    _run(paths, "preprocess", "999", "--configs", "3d_fullres")
    return paths


@pytest.fixture
def mirror_axes_used(monkeypatch) -> list:
    """The mirror axes of every final validation (the real one still runs)."""
    seen: list = []
    real = validate_module.run_validation

    def spy(net, plan, config, mirror_axes, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(tuple(mirror_axes))
        return real(net, plan, config, mirror_axes, *args, **kwargs)

    monkeypatch.setattr(validate_module, "run_validation", spy)
    return seen


def test_off_skips_the_validation_and_no_mirroring_validates_unmirrored(planned, mirror_axes_used, caplog) -> None:
    fold_dir = planned.training_dir(TrainingId(DATASET, "3d_fullres", 0))
    _train(planned, sets=("final_validation=off",))
    assert (fold_dir / "checkpoint_final.pt").is_file() and not (fold_dir / "validation").exists()
    assert mirror_axes_used == []
    # the finished fold keeps final_validation=off: a plain --continue has nothing to do, and warns of nothing
    with caplog.at_level(logging.WARNING):
        assert "already finished" in _train(planned, "--continue")
    assert "ignoring changed keys" not in caplog.text and mirror_axes_used == []
    # a changed --set on the finished fold is named, old -> new, with the way out
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert "already finished" in _train(planned, "--continue", sets=("epochs=5", "lr=0.003"))
    warning = [r.getMessage() for r in caplog.records if "ignoring changed keys" in r.getMessage()]
    assert len(warning) == 1 and "epochs 1 -> 5, lr 0.01 -> 0.003" in warning[0]
    assert "--force" in warning[0] and "--variant" in warning[0]
    # asking for a validation now runs it, without mirroring when told so
    _train(planned, "--continue", sets=("final_validation=no_mirroring",))
    assert mirror_axes_used == [()] and (fold_dir / "validation" / "summary.json").is_file()
    # the progress `autoseg status` reads for the validation's ETA ends at all cases done
    summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
    progress = json.loads((fold_dir / "validation" / "progress.json").read_text())
    assert progress["cases_done"] == progress["cases_total"] == len(summary["cases"]) > 0
    assert progress["updated_at"] >= progress["started_at"]


def test_full_validation_mirrors(planned, mirror_axes_used) -> None:
    _train(planned)
    assert len(mirror_axes_used) == 1 and mirror_axes_used[0] != ()


def test_train_help_names_the_quick_trial_keys() -> None:
    text = CliRunner().invoke(cli, ["train", "--help"]).output
    for key in ("iterations_per_epoch", "val_iterations", "batch_size", "final_validation", "no_mirroring"):
        assert key in text
