"""import-nnunet / export-nnunet without nnunetv2: keys, plans, refusals, postprocessing, the model folder.

Trainer folders are written as nnU-Net writes them (`tests.nnunet_results`); their weights here are
autoseg's U-Net renamed to nnU-Net's keys (tests/parity/test_nnunet_exchange.py uses nnU-Net's own
network class and predicts with nnunetv2).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import autoseg.cli
from autoseg.common.errors import AutosegError
from autoseg.common.paths import Paths
from autoseg.dataset.io import read_image
from autoseg.dataset.spec import load_dataset
from autoseg.evaluate.best import load_best
from autoseg.infer.nnunet_import import import_nnunet, load_nnunet_checkpoint
from autoseg.infer.nnunet_keys import to_autoseg_state, to_nnunet_state
from autoseg.infer.nnunet_plans import nnunet_plans as export_plans
from autoseg.infer.nnunet_plans import plan_from_nnunet
from autoseg.infer.predict import PredictOptions, load_configuration, predict_case
from autoseg.nets.unet import build_unet
from autoseg.train.checkpoint import load_checkpoint
from autoseg.train.pretrained import load_pretrained, transfer_weights
from tests.infer.conftest import link_inputs
from tests.nnunet_results import nnunet_config, nnunet_plans, randomize, write_trainer_folder

PHANTOM = "Dataset999_Phantom"
FAST = PredictOptions(tta=False)


def _phantom_plans(**config_changes) -> dict:
    cfg = nnunet_config((8, 16, 16), (3.2, 0.9, 0.9), [[1, 1, 1], [1, 2, 2], [2, 2, 2]], [2, 4, 8],
                        ["ZScoreNormalization"], [False], kernels=[[1, 3, 3], [3, 3, 3], [3, 3, 3]])
    cfg.update(config_changes)
    return nnunet_plans(PHANTOM, {"3d_fullres": cfg}, median_spacing=(3.2, 0.9, 0.9), median_shape=(12, 40, 40))


def _dataset_json(paths: Paths) -> dict:
    return json.loads((paths.raw_dataset(PHANTOM) / "dataset.json").read_text(encoding="utf-8"))


def _states(plans: dict, dataset_json: dict, config: str, folds=(0,)) -> dict:
    """Random weights of the plans' network under nnU-Net's names (autoseg's U-Net, renamed)."""
    plan = plan_from_nnunet(plans, dataset_json, config, "plans.json")
    cfg = plan.configuration(config)
    n_in = plan.num_channels + (plan.num_classes - 1 if cfg.previous_stage else 0)
    out = {}
    for fold in folds:
        torch.manual_seed(fold)
        net = randomize(build_unet(cfg, n_in, plan.num_classes), fold)
        out[fold] = to_nnunet_state(net.state_dict(), cfg.encoder == "residual")
    return out


def _folder(tmp_path: Path, paths: Paths, plans: dict | None = None, folds=(0,), mirror=(0, 1, 2),
            config: str = "3d_fullres") -> Path:
    plans = plans or _phantom_plans()
    dj = _dataset_json(paths)
    return write_trainer_folder(tmp_path / "nnunet", plans, dj, config, _states(plans, dj, config, folds), mirror)


def _cli(paths: Paths, *args: str):
    return CliRunner().invoke(autoseg.cli.cli, ["--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed),
                                                "--results", str(paths.results), *args])


@pytest.mark.parametrize("ndim,residual", [(3, False), (3, True), (2, False), (2, True)])
def test_state_dict_keys_round_trip(ndim, residual):
    strides = ((1,) * ndim, (2,) * ndim, (2,) * ndim)
    from autoseg.nets.unet import DynamicUNet

    net = DynamicUNet(ndim, 2, 3, (4, 8, 16), strides, ((3,) * ndim,) * 3, 1 if residual else 2,
                      encoder_blocks=(1, 2, 2) if residual else ())
    theirs = to_nnunet_state(net.state_dict(), residual)
    # every conv and norm twice (conv/norm and all_modules), the encoder again under decoder.encoder
    assert any(".all_modules.1." in k for k in theirs) and any(k.startswith("decoder.encoder.") for k in theirs)
    back = to_autoseg_state(theirs, residual)
    assert back.keys() == net.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in net.state_dict().items())
    with pytest.raises(AutosegError, match="not one of nnU-Net's") as err:
        to_autoseg_state({**theirs, "decoder.attention.0.weight": torch.zeros(1)}, residual, "ckpt.pth")
    assert "\n" not in str(err.value)


def test_plans_with_every_normalization_cascade_and_transpose_round_trip():
    schemes = ["ZScoreNormalization", "CTNormalization", "NoNormalization", "RescaleTo01Normalization",
               "RGBTo01Normalization"]
    full = nnunet_config((16, 16, 8), (1.0, 1.0, 2.5), [[1, 1, 1], [2, 2, 1], [2, 2, 2]], [4, 8, 16], schemes,
                         [True, False, False, False, False], residual=True)
    low = copy.deepcopy(full) | {"spacing": [2.0, 2.0, 5.0], "next_stage": ["3d_cascade_fullres"]}
    intensity = {str(c): {"mean": 50.0 + c, "std": 10.0, "percentile_00_5": -100.0, "percentile_99_5": 300.0,
                          "min": -200.0, "max": 400.0, "median": 40.0} for c in range(5)}
    plans = nnunet_plans("Dataset123_Multi", {"3d_fullres": full, "3d_lowres": low,
                                              "3d_cascade_fullres": {"inherits_from": "3d_fullres",
                                                                     "previous_stage": "3d_lowres"}},
                         transpose=(2, 0, 1), median_spacing=(2.5, 1.0, 1.0), median_shape=(20, 64, 60),
                         intensity=intensity, plans_name="nnUNetResEncUNetLPlans")
    dj = {"channel_names": {str(c): f"ch{c}" for c in range(5)}, "file_ending": ".nii.gz", "numTraining": 3,
          "labels": {"background": 0, "a": 1, "b": 2, "ignore": 3}}
    plan = plan_from_nnunet(plans, dj, "3d_cascade_fullres", "plans.json")
    assert [n.scheme for n in plan.normalization] == ["zscore", "ct", "none", "rescale_to_0_1", "rgb_to_0_1"]
    assert plan.normalization[0].use_nonzero_mask and plan.normalization[1].clip_high == 300.0
    assert plan.normalization[1].mean == 51.0 and plan.preset == "resenc-l" and plan.ignore_label == 3
    assert plan.num_classes == 3  # the ignore label is not predicted
    # nnU-Net stores the medians transposed; Plan keeps them in the array order (z, y, x)
    assert plan.transpose_forward == (2, 0, 1) and plan.original_median_spacing == (1.0, 1.0, 2.5)
    cascade = plan.configuration("3d_cascade_fullres")
    assert cascade.previous_stage == "3d_lowres" and cascade.patch_size == (16, 16, 8)
    assert cascade.encoder == "residual" and cascade.encoder_blocks_per_stage == (1, 2, 2)
    assert plan.configuration("3d_lowres").next_stage == "3d_cascade_fullres"
    again = plan_from_nnunet(export_plans(plan, "nnUNetResEncUNetLPlans"), dj, "3d_cascade_fullres", "plans.json")
    assert again == plan


@pytest.mark.parametrize("change,named", [
    (lambda c: c["architecture"].update(network_class_name="my_lab.nets.FancyUNet"), "my_lab.nets.FancyUNet"),
    (lambda c: c["architecture"]["arch_kwargs"].update(dropout_op="torch.nn.Dropout3d"), "dropout_op"),
    (lambda c: c["architecture"]["arch_kwargs"].update(n_conv_per_stage=[2, 2, 3]), "n_conv_per_stage"),
    (lambda c: c["architecture"]["arch_kwargs"].update(nonlin="torch.nn.ReLU"), "nonlin"),
    (lambda c: c.update(normalization_schemes=["FancyNormalization"]), "FancyNormalization"),
    (lambda c: c["resampling_fn_data_kwargs"].update(order_z=3), "order_z"),
    (lambda c: c.pop("architecture"), "architecture"),
])
def test_unsupported_plans_are_refused_in_one_line(phantom_small, tmp_path, change, named):
    plans = _phantom_plans()
    change(plans["configurations"]["3d_fullres"])
    with pytest.raises(AutosegError) as err:
        plan_from_nnunet(plans, _dataset_json(phantom_small), "3d_fullres", "plans.json")
    assert named in str(err.value) and "\n" not in str(err.value)
    reader = _phantom_plans() | {"image_reader_writer": "NibabelIOWithReorient"}
    with pytest.raises(AutosegError, match="NibabelIOWithReorient"):
        plan_from_nnunet(reader, _dataset_json(phantom_small), "3d_fullres", "plans.json")


def test_custom_network_class_stops_the_import_with_one_cli_line(phantom_small, tmp_path):
    plans = _phantom_plans()
    folder = _folder(tmp_path, phantom_small, plans)
    broken = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
    broken["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "my_lab.nets.FancyUNet"
    (folder / "plans.json").write_text(json.dumps(broken), encoding="utf-8")
    paths = Paths(raw=phantom_small.raw, preprocessed=tmp_path / "pp", results=tmp_path / "results")
    result = _cli(paths, "import-nnunet", str(folder))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "custom network class my_lab.nets.FancyUNet" in result.stderr
    assert not (tmp_path / "results").exists()


class _Mkdir:
    """A pickle that would create a folder when unpickled (it must not be)."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_checkpoints_are_read_without_running_code(phantom_small, tmp_path):
    folder = _folder(tmp_path, phantom_small)
    ckpt = folder / "fold_0" / "checkpoint_final.pth"
    ok = load_nnunet_checkpoint(ckpt)  # numpy floats in the log and a torch.device are allowed
    assert isinstance(ok["logging"]["mean_fg_dice"][0], np.floating) and ok["init_args"]["device"].type == "cpu"
    marker = tmp_path / "executed"
    evil = dict(ok, logging=_Mkdir(marker))
    torch.save(evil, ckpt)
    with pytest.raises(AutosegError) as err:
        load_nnunet_checkpoint(ckpt)
    assert "refused" in str(err.value) and "mkdir" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(AutosegError, match="cannot read the checkpoint"):
        load_nnunet_checkpoint(ckpt)


def test_import_predict_export_model_and_pretrained(phantom_small, tmp_path):
    folder = _folder(tmp_path, phantom_small, folds=(0, 1))
    paths = Paths(raw=phantom_small.raw, preprocessed=tmp_path / "pp", results=tmp_path / "results")
    result = _cli(paths, "import-nnunet", str(folder))
    assert result.exit_code == 0, result.output
    model_dir = paths.results / PHANTOM
    manifest = json.loads((model_dir / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["configs"] == ["3d_fullres"] and manifest["folds"] == [0, 1]
    assert (model_dir / "3d_fullres" / "nnunet" / "dataset_fingerprint.json").is_file()
    again = _cli(paths, "import-nnunet", str(folder))
    assert again.exit_code == 2 and "--force" in again.stderr
    assert _cli(paths, "import-nnunet", str(folder), "--force").exit_code == 0

    case = load_dataset(phantom_small.raw_dataset(PHANTOM)).cases[0]
    inp = link_inputs(list(case.images), tmp_path / "in")
    out = _cli(paths, "predict", "-m", str(model_dir), "-i", str(inp), "-o", str(tmp_path / "out"), "--device", "cpu")
    assert out.exit_code == 0, out.output
    seg, geometry = read_image(tmp_path / "out" / f"{case.case_id}.nii.gz")
    assert geometry.same_grid(read_image(case.images[0])[1]) and len(np.unique(seg)) > 1

    zipped = _cli(paths, "export-model", PHANTOM, "-c", "3d_fullres", "-f", "0", "1", "-o", str(tmp_path / "m.zip"))
    assert zipped.exit_code == 0, zipped.output

    source = model_dir / "3d_fullres" / "default" / "fold_0" / "checkpoint_final.pt"
    ckpt = load_checkpoint(source)
    cfg = ckpt.plan.configuration("3d_fullres")
    net = build_unet(cfg, ckpt.num_input_channels, ckpt.num_classes)
    transfer_weights(net, load_pretrained(source), ckpt.num_input_channels, ckpt.num_classes)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in ckpt.model_state.items())


def test_export_then_import_gives_the_same_model(phantom_small, tmp_path):
    folder = _folder(tmp_path, phantom_small, mirror=(1, 2))
    first = Paths(raw=phantom_small.raw, preprocessed=tmp_path / "pp", results=tmp_path / "r1")
    import_nnunet(first, folder)
    exported = _cli(first, "export-nnunet", PHANTOM, "-c", "3d_fullres", "-o", str(tmp_path / "nn_out"))
    assert exported.exit_code == 0, exported.output
    trainer_dir = tmp_path / "nn_out" / PHANTOM / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    written = torch.load(trainer_dir / "fold_0" / "checkpoint_final.pth", weights_only=True)
    original = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
    assert written["network_weights"].keys() == original["network_weights"].keys()
    assert written["inference_allowed_mirroring_axes"] == (1, 2) and written["trainer_name"] == "nnUNetTrainer"
    second = Paths(raw=phantom_small.raw, preprocessed=tmp_path / "pp", results=tmp_path / "r2")
    import_nnunet(second, trainer_dir)
    a, b = (load_configuration(p, PHANTOM, "3d_fullres", [0]) for p in (first, second))
    assert a.plan == b.plan and a.mirror_axes == b.mirror_axes == (1, 2)
    case = load_dataset(phantom_small.raw_dataset(PHANTOM)).cases[1]
    assert np.array_equal(predict_case([a], case.images, FAST)[0], predict_case([b], case.images, FAST)[0])


@pytest.mark.parametrize("axes,expect", [(None, ()), ((0, 1, 2), (0, 1, 2)), ((2,), (2,))])
def test_mirroring_axes_come_from_the_checkpoint(phantom_small, tmp_path, axes, expect):
    folder = _folder(tmp_path, phantom_small, mirror=axes)
    paths = Paths(raw=phantom_small.raw, preprocessed=tmp_path / "pp", results=tmp_path / "results")
    import_nnunet(paths, folder)
    assert load_configuration(paths, PHANTOM, "3d_fullres", [0]).mirror_axes == expect


def test_postprocessing_json_is_used_and_the_pickle_never_opened(phantom_small, tmp_path):
    folder = _folder(tmp_path, phantom_small, folds=(0, 1))
    cv = folder / "crossval_results_folds_0_1"
    cv.mkdir()
    marker = tmp_path / "unpickled"
    (cv / "postprocessing.pkl").write_bytes(pickle.dumps(_Mkdir(marker)))
    paths = Paths(raw=phantom_small.raw, preprocessed=tmp_path / "pp", results=tmp_path / "r1")
    result = import_nnunet(paths, folder)
    assert not result.has_postprocessing and not (paths.results / PHANTOM / "best.json").exists()
    assert any("not unpickled" in n and "without postprocessing" in n for n in result.notes)
    pp = {"input_folder": {"foreground_mean": {"Dice": 0.8}, "mean": {}},
          "postprocessed": {"foreground_mean": {"Dice": 0.82}, "mean": {"1": {"Dice": 0.9}, "2": {"Dice": 0.74}}},
          "postprocessing_fns": ["remove_all_but_largest_component_from_segmentation"] * 2,
          "postprocessing_kwargs": [{"labels_or_regions": [1, 2]}, {"labels_or_regions": 2}]}
    (cv / "postprocessing.json").write_text(json.dumps(pp), encoding="utf-8")
    paths = Paths(raw=phantom_small.raw, preprocessed=tmp_path / "pp", results=tmp_path / "r2")
    result = _cli(paths, "import-nnunet", str(folder))
    assert result.exit_code == 0 and "not unpickled" in result.output and not marker.exists()
    best = load_best(paths.results / PHANTOM / "best.json")
    assert best.postprocessing.keep_largest_foreground and best.postprocessing.keep_largest_classes == (2,)
    assert best.configs == ("3d_fullres",) and best.folds == (0, 1) and best.cv_dice_postprocessed == 0.82


def test_training_results_are_never_overwritten(phantom_small, tmp_path):
    paths = Paths(raw=phantom_small.raw, preprocessed=tmp_path / "pp", results=tmp_path / "results")
    (paths.results / PHANTOM / "3d_fullres" / "default" / "fold_0").mkdir(parents=True)
    with pytest.raises(AutosegError, match="holds training results"):
        import_nnunet(paths, _folder(tmp_path, phantom_small))


def test_weights_of_another_network_are_refused(phantom_small, tmp_path):
    plans = _phantom_plans()
    dj = _dataset_json(phantom_small)
    state = _states(plans, dj, "3d_fullres")[0]
    state = {k: (v[:1] if k == "decoder.seg_layers.0.bias" else v) for k, v in state.items()}
    folder = write_trainer_folder(tmp_path / "nnunet", plans, dj, "3d_fullres", {0: state}, (0, 1, 2))
    paths = Paths(raw=phantom_small.raw, preprocessed=tmp_path / "pp", results=tmp_path / "results")
    with pytest.raises(AutosegError, match="weights do not fit") as err:
        import_nnunet(paths, folder)
    assert "\n" not in str(err.value)


def test_cascade_imports_with_its_previous_stage(phantom_small, tmp_path):
    plans = _phantom_plans()
    full = plans["configurations"]["3d_fullres"]
    plans["configurations"]["3d_lowres"] = copy.deepcopy(full) | {"spacing": [3.2, 1.8, 1.8],
                                                                  "next_stage": "3d_cascade_fullres"}
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    dj = _dataset_json(phantom_small)
    paths = Paths(raw=phantom_small.raw, preprocessed=tmp_path / "pp", results=tmp_path / "results")
    for config in ("3d_cascade_fullres", "3d_lowres"):
        folder = write_trainer_folder(tmp_path / "nnunet", plans, dj, config, _states(plans, dj, config), None)
        result = import_nnunet(paths, folder)
        assert any("previous stage" in n for n in result.notes) == (config == "3d_cascade_fullres")
    model = load_configuration(paths, PHANTOM, "3d_cascade_fullres", [0])
    assert model.previous_stage is not None and model.previous_stage.model.config.name == "3d_lowres"
    case = load_dataset(phantom_small.raw_dataset(PHANTOM)).cases[0]
    seg, _, geometry = predict_case([model], case.images, FAST)
    assert seg.shape == geometry.shape


def test_imported_validation_masks_feed_evaluate_and_find_best(phantom_small, tmp_path):
    """nnU-Net's fold_<k>/validation masks come along: `evaluate` scores them, `find-best` picks from them."""
    folder = _folder(tmp_path, phantom_small, folds=(0, 1))
    cases = load_dataset(phantom_small.raw_dataset(PHANTOM)).cases
    for fold, case in ((0, cases[0]), (1, cases[1])):  # one validation case per fold: its reference as prediction
        (folder / f"fold_{fold}" / "validation").mkdir()
        (folder / f"fold_{fold}" / "validation" / f"{case.case_id}.nii.gz").write_bytes(case.label.read_bytes())
    paths = Paths(raw=phantom_small.raw, preprocessed=tmp_path / "pp", results=tmp_path / "results")
    import_nnunet(paths, folder)
    for fold in (0, 1):
        vdir = paths.results / PHANTOM / "3d_fullres" / "default" / f"fold_{fold}" / "validation"
        scored = _cli(paths, "evaluate", "--pred", str(vdir), "--ref", str(phantom_small.raw_dataset(PHANTOM) /
                                                                             "labelsTr"), "-d", PHANTOM,
                      "--allow-missing")
        assert scored.exit_code == 0, scored.output
    best = _cli(paths, "find-best", PHANTOM)
    assert best.exit_code == 0, best.output
    assert load_best(paths.results / PHANTOM / "best.json").cv_dice == pytest.approx(1.0)


def test_folds_and_checkpoint_choice(phantom_small, tmp_path):
    plans, dj = _phantom_plans(), _dataset_json(phantom_small)
    folder = write_trainer_folder(tmp_path / "nnunet", plans, dj, "3d_fullres", _states(plans, dj, "3d_fullres", (0, 1)),
                                  (0, 1, 2), checkpoint="best")
    paths = Paths(raw=phantom_small.raw, preprocessed=tmp_path / "pp", results=tmp_path / "results")
    missing = _cli(paths, "import-nnunet", str(folder))
    assert missing.exit_code == 2 and "--checkpoint best" in missing.stderr
    ok = _cli(paths, "import-nnunet", str(folder), "--checkpoint", "best", "-f", "1")
    assert ok.exit_code == 0, ok.output
    manifest = json.loads((paths.results / PHANTOM / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["folds"] == [1] and manifest["checkpoint"] == "best"
    assert (paths.results / PHANTOM / "3d_fullres" / "default" / "fold_1" / "checkpoint_best.pt").is_file()
    assert not (paths.results / PHANTOM / "3d_fullres" / "default" / "fold_0").exists()
