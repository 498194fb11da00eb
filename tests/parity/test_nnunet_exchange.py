"""Differential tests: nnU-Net results folders imported into autoseg predict nnUNetPredictor's masks, and
autoseg models exported as nnU-Net results folders predict autoseg's masks in nnUNetPredictor.

Each trainer folder is written the way nnU-Net 2.8.1 writes it (`tests.nnunet_results`), with
nnU-Net's own network class (``get_network_from_plans``) holding fixed random weights. Both sides
predict the same files with the same tile step (0.5), Gaussian weighting and mirroring.

nnUNetPredictor accumulates the window logits in float16 (``torch.half``, also on the CPU), with a
float16 Gaussian scaled by 10: near the image's edges and corners the window weights fall into
float16's subnormals and its logits there are rounded to a few values, and everywhere they carry
half-precision rounding. autoseg accumulates in float32. So each case is compared twice:

- with nnU-Net's own code run with float32 accumulators and Gaussian (`float32_reference`, the
  only change): the same algorithm must give the same masks (>= 99.9 % of voxels; measured
  100 %) and probabilities within 1e-3 (measured < 2e-6);
- with stock nnU-Net (float16): the masks must still agree on >= 99 % of voxels (measured
  99.86-99.99 % on these tiny random networks, whose near-ties are everywhere).

Every comparison prints its figures (``pytest -s``). Skipped without nnunetv2 (the parity extra).
"""

from __future__ import annotations

import contextlib
import functools
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

with pytest.MonkeyPatch.context() as _mp:  # nnunetv2 reads its folders from the environment at import
    for _var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        _mp.setenv(_var, str(Path(tempfile.gettempdir()) / "autoseg-parity-nnunet" / _var))
    pytest.importorskip("nnunetv2", reason="nnunetv2 (the parity reference) is not installed; see README")
    import nnunetv2.inference.predict_from_raw_data as nnunet_predict  # noqa: E402
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO  # noqa: E402
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans  # noqa: E402

from autoseg.common.paths import Paths  # noqa: E402
from autoseg.dataset.phantom import PhantomRecipe, make_phantom_dataset, make_region_phantom_dataset  # noqa: E402
from autoseg.dataset.spec import load_dataset  # noqa: E402
from autoseg.infer.nnunet_export import export_nnunet  # noqa: E402
from autoseg.infer.nnunet_import import import_nnunet  # noqa: E402
from autoseg.infer.predict import LoadedModel, PredictOptions, load_configuration, predict_case  # noqa: E402
from autoseg.nets.unet import build_unet  # noqa: E402
from autoseg.train.checkpoint import Checkpoint, RngState, save_checkpoint  # noqa: E402
from autoseg.train.config import TrainerConfig  # noqa: E402
from tests.helpers import HIPPOCAMPUS_MSD, hippocampus_available  # noqa: E402
from tests.infer.conftest import tiny_plan  # noqa: E402
from tests.nnunet_results import nnunet_config, nnunet_plans, randomize, write_trainer_folder  # noqa: E402

MASK_AGREEMENT = 0.999
PROBABILITY_TOLERANCE = 1e-3
STOCK_MASK_AGREEMENT = 0.99
"""Against nnU-Net's float16 accumulators (see the module doc)."""
STOCK_FP16_MASK_AGREEMENT = 0.9999
"""autoseg's ``nnunet_fp16`` mode (the same float16 arithmetic) against stock nnU-Net."""


@contextlib.contextmanager
def float32_reference():
    """nnUNetPredictor with float32 window accumulators and Gaussian; nothing else changes."""
    half, gaussian = torch.half, nnunet_predict.compute_gaussian
    torch.half = torch.float32  # read by _internal_predict_sliding_window_return_logits at call time
    nnunet_predict.compute_gaussian = functools.partial(gaussian.__wrapped__, dtype=torch.float32)
    try:
        yield
    finally:
        torch.half, nnunet_predict.compute_gaussian = half, gaussian


def _nnunet_states(cfg: dict, n_in: int, n_out: int, folds: tuple[int, ...]) -> dict[int, dict]:
    """Fixed random weights in nnU-Net's own network class, one set per fold."""
    arch = cfg["architecture"]
    states = {}
    for fold in folds:
        torch.manual_seed(100 + fold)
        net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                     n_in, n_out, allow_init=True, deep_supervision=True)
        states[fold] = randomize(net, fold).state_dict()
    return states


def _predictor(folder: Path, folds: tuple[int, ...]) -> "nnunet_predict.nnUNetPredictor":
    p = nnunet_predict.nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                       perform_everything_on_device=False, device=torch.device("cpu"),
                                       allow_tqdm=False)
    p.initialize_from_trained_model_folder(str(folder), use_folds=folds, checkpoint_name="checkpoint_final.pth")
    return p


@dataclass
class Imported:
    """An nnU-Net results folder imported into autoseg, its nnUNetPredictor, and the case(s) to predict."""

    model: LoadedModel
    predictor: "nnunet_predict.nnUNetPredictor"
    cases: list[list[Path]]
    _stock: dict = field(default_factory=dict)

    def stock(self, images: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        """Stock nnUNetPredictor's (mask, probabilities) of one case, computed once per module."""
        key = tuple(images)
        if key not in self._stock:
            image, props = SimpleITKIO().read_images([str(f) for f in images])
            self._stock[key] = self.predictor.predict_single_npy_array(image, props, None, None, True)
        return self._stock[key]


def _compare(name: str, model, predictor, images: list[Path], stock: bool = True,
             imported: Imported | None = None) -> dict[str, float]:
    """autoseg (whole volume and slab-wise) against nnUNetPredictor on one case; figures printed.

    ``stock=False`` skips the stock-nnU-Net and the slab-wise predictions (a second case of a test).
    """
    seg, probs, _ = predict_case([model], images, PredictOptions(), return_probabilities=True)
    image, props = SimpleITKIO().read_images([str(f) for f in images])
    with float32_reference():
        ref_seg, ref_probs = predictor.predict_single_npy_array(image, props, None, None, True)
    assert ref_seg.shape == seg.shape and ref_probs.shape == probs.shape
    out = {"masks": float((seg == ref_seg).mean()), "max_prob_diff": float(np.abs(probs - ref_probs).max())}
    if stock:
        out["lean_masks"] = float((predict_case([model], images, PredictOptions())[0] == ref_seg).mean())
        if imported is not None:
            stock_seg, stock_probs = imported.stock(images)
        else:
            stock_seg, stock_probs = predictor.predict_single_npy_array(image, props, None, None, True)
        out["stock_masks"] = float((seg == stock_seg).mean())
        out["stock_max_prob_diff"] = float(np.abs(probs - stock_probs).max())
        out["stock_p999_prob_diff"] = float(np.quantile(np.abs(probs - stock_probs), 0.999))
    print(f"\nparity {name}: " + ", ".join(f"{k} {v:.6g}" for k, v in out.items()))
    assert len(np.unique(ref_seg)) > 1  # the random networks predict more than one label
    assert out["masks"] >= MASK_AGREEMENT and out["max_prob_diff"] <= PROBABILITY_TOLERANCE
    if stock:
        assert out["lean_masks"] >= MASK_AGREEMENT and out["stock_masks"] >= STOCK_MASK_AGREEMENT
    return out


def _pad_with_zeros(folder: Path, pattern: str) -> None:
    """A zero frame around every file, so cropping to the nonzero region has something to remove."""
    for f in sorted(folder.glob(pattern)):
        sitk.WriteImage(sitk.ConstantPad(sitk.ReadImage(str(f)), [3, 0, 1], [2, 2, 0], 0), str(f))


@pytest.fixture(scope="module")
def hippocampus(tmp_path_factory: pytest.TempPathFactory) -> Imported:
    """Real cases, plain U-Net, 2 folds (logits averaged), CT normalization, resampled target spacing."""
    if not hippocampus_available():
        pytest.skip("real MSD Hippocampus not found")
    tmp_path = tmp_path_factory.mktemp("hippocampus")
    cfg = nnunet_config((32, 32, 32), (1.2, 1.1, 1.0), [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [4, 8, 16],
                        ["CTNormalization"], [False])
    plans = nnunet_plans("Dataset004_Hippocampus", {"3d_fullres": cfg}, median_shape=(36, 50, 35))
    dataset_json = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
                    "numTraining": 2, "file_ending": ".nii.gz"}
    folder = write_trainer_folder(tmp_path / "nnunet", plans, dataset_json, "3d_fullres",
                                  _nnunet_states(cfg, 1, 3, (0, 1)), (0, 1, 2))
    paths = Paths.under(tmp_path / "autoseg")
    result = import_nnunet(paths, folder)
    model = load_configuration(paths, result.dataset, result.config_dirname, [0, 1])
    return Imported(model, _predictor(folder, (0, 1)),
                    [[HIPPOCAMPUS_MSD / "imagesTr" / f"{case}.nii.gz"] for case in ("hippocampus_001", "hippocampus_003")])


@pytest.fixture(scope="module")
def anisotropic(tmp_path_factory: pytest.TempPathFactory) -> Imported:
    """Generated 3-label case, coarse axis 1 (transposed first), zero frame cropped, masked z-score,
    ResEnc network, in-plane resampling with the separate axis, mirroring of two axes only."""
    tmp_path = tmp_path_factory.mktemp("anisotropic")
    raw = make_phantom_dataset(tmp_path / "raw", PhantomRecipe(num_training=1, num_test=0, shape=(36, 10, 36),
                                                               spacing=(0.9, 3.2, 0.9), shape_jitter=2),
                               dataset_name="Dataset990_ParityAniso")
    _pad_with_zeros(raw / "imagesTr", "*_0000.nii.gz")
    cfg = nnunet_config((8, 16, 16), (3.2, 1.2, 1.2), [[1, 1, 1], [1, 2, 2], [2, 2, 2]], [4, 8, 16],
                        ["ZScoreNormalization"], [True], residual=True,
                        kernels=[[1, 3, 3], [3, 3, 3], [3, 3, 3]])
    plans = nnunet_plans(raw.name, {"3d_fullres": cfg}, transpose=(1, 0, 2), median_spacing=(3.2, 0.9, 0.9),
                         median_shape=(10, 36, 36))
    dataset_json = json.loads((raw / "dataset.json").read_text(encoding="utf-8"))
    folder = write_trainer_folder(tmp_path / "nnunet", plans, dataset_json, "3d_fullres",
                                  _nnunet_states(cfg, 1, 3, (0,)), (1, 2))
    paths = Paths.under(tmp_path / "autoseg")
    result = import_nnunet(paths, folder)
    model = load_configuration(paths, result.dataset, result.config_dirname, [0])
    return Imported(model, _predictor(folder, (0,)), [list(load_dataset(raw).cases[0].images)])


def test_hippocampus_two_folds_match_nnunet(hippocampus: Imported) -> None:
    """Real cases, plain U-Net, 2 folds (logits averaged), CT normalization, resampled target spacing."""
    for i, images in enumerate(hippocampus.cases):
        _compare(f"hippocampus {images[0].name.split('.')[0]}", hippocampus.model, hippocampus.predictor, images,
                 stock=i == 0, imported=hippocampus)


def test_anisotropic_transposed_residual_multiclass_matches_nnunet(anisotropic: Imported) -> None:
    """Generated 3-label case, coarse axis 1 (transposed first), zero frame cropped, masked z-score,
    ResEnc network, in-plane resampling with the separate axis, mirroring of two axes only."""
    model = anisotropic.model
    assert model.mirror_axes == (1, 2) and model.plan.transpose_forward == (1, 0, 2)
    _compare("anisotropic residual", model, anisotropic.predictor, anisotropic.cases[0], imported=anisotropic)


def test_nnunet_fp16_reproduces_stock_nnunet_masks(hippocampus: Imported, anisotropic: Imported) -> None:
    """``PredictOptions(nnunet_fp16=True)`` repeats stock nnU-Net's float16 arithmetic: its masks agree with
    stock nnUNetPredictor's on >= 99.99 % of voxels, where the float32 default agrees on fewer."""
    for name, imported in (("hippocampus", hippocampus), ("anisotropic", anisotropic)):
        images = imported.cases[0]
        stock_seg, stock_probs = imported.stock(images)
        seg, probs, _ = predict_case([imported.model], images, PredictOptions(nnunet_fp16=True),
                                     return_probabilities=True)
        labels_only = predict_case([imported.model], images, PredictOptions(nnunet_fp16=True))[0]
        default = predict_case([imported.model], images, PredictOptions())[0]
        fp16, fp32 = float((seg == stock_seg).mean()), float((default == stock_seg).mean())
        print(f"\nnnunet-fp16 {name}: masks vs stock nnU-Net {fp16:.6f} (float32 default {fp32:.6f}), "
              f"probabilities bit-equal {float((probs == stock_probs).mean()):.6f}, "
              f"max diff {float(np.abs(probs - stock_probs).max()):.3g}")
        assert np.array_equal(labels_only, seg)  # no probabilities kept: the same whole-volume path
        assert fp16 >= STOCK_FP16_MASK_AGREEMENT and fp16 >= fp32
        assert float(np.abs(probs - stock_probs).max()) <= 1e-6  # measured 6e-8: one float32 ulp at most


def test_2d_regions_match_nnunet(tmp_path: Path) -> None:
    """A 2d configuration on a volume, sigmoid regions with regions_class_order, RescaleTo01."""
    raw = make_region_phantom_dataset(tmp_path / "raw", PhantomRecipe(num_training=1, num_test=0,
                                                                      shape=(6, 40, 40)),
                                      dataset_name="Dataset991_ParityRegions")
    cfg = nnunet_config((32, 32), (0.9, 0.9), [[1, 1], [2, 2], [2, 2]], [4, 8, 16],
                        ["RescaleTo01Normalization", "ZScoreNormalization"], [False, False])
    intensity = {str(c): {"max": 900.0, "mean": 300.0, "median": 280.0, "min": 0.0, "percentile_00_5": 5.0,
                          "percentile_99_5": 850.0, "std": 150.0} for c in (0, 1)}
    plans = nnunet_plans(raw.name, {"2d": cfg}, median_spacing=(3.2, 0.9, 0.9), median_shape=(6, 40, 40),
                         intensity=intensity)
    dataset_json = json.loads((raw / "dataset.json").read_text(encoding="utf-8"))
    folder = write_trainer_folder(tmp_path / "nnunet", plans, dataset_json, "2d", _nnunet_states(cfg, 2, 3, (0,)),
                                  (0, 1))
    paths = Paths.under(tmp_path / "autoseg")
    result = import_nnunet(paths, folder)
    model = load_configuration(paths, result.dataset, result.config_dirname, [0])
    assert model.plan.label_scheme.has_regions and model.config.ndim == 2
    _compare("2d regions", model, _predictor(folder, (0,)), list(load_dataset(raw).cases[0].images))


def test_exported_autoseg_model_predicts_the_same_in_nnunet(tmp_path: Path) -> None:
    """An autoseg-planned model (transposed, anisotropic) as nnU-Net results: nnUNetPredictor gives autoseg's masks."""
    paths = Paths.under(tmp_path / "autoseg")
    raw = make_phantom_dataset(paths.raw, PhantomRecipe(num_training=3, num_test=0, shape=(30, 8, 30),
                                                        spacing=(0.9, 3.2, 0.9), shape_jitter=2),
                               dataset_name="Dataset992_ParityExport")
    plan = tiny_plan(paths, raw.name)
    assert plan.transpose_forward != (0, 1, 2)
    config = plan.configuration("3d_fullres")
    torch.manual_seed(3)
    net = randomize(build_unet(config, plan.num_channels, plan.num_classes), 3)
    ckpt = Checkpoint(model_state=net.state_dict(), optimizer_state={}, scaler_state={}, epoch=1,
                      best_ema_pseudo_dice=None, history=[], rng=RngState(torch_cpu=torch.get_rng_state()),
                      trainer_config=TrainerConfig(), plan=plan, config_name="3d_fullres", dataset=plan.dataset,
                      fold=0, num_input_channels=plan.num_channels, num_classes=plan.num_classes)
    save_checkpoint(paths.results / plan.dataset / "3d_fullres" / "default" / "fold_0" / "checkpoint_final.pt", ckpt)
    exported = export_nnunet(paths, plan.dataset, ["3d_fullres"], tmp_path / "nnunet_results")
    model = load_configuration(paths, plan.dataset, "3d_fullres", [0])
    _compare("export", model, _predictor(exported.trainer_dirs[0], (0,)), list(load_dataset(raw).cases[0].images))
