"""nnU-Net v2 results folders for tests, written the way nnU-Net 2.8.1 writes them.

``plans.json`` is spelled out here key by key as nnU-Net's ExperimentPlanner writes it (not
produced by autoseg's exporter, which it would then only agree with), with tiny networks so the
tests stay fast. Checkpoints have nnUNetTrainer.save_checkpoint's layout, numpy floats in the
log included. The weights come from the caller: nnU-Net's own network class in the parity tests,
autoseg's U-Net renamed to nnU-Net's keys where nnunetv2 is not needed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

TRAINER = "nnUNetTrainer"
PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESIDUAL = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def nnunet_config(patch: Sequence[int], spacing: Sequence[float], strides: Sequence[Sequence[int]],
                  features: Sequence[int], norm: Sequence[str], mask: Sequence[bool], residual: bool = False,
                  kernels: Sequence[Sequence[int]] | None = None, data_identifier: str = "nnUNetPlans_x",
                  **extra: Any) -> dict[str, Any]:
    """One configuration entry of nnU-Net's plans.json."""
    ndim, n = len(patch), len(strides)
    kernels = kernels or [[3] * ndim] * n
    arch: dict[str, Any] = {
        "n_stages": n, "features_per_stage": list(features), "conv_op": f"torch.nn.modules.conv.Conv{ndim}d",
        "kernel_sizes": [list(k) for k in kernels], "strides": [list(s) for s in strides],
    }
    if residual:
        arch["n_blocks_per_stage"] = [1, 2, 2, 2, 2][:n]
        arch["n_conv_per_stage_decoder"] = [1] * (n - 1)
    else:
        arch["n_conv_per_stage"] = [2] * n
        arch["n_conv_per_stage_decoder"] = [2] * (n - 1)
    arch.update({"conv_bias": True, "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{ndim}d",
                 "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                 "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}})
    resample = "resample_data_or_seg_to_shape"
    cfg = {
        "data_identifier": data_identifier, "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": list(patch), "median_image_size_in_voxels": list(patch), "spacing": list(spacing),
        "normalization_schemes": list(norm), "use_mask_for_norm": list(mask),
        "resampling_fn_data": resample, "resampling_fn_seg": resample,
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": resample,
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {"network_class_name": RESIDUAL if residual else PLAIN, "arch_kwargs": arch,
                         "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": False,
    }
    cfg.update(extra)
    return cfg


def nnunet_plans(dataset: str, configs: Mapping[str, dict[str, Any]], transpose: Sequence[int] = (0, 1, 2),
                 median_spacing: Sequence[float] = (1.0, 1.0, 1.0), median_shape: Sequence[int] = (32, 32, 32),
                 intensity: Mapping[str, Any] | None = None, plans_name: str = "nnUNetPlans") -> dict[str, Any]:
    """nnU-Net's plans.json (``median_*`` already in the transposed order, as nnU-Net stores them)."""
    backward = [int(i) for i in np.argsort(transpose)]
    return {
        "dataset_name": dataset, "plans_name": plans_name,
        "original_median_spacing_after_transp": list(median_spacing),
        "original_median_shape_after_transp": list(median_shape),
        "image_reader_writer": "SimpleITKIO", "transpose_forward": list(transpose), "transpose_backward": backward,
        "configurations": dict(configs), "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": dict(intensity or {
            "0": {"max": 1000.0, "mean": 200.0, "median": 190.0, "min": 0.0, "percentile_00_5": 10.0,
                  "percentile_99_5": 800.0, "std": 120.0}}),
    }


def _checkpoint(plans: dict, dataset_json: dict, config: str, fold: int | str, state: dict[str, torch.Tensor],
                mirror_axes: Sequence[int] | None, trainer: str) -> dict[str, Any]:
    """nnUNetTrainer.save_checkpoint's dict (an SGD state and a short numpy-valued log included)."""
    log = {"mean_fg_dice": [np.float64(0.41), np.float64(0.52)], "ema_fg_dice": [np.float64(0.41), np.float64(0.42)],
           "dice_per_class_or_region": [[np.float64(0.4), np.float64(0.42)]] * 2,
           "train_losses": [np.float32(-0.1), np.float32(-0.2)], "val_losses": [np.float32(-0.1)] * 2,
           "lrs": [0.01, 0.0099], "epoch_start_timestamps": [1.7e9, 1.7e9 + 1], "epoch_end_timestamps": [1.7e9 + 1] * 2}
    optimizer = {"state": {0: {"momentum_buffer": torch.zeros(3)}},
                 "param_groups": [{"lr": 0.0099, "momentum": 0.99, "dampening": 0, "weight_decay": 3e-05,
                                   "nesterov": True, "maximize": False, "foreach": None, "differentiable": False,
                                   "fused": None, "initial_lr": 0.01, "params": [0]}]}
    return {"network_weights": state, "optimizer_state": optimizer, "grad_scaler_state": None, "logging": log,
            "_best_ema": np.float64(0.42), "current_epoch": 2,
            "init_args": {"plans": plans, "configuration": config, "fold": fold, "dataset_json": dataset_json,
                          "device": torch.device("cpu")},
            "trainer_name": trainer,
            "inference_allowed_mirroring_axes": None if mirror_axes is None else tuple(mirror_axes)}


def write_trainer_folder(results: Path, plans: dict, dataset_json: dict, config: str,
                         states: Mapping[int | str, dict[str, torch.Tensor]], mirror_axes: Sequence[int] | None,
                         trainer: str = TRAINER, checkpoint: str = "final") -> Path:
    """``results/<dataset>/<trainer>__<plans>__<config>/`` with plans, dataset.json, a fingerprint and folds."""
    folder = Path(results) / plans["dataset_name"] / f"{trainer}__{plans['plans_name']}__{config}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2), encoding="utf-8")
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2), encoding="utf-8")
    fingerprint = {"foreground_intensity_properties_per_channel": plans["foreground_intensity_properties_per_channel"],
                   "median_relative_size_after_cropping": 1.0, "shapes_after_crop": [[32, 32, 32]],
                   "spacings": [[1.0, 1.0, 1.0]]}
    (folder / "dataset_fingerprint.json").write_text(json.dumps(fingerprint), encoding="utf-8")
    for fold, state in states.items():
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(_checkpoint(plans, dataset_json, config, fold, state, mirror_axes, trainer),
                   folder / f"fold_{fold}" / f"checkpoint_{checkpoint}.pth")
    return folder


def randomize(net: torch.nn.Module, seed: int, head_scale: float = 0.6) -> torch.nn.Module:
    """Random segmentation-head biases and norm scales (in place), so an untrained net predicts every class.

    Works on nnU-Net's networks and ours alike; nnU-Net's aliased parameters change with what they alias.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)) and m.weight is not None:
                m.weight.copy_(1.0 + 0.3 * torch.randn(m.weight.shape, generator=g))
        for name, p in net.named_parameters():
            if ("seg_layers" in name or name.startswith("heads.")) and name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * head_scale)
    return net
