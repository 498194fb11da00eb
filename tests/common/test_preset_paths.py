"""Where a planner preset's plans and trainings live (`Paths.plans_file`, `TrainingId.plans`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoseg.common.errors import AutosegError
from autoseg.common.paths import Paths, TrainingId, split_config_dirname


def test_preset_plans_file_and_results_folder() -> None:
    paths = Paths.under(Path("/r"))
    assert paths.plans_file("Dataset004_H") == Path("/r/preprocessed/Dataset004_H/plans.json")
    assert paths.plans_file("Dataset004_H", "resenc-l") == Path("/r/preprocessed/Dataset004_H/plans_resenc-l.json")
    default = TrainingId("Dataset004_H", "3d_fullres", 0)
    preset = TrainingId("Dataset004_H", "3d_fullres", 0, plans="resenc-l")
    assert paths.training_dir(default) == Path("/r/results/Dataset004_H/3d_fullres/default/fold_0")
    assert paths.training_dir(preset) == Path("/r/results/Dataset004_H/resenc-l__3d_fullres/default/fold_0")
    assert str(TrainingId("Dataset004_H", "3d_fullres", 1, "v", 2, plans="resenc-m")) == \
        "Dataset004_H/resenc-m__3d_fullres/v/seed_2/fold_1"


def test_the_folder_name_is_accepted_as_a_configuration() -> None:
    tid = TrainingId("Dataset004_H", "resenc-l__3d_cascade_fullres", 0)
    assert (tid.config, tid.plans) == ("3d_cascade_fullres", "resenc-l")
    assert tid == TrainingId("Dataset004_H", "3d_cascade_fullres", 0, plans="resenc-l")
    assert TrainingId("Dataset004_H", "resenc-l__3d_fullres", 0, plans="resenc-l").plans == "resenc-l"
    with pytest.raises(AutosegError, match="names plans 'resenc-l', but 'resenc-m'"):
        TrainingId("Dataset004_H", "resenc-l__3d_fullres", 0, plans="resenc-m")
    assert split_config_dirname("3d_fullres") == ("default", "3d_fullres")
    assert split_config_dirname("__3d_fullres") == ("default", "__3d_fullres")  # not a preset name
