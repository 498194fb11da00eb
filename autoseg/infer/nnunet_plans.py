"""nnU-Net v2 plans.json + dataset.json <-> autoseg `Plan`, for the networks autoseg can build.

nnU-Net names everything a prediction depends on in its plans: the network class and its
arguments, normalization per channel, resampling functions, transposition. autoseg predicts
exactly like nnU-Net only where these are the defaults autoseg implements, so every other
value is refused with one line naming it (`NnunetPlansError`) instead of giving other masks:

- networks: ``PlainConvUNet`` (one conv count for every encoder and decoder stage) and
  ``ResidualEncoderUNet`` with ``BasicBlockD`` (the ResEnc M/L/XL presets); conv bias, instance
  norm (eps 1e-5, affine), no dropout, LeakyReLU 0.01;
- normalization: ZScore (with or without the nonzero mask), CT (the dataset's foreground
  percentiles, mean and std), NoNorm, RescaleTo01, RGBTo01;
- resampling: ``resample_data_or_seg_to_shape`` with ``order_z = 0`` and the separate axis
  decided from the spacings (``force_separate_z = None``); probabilities at order 1;
- images read like SimpleITK (SimpleITKIO, NibabelIO without reorientation, NaturalImage2DIO).

nnU-Net's per-axis lists are in its transposed order, as autoseg's `Configuration`; its
``original_median_*_after_transp`` are transposed back for `Plan`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from autoseg.common.errors import AutosegError
from autoseg.common.paths import DEFAULT_PLANS
from autoseg.planning.plans import (PLAIN_ENCODER, RESIDUAL_ENCODER, ChannelNormalization, Configuration, Plan)

PLAIN_CLASS = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESIDUAL_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
NETWORK_CLASSES = {"PlainConvUNet": PLAIN_ENCODER, "ResidualEncoderUNet": RESIDUAL_ENCODER}
"""Last component of ``architecture.network_class_name`` -> `Configuration.encoder`."""

NORMALIZATIONS = {"ZScoreNormalization": "zscore", "CTNormalization": "ct", "NoNormalization": "none",
                  "RescaleTo01Normalization": "rescale_to_0_1", "RGBTo01Normalization": "rgb_to_0_1"}
"""nnU-Net's normalization class names -> `ChannelNormalization.scheme`."""

READERS = ("SimpleITKIO", "NibabelIO", "NaturalImage2DIO")
"""Image readers whose arrays and spacings are what autoseg's SimpleITK / scikit-image reading gives."""

PRESETS = {"nnUNetPlans": DEFAULT_PLANS, "nnUNetResEncUNetMPlans": "resenc-m",
           "nnUNetResEncUNetLPlans": "resenc-l", "nnUNetResEncUNetXLPlans": "resenc-xl"}
"""nnU-Net plans identifiers -> autoseg planner presets (results folders ``<preset>__<config>``)."""

PRESET_GPU_MEMORY_GB = {DEFAULT_PLANS: 8.0, "resenc-m": 8.0, "resenc-l": 24.0, "resenc-xl": 40.0}
"""The GPU memory each nnU-Net planner plans for (its default target); 0 for another plans name."""

RESAMPLING_FN = "resample_data_or_seg_to_shape"
NORM_EPS = 1e-5
LEAKY_SLOPE = 1e-2
_ARCH_IMPORTS = ["conv_op", "norm_op", "dropout_op", "nonlin"]


class NnunetPlansError(AutosegError):
    """plans.json asks for something autoseg does not predict like nnU-Net."""


def preset_for(plans_name: str) -> str:
    """The autoseg preset of an nnU-Net plans identifier (others: the identifier, lower-cased)."""
    if plans_name in PRESETS:
        return PRESETS[plans_name]
    name = "".join(c if c.isalnum() or c in "-." else "-" for c in plans_name).strip("-.").lower()
    return name or "nnunet"


def plans_name_for(preset: str) -> str:
    """The nnU-Net plans identifier an autoseg preset is exported as."""
    for name, p in PRESETS.items():
        if p == preset:
            return name
    return f"nnUNetPlans_{preset}"


def resolve_configuration(plans: Mapping[str, Any], name: str, where: object) -> dict[str, Any]:
    """One configuration of nnU-Net plans with its ``inherits_from`` chain merged in."""
    configs = plans.get("configurations", {})
    seen: list[str] = []
    merged: dict[str, Any] = {}
    while name is not None:
        if name not in configs:
            raise NnunetPlansError(f"configuration {name!r} is not in the plans (has {', '.join(configs)})", where)
        if name in seen:
            raise NnunetPlansError(f"configurations inherit in a circle: {' -> '.join(seen + [name])}", where)
        seen.append(name)
        merged = {**configs[name], **merged}
        name = configs[name].get("inherits_from")
    merged.pop("inherits_from", None)
    return merged


def _per_stage(value: Any, n: int, ndim: int, key: str, where: str) -> tuple[tuple[int, ...], ...]:
    """nnU-Net allows one int for every stage and axis, or one per stage; -> one tuple per stage."""
    if isinstance(value, int):
        value = [value] * n
    if not isinstance(value, list) or len(value) != n:
        raise NnunetPlansError(f"{key} must have one entry per stage ({n})", where)
    return tuple(tuple([int(v)] * ndim) if isinstance(v, int) else tuple(int(x) for x in v) for v in value)


def _one_count(values: Any, key: str, where: str) -> int:
    counts = [values] if isinstance(values, int) else list(values)
    if len(set(counts)) != 1:
        raise NnunetPlansError(f"{key} {counts} differs between stages; autoseg's U-Net has one count", where)
    return int(counts[0])


def _check_layers(kw: Mapping[str, Any], ndim: int, where: str) -> None:
    """Conv, norm, dropout and nonlinearity must be the ones autoseg's U-Net builds."""
    def last(name: Any) -> str:
        return str(name).rsplit(".", 1)[-1]

    checks = [
        (last(kw.get("conv_op")) == f"Conv{ndim}d", "conv_op", f"Conv{ndim}d"),
        (last(kw.get("norm_op")) == f"InstanceNorm{ndim}d", "norm_op", f"InstanceNorm{ndim}d"),
        (math.isclose(float((kw.get("norm_op_kwargs") or {}).get("eps", 1e-5)), NORM_EPS)
         and bool((kw.get("norm_op_kwargs") or {}).get("affine", False)), "norm_op_kwargs", "eps 1e-5, affine"),
        (kw.get("dropout_op") is None, "dropout_op", "None"),
        (last(kw.get("nonlin")) == "LeakyReLU", "nonlin", "LeakyReLU"),
        (math.isclose(float((kw.get("nonlin_kwargs") or {}).get("negative_slope", LEAKY_SLOPE)), LEAKY_SLOPE),
         "nonlin_kwargs", "negative_slope 0.01"),
        (bool(kw.get("conv_bias", False)), "conv_bias", "true"),
        (last(kw.get("block") or "BasicBlockD") == "BasicBlockD", "block", "BasicBlockD"),
        (kw.get("bottleneck_channels") is None and kw.get("stem_channels") is None,
         "bottleneck_channels/stem_channels", "None"),
    ]
    for ok, key, want in checks:
        if not ok:
            raise NnunetPlansError(f"architecture.arch_kwargs.{key} = {kw.get(key.split('/')[0])!r}; "
                                   f"autoseg builds nnU-Net's networks with {want} only", where)


def _check_resampling(cfg: Mapping[str, Any], where: str) -> tuple[int, int]:
    """(data order, seg order) of nnU-Net's default resampling; anything else is refused."""
    orders = []
    for kind, want_order in (("data", None), ("seg", None), ("probabilities", 1)):
        fn, kw = cfg.get(f"resampling_fn_{kind}"), cfg.get(f"resampling_fn_{kind}_kwargs") or {}
        order = int(kw.get("order", 3 if kind == "data" else 1))
        ok = (fn == RESAMPLING_FN and int(kw.get("order_z", 0)) == 0 and kw.get("force_separate_z") is None
              and (want_order is None or order == want_order))
        if not ok:
            raise NnunetPlansError(f"resampling_fn_{kind} {fn} {dict(kw)}: autoseg resamples like nnU-Net's "
                                   f"default only ({RESAMPLING_FN}, order_z 0, force_separate_z None, "
                                   "probabilities at order 1)", where)
        orders.append(order)
    return orders[0], orders[1]


def configuration_from_nnunet(name: str, cfg: Mapping[str, Any], where: object) -> Configuration:
    """An autoseg `Configuration` from one resolved nnU-Net configuration dict."""
    at = f"{where}:configurations.{name}"
    arch = cfg.get("architecture")
    if not isinstance(arch, Mapping):
        raise NnunetPlansError("no 'architecture' entry (plans of nnU-Net < 2.4: re-plan with a current nnU-Net)", at)
    cls = str(arch.get("network_class_name", ""))
    encoder = NETWORK_CLASSES.get(cls.rsplit(".", 1)[-1])
    if encoder is None:
        raise NnunetPlansError(f"custom network class {cls}: autoseg builds only nnU-Net's PlainConvUNet and "
                               "ResidualEncoderUNet", at)
    if cfg.get("preprocessor_name", "DefaultPreprocessor") != "DefaultPreprocessor":
        raise NnunetPlansError(f"preprocessor {cfg.get('preprocessor_name')}: autoseg preprocesses like nnU-Net's "
                               "DefaultPreprocessor only", at)
    kw = arch.get("arch_kwargs", {})
    patch = tuple(int(p) for p in cfg["patch_size"])
    ndim, n = len(patch), int(kw["n_stages"])
    _check_layers(kw, ndim, at)
    features = kw["features_per_stage"]
    features = tuple([int(features)] * n if isinstance(features, int) else [int(f) for f in features])
    decoder_convs = _one_count(kw["n_conv_per_stage_decoder"], "n_conv_per_stage_decoder", at)
    blocks: tuple[int, ...] = ()
    if encoder == PLAIN_ENCODER:
        if _one_count(kw["n_conv_per_stage"], "n_conv_per_stage", at) != decoder_convs:
            raise NnunetPlansError("n_conv_per_stage and n_conv_per_stage_decoder differ; autoseg's plain U-Net "
                                   "has one count", at)
    else:
        raw = kw["n_blocks_per_stage"]
        blocks = tuple([int(raw)] * n if isinstance(raw, int) else [int(b) for b in raw])
    order_data, order_seg = _check_resampling(cfg, at)
    next_stage = cfg.get("next_stage")
    if isinstance(next_stage, list):
        next_stage = next_stage[0] if next_stage else None
    return Configuration(
        name=name, data_identifier=str(cfg.get("data_identifier", name)),
        spacing=tuple(float(s) for s in cfg["spacing"]), patch_size=patch, batch_size=int(cfg.get("batch_size", 2)),
        median_shape=tuple(int(round(float(m))) for m in cfg.get("median_image_size_in_voxels", patch)),
        strides=_per_stage(kw["strides"], n, ndim, "strides", at),
        kernel_sizes=_per_stage(kw["kernel_sizes"], n, ndim, "kernel_sizes", at),
        features_per_stage=features, n_conv_per_stage=decoder_convs, encoder=encoder,
        encoder_blocks_per_stage=blocks, resample_order_data=order_data, resample_order_seg=order_seg,
        batch_dice=bool(cfg.get("batch_dice", True)), previous_stage=cfg.get("previous_stage"),
        next_stage=next_stage, reasons={"imported": "from an nnU-Net plans.json"})


def _normalization(cfg: Mapping[str, Any], plans: Mapping[str, Any], n_channels: int,
                   where: str) -> tuple[ChannelNormalization, ...]:
    schemes, masks = cfg.get("normalization_schemes", []), cfg.get("use_mask_for_norm", [])
    if len(schemes) != n_channels or len(masks) != n_channels:
        raise NnunetPlansError(f"normalization_schemes/use_mask_for_norm need one entry per channel ({n_channels})",
                               where)
    props = plans.get("foreground_intensity_properties_per_channel", {})
    out = []
    for c, (scheme, mask) in enumerate(zip(schemes, masks)):
        name = NORMALIZATIONS.get(str(scheme).rsplit(".", 1)[-1])
        if name is None:
            raise NnunetPlansError(f"normalization {scheme} of channel {c}: autoseg has {', '.join(NORMALIZATIONS)}",
                                   where)
        if name == "ct":
            p = props.get(str(c))
            if not p:
                raise NnunetPlansError(f"CT normalization of channel {c} needs "
                                       "foreground_intensity_properties_per_channel", where)
            out.append(ChannelNormalization("ct", bool(mask), float(p["percentile_00_5"]), float(p["percentile_99_5"]),
                                            float(p["mean"]), float(p["std"])))
        else:
            out.append(ChannelNormalization(name, bool(mask)))
    return tuple(out)


def _untranspose(values: Any, tb: tuple[int, ...], cast: type) -> tuple:
    after = [cast(round(float(v))) if cast is int else float(v) for v in values]
    return tuple(after[tb[j]] for j in range(len(after)))


def plan_from_nnunet(plans: Mapping[str, Any], dataset_json: Mapping[str, Any], config_name: str,
                     where: object) -> Plan:
    """The autoseg `Plan` of an nnU-Net trainer folder, normalized like ``config_name``.

    Every configuration of the plans autoseg can build goes in (a cascade needs its previous
    stage's); ``config_name`` must be one of them, or its one-line reason is raised.
    """
    reader = str(plans.get("image_reader_writer", "SimpleITKIO"))
    if reader not in READERS:
        raise NnunetPlansError(f"image_reader_writer {reader}: autoseg reads images like {', '.join(READERS)} only "
                               "(other readers reorient or reorder the axes)", where)
    if plans.get("label_manager", "LabelManager") != "LabelManager":
        raise NnunetPlansError(f"label_manager {plans.get('label_manager')}: only nnU-Net's LabelManager", where)
    tf = tuple(int(a) for a in plans["transpose_forward"])
    tb = tuple(int(a) for a in plans["transpose_backward"])
    configs, problems = {}, {}
    for name in plans.get("configurations", {}):
        try:
            configs[name] = configuration_from_nnunet(name, resolve_configuration(plans, name, where), where)
        except (NnunetPlansError, KeyError, TypeError, ValueError) as e:
            problems[name] = e
    if config_name not in configs:
        e = problems.get(config_name)
        if isinstance(e, AutosegError):
            raise e
        if e is not None:
            raise NnunetPlansError(f"configuration {config_name!r} is incomplete ({type(e).__name__}: {e})", where)
        raise NnunetPlansError(f"configuration {config_name!r} is not in the plans", where)
    channels = {int(k): str(v) for k, v in dataset_json["channel_names"].items()}
    norm = _normalization(resolve_configuration(plans, config_name, where), plans, len(channels),
                          f"{where}:configurations.{config_name}")
    preset = preset_for(str(plans.get("plans_name", "nnUNetPlans")))
    return Plan(
        dataset=str(plans["dataset_name"]), gpu_memory_gb=PRESET_GPU_MEMORY_GB.get(preset, 0.0),
        channel_names=channels, labels=dict(dataset_json["labels"]), transpose_forward=tf, transpose_backward=tb,
        original_median_spacing=_untranspose(plans["original_median_spacing_after_transp"], tb, float),
        original_median_shape=_untranspose(plans["original_median_shape_after_transp"], tb, int),
        normalization=norm, configurations=configs, preset=preset,
        reasons={"imported": f"nnU-Net plans {plans.get('plans_name')} of {plans.get('dataset_name')}"},
        regions_class_order=tuple(int(v) for v in dataset_json.get("regions_class_order") or ()))


# --------------------------------------------------------------------------- autoseg -> nnU-Net


def _resampling(order: int, is_seg: bool) -> dict[str, Any]:
    return {"is_seg": is_seg, "order": int(order), "order_z": 0, "force_separate_z": None}


def nnunet_configuration(config: Configuration, plan: Plan, plans_name: str) -> dict[str, Any]:
    """One autoseg configuration as an nnU-Net plans configuration (what nnUNetPredictor reads)."""
    ndim, n = config.ndim, len(config.strides)
    residual = config.encoder == RESIDUAL_ENCODER
    kw: dict[str, Any] = {
        "n_stages": n, "features_per_stage": list(config.features_per_stage),
        "conv_op": f"torch.nn.modules.conv.Conv{ndim}d",
        "kernel_sizes": [list(k) for k in config.kernel_sizes], "strides": [list(s) for s in config.strides],
    }
    if residual:
        kw["n_blocks_per_stage"] = list(config.encoder_blocks_per_stage)
    else:
        kw["n_conv_per_stage"] = [config.n_conv_per_stage] * n
    kw.update({
        "n_conv_per_stage_decoder": [config.n_conv_per_stage] * (n - 1), "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{ndim}d",
        "norm_op_kwargs": {"eps": NORM_EPS, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    })
    inverse = {v: k for k, v in NORMALIZATIONS.items()}
    out: dict[str, Any] = {
        "data_identifier": config.data_identifier or f"{plans_name}_{config.name}",
        "preprocessor_name": "DefaultPreprocessor", "batch_size": config.batch_size,
        "patch_size": list(config.patch_size), "median_image_size_in_voxels": list(config.median_shape),
        "spacing": list(config.spacing),
        "normalization_schemes": [inverse[c.scheme] for c in plan.normalization],
        "use_mask_for_norm": [bool(c.use_nonzero_mask) for c in plan.normalization],
        "resampling_fn_data": RESAMPLING_FN, "resampling_fn_seg": RESAMPLING_FN,
        "resampling_fn_data_kwargs": _resampling(config.resample_order_data, False),
        "resampling_fn_seg_kwargs": _resampling(config.resample_order_seg, True),
        "resampling_fn_probabilities": RESAMPLING_FN, "resampling_fn_probabilities_kwargs": _resampling(1, False),
        "architecture": {"network_class_name": RESIDUAL_CLASS if residual else PLAIN_CLASS, "arch_kwargs": kw,
                         "_kw_requires_import": list(_ARCH_IMPORTS)},
        "batch_dice": bool(config.batch_dice),
    }
    if config.previous_stage:
        out["previous_stage"] = config.previous_stage
    if config.next_stage:
        out["next_stage"] = config.next_stage
    return out


def nnunet_plans(plan: Plan, plans_name: str | None = None) -> dict[str, Any]:
    """The whole autoseg `Plan` as nnU-Net's plans.json."""
    plans_name = plans_name or plans_name_for(plan.preset)
    tf = plan.transpose_forward
    intensity = {}
    for c, norm in enumerate(plan.normalization):
        if norm.scheme == "ct":  # the only scheme that reads them
            intensity[str(c)] = {"mean": norm.mean, "std": norm.std, "percentile_00_5": norm.clip_low,
                                 "percentile_99_5": norm.clip_high, "min": norm.clip_low, "max": norm.clip_high,
                                 "median": norm.mean}
        else:
            intensity[str(c)] = {}
    return {
        "dataset_name": plan.dataset, "plans_name": plans_name,
        "original_median_spacing_after_transp": [plan.original_median_spacing[a] for a in tf],
        "original_median_shape_after_transp": [plan.original_median_shape[a] for a in tf],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": list(tf),
        "transpose_backward": list(plan.transpose_backward),
        "configurations": {name: nnunet_configuration(c, plan, plans_name) for name, c in plan.configurations.items()},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": intensity,
    }


def nnunet_dataset_json(plan: Plan, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """dataset.json for nnU-Net: ``base`` (the raw one, when known) with the plan's channels and labels."""
    out: dict[str, Any] = dict(base or {})
    out["channel_names"] = {str(k): v for k, v in plan.channel_names.items()}
    out["labels"] = {k: list(v) if isinstance(v, tuple) else v for k, v in plan.labels.items()}
    if plan.regions_class_order:
        out["regions_class_order"] = list(plan.regions_class_order)
    out.setdefault("numTraining", 0)
    out.setdefault("file_ending", ".nii.gz")
    return out
