"""find-best compares a preset's configuration (its resenc-m__3d_fullres folder) with the default plan's."""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from autoseg.common.paths import Paths
from autoseg.dataset.spec import load_dataset
from autoseg.evaluate.best import find_best, predict_with_best
from autoseg.infer.predict import PredictOptions, load_model
from autoseg.pipeline.validate import run_validation
from tests.infer.conftest import link_inputs, save_untrained_fold, tiny_plan

DS = "Dataset999_Phantom"


def test_find_best_across_default_and_preset_plans(phantom_small: Paths, tmp_path: Path) -> None:
    paths = Paths(raw=phantom_small.raw, preprocessed=tmp_path / "pre", results=tmp_path / "res")
    ids = [c.case_id for c in load_dataset(paths.raw_dataset(DS)).cases][:4]
    for preset in ("default", "resenc-m"):
        plan = tiny_plan(paths, DS, preset)
        for fold, val in ((0, ids[:2]), (1, ids[2:])):
            fold_dir = save_untrained_fold(paths, plan, "3d_fullres", fold, seed=fold + 10 * (preset != "default"))
            model = load_model([fold_dir], "cpu")
            assert model.config.encoder == ("plain" if preset == "default" else "residual")
            run_validation(model.nets[0], plan, plan.configuration("3d_fullres"), model.mirror_axes, val, paths,
                           DS, fold_dir / "validation", "cpu", save_probabilities=True,
                           options=PredictOptions(tta=False), show_progress=False)
    assert (paths.results / DS / "resenc-m__3d_fullres" / "default" / "fold_1" / "validation" / "summary.json").is_file()

    best = find_best(paths, DS)  # discovers both folders
    assert {c.configs for c in best.candidates} == {("3d_fullres",), ("resenc-m__3d_fullres",),
                                                    ("3d_fullres", "resenc-m__3d_fullres")}
    spec = load_dataset(paths.raw_dataset(DS))
    inp = link_inputs(list(spec.test_cases[0].images), tmp_path / "in")
    result = predict_with_best(paths, paths.results / DS / "best.json", inp, tmp_path / "out", "cpu",
                               options=PredictOptions(tta=False), show_progress=False)
    out = tmp_path / "out" / f"{spec.test_cases[0].case_id}.nii.gz"
    assert len(result.written) == 1 and out.is_file()
    assert sitk.ReadImage(str(out)).GetSize() == sitk.ReadImage(str(spec.test_cases[0].images[0])).GetSize()
