"""ResEnc presets (resenc-m/l/xl): plans equal nnU-Net 2.8.1's nnUNetPlannerResEncM/L/XL, and the plans files.

The differential tests run nnunetv2's own ResEnc planners (``get_plans_for_configuration``, which
builds its ResidualEncoderUNet to count memory) on the same spacings and shapes, with its file
access replaced as in test_fractional_median.py; they skip without nnunetv2.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from autoseg.common.errors import AutosegError, ConfigError
from autoseg.common.paths import Paths
from autoseg.fingerprint import Fingerprint, load_or_extract_fingerprint
from autoseg.planning.plan import plan_dataset
from autoseg.planning.planner import PlanRequest, plan_and_save
from autoseg.planning.presets import PRESETS, RESENC_BLOCKS_PER_STAGE
from autoseg.planning.store import load_plan, resolve_plans
from tests.planning.conftest import make_fingerprint

NNUNET_PLANNER = {"resenc-m": "nnUNetPlannerResEncM", "resenc-l": "nnUNetPlannerResEncL",
                  "resenc-xl": "nnUNetPlannerResEncXL"}
LABELS = {"background": 0, "Anterior": 1, "Posterior": 2}


def _nnunet_planner(monkeypatch: pytest.MonkeyPatch, tmp_path, preset: str, spacings, shapes, labels):
    """nnunetv2's ``preset`` planner built by its own ``__init__`` on an in-memory dataset (no file is
    read or written); returns the planner and its module."""
    pytest.importorskip("nnunetv2", reason="nnunetv2 (the parity reference) is not installed; see README")
    import nnunetv2.experiment_planning.experiment_planners.default_experiment_planner as dep
    from nnunetv2.experiment_planning.experiment_planners.residual_unets import residual_encoder_unet_planners as rp

    dataset_json = {"channel_names": {"0": "MRI"}, "labels": labels, "numTraining": len(shapes),
                    "file_ending": ".nii.gz"}
    fingerprint = {"spacings": [list(map(float, s)) for s in spacings],
                   "shapes_after_crop": [list(map(int, s)) for s in shapes],
                   "median_relative_size_after_cropping": 1.0, "foreground_intensity_properties_per_channel": {}}
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    monkeypatch.setattr(dep, "maybe_convert_to_dataset_name", lambda _: "Dataset100_Test")
    monkeypatch.setattr(dep, "load_json", lambda p: dataset_json if p.endswith("dataset.json") else fingerprint)
    monkeypatch.setattr(dep, "get_filenames_of_train_images_and_targets", lambda *_: {})
    monkeypatch.setattr(dep, "isfile", lambda p: p.endswith("dataset_fingerprint.json"))
    return getattr(rp, NNUNET_PLANNER[preset])("Dataset100_Test"), dep


def _nnunet_reference(monkeypatch: pytest.MonkeyPatch, tmp_path, preset: str, spacings, shapes, labels
                      ) -> dict[str, dict]:
    """nnunetv2's 3d_fullres and 2d plans of ``preset``'s planner for these case spacings / shapes."""
    planner, dep = _nnunet_planner(monkeypatch, tmp_path, preset, spacings, shapes, labels)
    forward, _ = planner.determine_transpose()
    target = planner.determine_fullres_target_spacing()
    median = np.median([dep.compute_new_shape(sh, sp, target) for sp, sh in zip(spacings, shapes)], 0)[forward]
    n_voxels = float(np.prod(median, dtype=np.float64) * len(shapes))
    return {"3d_fullres": planner.get_plans_for_configuration(target[forward], median, "3d", n_voxels, {}),
            "2d": planner.get_plans_for_configuration(target[forward][1:], median[1:], "2d", n_voxels, {})}


def _assert_same(fp: Fingerprint, preset: str, reference: dict[str, dict]) -> None:
    plan = plan_dataset(fp, preset=preset)
    assert plan.preset == preset and plan.gpu_memory_gb == PRESETS[preset].default_gpu_memory_gb
    for name, ref in reference.items():
        cfg, arch = plan.configuration(name), reference[name]["architecture"]["arch_kwargs"]
        assert ref["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")
        ours = dict(patch=cfg.patch_size, batch=cfg.batch_size, strides=cfg.strides, kernels=cfg.kernel_sizes,
                    features=cfg.features_per_stage, blocks=cfg.encoder_blocks_per_stage,
                    decoder=(cfg.n_conv_per_stage,) * (len(cfg.strides) - 1), encoder=cfg.encoder)
        theirs = dict(patch=tuple(int(p) for p in ref["patch_size"]), batch=ref["batch_size"],
                      strides=tuple(tuple(s) for s in arch["strides"]),
                      kernels=tuple(tuple(k) for k in arch["kernel_sizes"]),
                      features=tuple(arch["features_per_stage"]), blocks=tuple(arch["n_blocks_per_stage"]),
                      decoder=tuple(arch["n_conv_per_stage_decoder"]), encoder="residual")
        assert ours == theirs, f"{preset} {name}"


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(NNUNET_PLANNER))
def test_real_hippocampus_plans_equal_nnunet_resenc_planners(preset: str, hippocampus_full: Paths,
                                                             monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """All 260 real cases: topology, blocks, features, patch and batch of 3d_fullres and 2d."""
    fp = load_or_extract_fingerprint(hippocampus_full, "Dataset004_Hippocampus", progress_bar=False)
    reference = _nnunet_reference(monkeypatch, tmp_path, preset, fp.spacings, fp.shapes_after_crop, fp.labels)
    _assert_same(fp, preset, reference)


@pytest.mark.parametrize("preset", list(NNUNET_PLANNER))
def test_thick_slice_ct_plans_equal_nnunet_resenc_planners(preset: str, monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path) -> None:
    """Anisotropic, larger images: the patch shrinks, kernels start at 1 along z, 2D batches grow."""
    shapes = [(25, 192, 192), (26, 193, 191), (24, 190, 195), (27, 201, 187)]
    spacings = [(5.0, 0.7, 0.7)] * 4
    reference = _nnunet_reference(monkeypatch, tmp_path, preset, spacings, shapes, LABELS)
    _assert_same(make_fingerprint(shapes, spacings, labels=LABELS), preset, reference)


@pytest.mark.slow
def test_lowres_of_a_preset_equals_nnunets(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Large anisotropic images: nnU-Net's whole plan_experiment (3d_lowres search included) for ResEnc M."""
    shapes = [(300, 400, 400), (290, 410, 396), (310, 396, 404)]
    spacings = [(2.0, 0.8, 0.8)] * 3
    planner, dep = _nnunet_planner(monkeypatch, tmp_path, "resenc-m", spacings, shapes, LABELS)
    monkeypatch.setattr(dep.shutil, "copy", lambda *_: None)  # it copies dataset.json to nnUNet_preprocessed
    monkeypatch.setattr(planner, "save_plans", lambda _: None)
    monkeypatch.setattr(planner, "determine_reader_writer", lambda: dep.ExperimentPlanner)
    planner.plan_experiment()
    theirs = planner.plans["configurations"]
    plan = plan_dataset(make_fingerprint(shapes, spacings, labels=LABELS), preset="resenc-m")
    assert set(plan.configurations) == set(theirs) == {"2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"}
    for name in ("2d", "3d_fullres", "3d_lowres"):
        cfg, ref = plan.configuration(name), theirs[name]
        arch = ref["architecture"]["arch_kwargs"]
        assert cfg.patch_size == tuple(int(p) for p in ref["patch_size"]), name
        assert cfg.batch_size == ref["batch_size"], name
        np.testing.assert_allclose(cfg.spacing, ref["spacing"], rtol=1e-12)
        assert cfg.strides == tuple(tuple(s) for s in arch["strides"]), name
        assert cfg.encoder_blocks_per_stage == tuple(arch["n_blocks_per_stage"]), name
        assert cfg.batch_dice == ref["batch_dice"], name
    assert plan.configuration("3d_lowres").data_identifier == "resenc-m_3d_lowres"  # nnU-Net: <plans>_3d_lowres
    assert theirs["3d_lowres"]["data_identifier"].endswith("_3d_lowres")


def test_presets_differ_where_nnunet_says(hippocampus_like_fingerprint: Fingerprint) -> None:
    """No 5 % batch cap, one decoder conv, ResNet-34 encoder blocks; more memory -> larger batches."""
    default = plan_dataset(hippocampus_like_fingerprint, 8.0).configuration("3d_fullres")
    m, l_, xl = (plan_dataset(hippocampus_like_fingerprint, preset=p).configuration("3d_fullres")
                 for p in ("resenc-m", "resenc-l", "resenc-xl"))
    assert default.encoder == "plain" and default.encoder_blocks_per_stage == () and default.n_conv_per_stage == 2
    assert m.patch_size == default.patch_size == (40, 56, 40)
    assert m.encoder_blocks_per_stage == RESENC_BLOCKS_PER_STAGE[:4] == (1, 3, 4, 6) and m.n_conv_per_stage == 1
    assert default.batch_size == 9  # the 5 % cap of the default planner
    assert default.batch_size < m.batch_size < l_.batch_size < xl.batch_size
    assert m.reasons["batch_size"].startswith("what fits 8 GB")  # the memory, not the dataset, limits it
    with pytest.raises(ConfigError, match="unknown plans preset 'resenc-s'"):
        plan_dataset(hippocampus_like_fingerprint, preset="resenc-s")


def test_override_of_a_preset_rederives_blocks(hippocampus_like_fingerprint: Fingerprint) -> None:
    plan = plan_dataset(hippocampus_like_fingerprint, preset="resenc-l",
                        overrides=["3d_fullres.patch_size=64,64,64"])
    cfg = plan.configuration("3d_fullres")
    assert len(cfg.strides) == 5 and cfg.encoder_blocks_per_stage == (1, 3, 4, 6, 6)
    assert "re-derived" in cfg.reasons["encoder_blocks_per_stage"]
    with pytest.raises(ConfigError, match="unknown key 'encoder'"):
        plan_dataset(hippocampus_like_fingerprint, preset="resenc-l", overrides=["3d_fullres.encoder=plain"])


def test_preset_plans_file_beside_plans_json(phantom_small: Paths, tmp_path) -> None:
    paths = Paths(raw=phantom_small.raw, preprocessed=tmp_path / "pre", results=tmp_path / "res")
    with pytest.raises(AutosegError, match=r"no resenc-m plan yet; run `autoseg plan Dataset999_Phantom "
                                           r"--preset resenc-m` first"):
        resolve_plans(paths, "Dataset999_Phantom", "resenc-m")
    default = plan_and_save(paths, "999", PlanRequest(progress_bar=False))
    out = plan_and_save(paths, "999", PlanRequest(preset="resenc-m", progress_bar=False))  # its own 8 GB
    assert out.plans_file == paths.preprocessed / "Dataset999_Phantom" / "plans_resenc-m.json"
    assert out.plan.gpu_memory_gb == 8.0 and plan_and_save(
        paths, "999", PlanRequest(preset="resenc-l", progress_bar=False)).plan.gpu_memory_gb == 24.0
    assert default.plans_file.name == "plans.json" and default.plans_file.is_file()
    saved = json.loads(out.plans_file.read_text(encoding="utf-8"))
    assert saved["schema"] == "autoseg.plan" and saved["preset"] == "resenc-m"
    assert saved["configurations"]["3d_fullres"]["encoder"] == "residual"
    assert load_plan(paths, "Dataset999_Phantom", "resenc-m") == out.plan == resolve_plans(
        paths, "Dataset999_Phantom", "resenc-m")
    assert resolve_plans(paths, "Dataset999_Phantom").preset == "default"
    # 2d / 3d_fullres preprocess exactly like the default plan's: same data folders
    for name, cfg in out.plan.configurations.items():
        d = default.plan.configuration(name)
        assert (cfg.data_identifier, cfg.spacing) == (d.data_identifier, d.spacing)
    with pytest.raises(AutosegError, match="neither a plans preset"):
        resolve_plans(paths, "Dataset999_Phantom", "resenc-q")
