"""Planning: compose the pure rules into a `Plan`, and apply user overrides to it.

``plan_dataset(fingerprint, gpu_memory_gb)`` is pure (no I/O): the dataset-level decisions
(`rules`) and one `Configuration` per 2d / 3d_fullres / 3d_lowres / 3d_cascade_fullres, fitted
to the memory budget of a planner preset (`presets`). ``apply_plan_overrides`` applies
``CONFIG.KEY=VALUE`` strings and re-derives what depends on them. `autoseg.planning.store`
saves and loads plans.json; `autoseg.planning.planner.plan_and_save` is what ``autoseg plan`` runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import types
import typing
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from autoseg.common.errors import AutosegError, ConfigError
from autoseg.dataset.spec import class_labels
from autoseg.fingerprint import Fingerprint
from autoseg.planning import memory, rules
from autoseg.planning.plans import RESIDUAL_ENCODER, Configuration, Plan
from autoseg.planning.presets import DEFAULT_PRESET, Preset, get_preset

log = logging.getLogger(__name__)

CONFIG_NAMES = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
"""The configurations the planner knows, as nnU-Net names them."""

LOWRES_STAGES = ("3d_lowres", "3d_cascade_fullres")
"""Naming either in ``configs`` forces the two-stage cascade even where the 25 % rule would not plan it."""

CASCADE_PREVIOUS_STAGE = "3d_lowres"
"""The stage whose predictions 3d_cascade_fullres takes as extra input channels."""

NOT_OVERRIDABLE = ("name", "reasons", "estimated_vram_gb", "encoder")
"""Configuration fields `--set` cannot change: identity, values always derived from the others,
and the network family (chosen with ``--preset``)."""

USER_REASON = "set by user ({})"


# --------------------------------------------------------------------------- planning


def plan_configuration(name: str, spacing: tuple[float, ...], median_shape: np.ndarray, dataset_voxels: float,
                       num_classes: int, gpu_memory_gb: float, preset: Preset | None = None) -> Configuration:
    """One configuration at a given target spacing and median shape (both in transposed order).

    Patch and topology fitted to the memory budget, batch size from the budget and the 5 %
    dataset cap (`rules.batch_size`). ``dataset_voxels`` is the median image's voxels times the
    number of cases at this configuration's resolution (nnU-Net passes the 3D count to 2D too).
    ``preset`` (default: the plain U-Net) sets the network, its memory calibration and the cap.
    """
    preset = preset or get_preset(DEFAULT_PRESET)
    ndim = len(spacing)
    fit = rules.fit_patch_to_budget(spacing, median_shape, num_classes, gpu_memory_gb, preset)
    topo = fit.value.topology
    feats = rules.features_per_stage(len(topo.strides), ndim)
    bs = rules.batch_size(fit.value.feature_map_voxels, topo.patch_size, ndim, gpu_memory_gb, dataset_voxels,
                          preset)
    ref = preset.reference
    vram = memory.estimated_vram_gb(fit.value.feature_map_voxels, bs.value, ndim, ref)
    cap = rules.MAX_FEATURES_3D if ndim == 3 else rules.MAX_FEATURES_2D
    reasons = {
        "patch_size": fit.reason,
        "batch_size": bs.reason,
        "strides": (f"pools per axis {list(topo.num_pools)}: an axis is halved while its feature map stays >= "
                    f"{rules.MIN_FEATURE_MAP_EDGE_VOX} and its spacing is < {rules.POOL_SPACING_RATIO:g}x the finest"),
        "kernel_sizes": (f"3 along an axis once its spacing is within {rules.POOL_SPACING_RATIO:g}x of the finest, "
                         "1 before (thick slices are not mixed early)"),
        "features_per_stage": f"{rules.BASE_FEATURES} doubling per stage, capped at {cap} ({ndim}D)",
        "estimated_vram_gb": (f"{fit.value.feature_map_voxels / 1e6:.1f} M feature-map voxels per sample x batch "
                              f"{bs.value}, against nnU-Net's reference of {memory.reference_voxels(ndim, ref) / 1e6:g} M "
                              f"x {memory.reference_batch_size(ndim, ref)} for {ref.gpu_memory_gb:g} GB, plus "
                              f"{memory.FIXED_OVERHEAD_GB:g} GB fixed"),
        "median_shape": "median of the cases' cropped shapes resampled to the target spacing",
    }
    blocks: tuple[int, ...] = ()
    if preset.encoder == RESIDUAL_ENCODER:
        blocks = preset.blocks_for(len(topo.strides))
        reasons["encoder"] = (f"residual encoder ({preset.name}): a stem conv, then {list(blocks)} basic blocks per "
                              f"stage; {preset.decoder_convs} conv per decoder stage (nnU-Net ResEnc)")
    return Configuration(
        name=name, data_identifier=name, spacing=tuple(float(s) for s in spacing),
        patch_size=topo.patch_size, batch_size=bs.value,
        median_shape=tuple(int(round(float(m))) for m in median_shape),
        strides=topo.strides, kernel_sizes=topo.kernel_sizes, features_per_stage=feats,
        n_conv_per_stage=preset.decoder_convs, encoder=preset.encoder, encoder_blocks_per_stage=blocks,
        estimated_vram_gb=vram, reasons=reasons)


def _lowres(full: Configuration, median: np.ndarray, n_cases: int, num_classes: int,
            gpu_memory_gb: float, forced: bool = False, preset: Preset | None = None
            ) -> tuple[Configuration | None, str]:
    """nnU-Net's 3d_lowres search: coarsen the spacing 3 % at a time until the patch covers 25 %.

    ``forced`` (the user named the cascade in ``configs``) keeps coarsening until the median
    image is also at least `rules.LOWRES_MIN_VOXEL_RATIO` x smaller, so small datasets get a
    real low-resolution stage instead of none.
    """
    need = rules.lowres_needed(full.patch_size, median)
    if not need.value and not forced:
        return None, need.reason
    full_spacing = np.asarray(full.spacing)
    spacing = tuple(full.spacing)
    median_voxels = float(np.prod(median, dtype=np.float64))
    patch_voxels = float(np.prod(full.patch_size, dtype=np.float64))
    full_voxels = median_voxels
    low: Configuration | None = None
    while (patch_voxels / median_voxels < rules.LOWRES_MIN_PATCH_COVERAGE
           or (forced and (low is None or full_voxels / median_voxels < rules.LOWRES_MIN_VOXEL_RATIO))):
        spacing = rules.next_lowres_spacing(spacing)
        scaled = full_spacing / np.asarray(spacing) * median
        median_voxels = float(np.prod(scaled, dtype=np.float64))
        low = plan_configuration("3d_lowres", spacing, np.round(scaled), median_voxels * n_cases,
                                 num_classes, gpu_memory_gb, preset)
        patch_voxels = float(np.prod(low.patch_size, dtype=np.float64))
    ratio = full_voxels / median_voxels
    if low is None or ratio < rules.LOWRES_MIN_VOXEL_RATIO:
        return None, (f"{need.reason}, but a low-resolution image would be only {ratio:.2f}x smaller "
                      f"(< {rules.LOWRES_MIN_VOXEL_RATIO:g}x): dropped")
    why = (f"{need.reason}; spacing grown {rules.LOWRES_SPACING_STEP - 1:.0%} per step (coarse-enough axes wait) "
           f"until the patch covers {rules.LOWRES_MIN_PATCH_COVERAGE:.0%} of the median image")
    if forced and not need.value:
        why = (f"forced (cascade named in --configs; {need.reason}); spacing grown "
               f"{rules.LOWRES_SPACING_STEP - 1:.0%} per step until the median image is "
               f">= {rules.LOWRES_MIN_VOXEL_RATIO:g}x smaller")
        need = rules.Decision(True, "forced: the cascade was named in --configs")
    reasons = {**low.reasons, "spacing": why, "batch_dice": "False for 3d_lowres (nnU-Net)",
               "next_stage": "3d_cascade_fullres refines this stage's predictions (nnU-Net's cascade)"}
    # a preset's lowres spacing is its own (its patch differs): it must not share the default's data
    # (nnU-Net's ResEnc planners name it <plans>_3d_lowres too); 2d / 3d_fullres data are shared
    ident = low.name if preset is None or preset.name == DEFAULT_PRESET else f"{preset.name}_{low.name}"
    return replace(low, data_identifier=ident, batch_dice=False, next_stage="3d_cascade_fullres",
                   reasons=reasons), need.reason


def cascade_configuration(full: Configuration) -> Configuration:
    """3d_cascade_fullres: 3d_fullres plus ``previous_stage``; it shares 3d_fullres' preprocessed data."""
    return replace(full, name="3d_cascade_fullres", previous_stage=CASCADE_PREVIOUS_STAGE, reasons={
        **full.reasons, "previous_stage": (f"{CASCADE_PREVIOUS_STAGE}'s segmentation enters as one-hot input "
                                           "channels (nnU-Net's cascade); data shared with 3d_fullres")})


def check_config_names(configs: typing.Iterable[str] | None) -> tuple[str, ...]:
    """The requested configuration names (default: all of `CONFIG_NAMES`), each checked."""
    if configs is None:
        return CONFIG_NAMES
    names = tuple(configs)
    for n in names:
        if n not in CONFIG_NAMES:
            raise ConfigError(f"unknown configuration {n!r}{_did_you_mean(n, CONFIG_NAMES)} "
                              f"(known: {', '.join(CONFIG_NAMES)})", "--configs")
    if not names:
        raise ConfigError("no configuration requested", "--configs")
    return names


@dataclass(frozen=True)
class _Target:
    """The dataset at its target spacing (transposed order): what every configuration is planned from."""

    spacing: tuple[float, ...]
    median_shape: np.ndarray
    n_cases: int
    num_classes: int
    """Output channels: the ignore label (sparse annotation) gets none, so no memory either."""
    gpu_memory_gb: float
    preset: Preset

    @property
    def dataset_voxels(self) -> float:
        """The median image's voxels times the number of cases (nnU-Net passes the 3D count to 2D too)."""
        return float(np.prod(self.median_shape, dtype=np.float64)) * self.n_cases


def plan_dataset(fingerprint: Fingerprint, gpu_memory_gb: float | None = None,
                 configs: tuple[str, ...] | None = None, overrides: typing.Sequence[str] = (),
                 preset: str = DEFAULT_PRESET) -> Plan:
    """The plan of a dataset: dataset-level decisions plus 2d / 3d_fullres / 3d_lowres, then overrides.

    ``gpu_memory_gb`` is the memory budget of one training (default: the preset's target, 8 GB
    for nnU-Net's default planner); ``configs`` restricts which configurations are planned
    (3d_lowres only appears when the rules call for it); ``overrides`` are ``CONFIG.KEY=VALUE``
    strings (`apply_plan_overrides`); ``preset`` names a planner preset (`autoseg.planning.presets`).
    """
    chosen = get_preset(preset)
    if gpu_memory_gb is None:
        gpu_memory_gb = chosen.default_gpu_memory_gb
    if not gpu_memory_gb > 0:
        raise ConfigError(f"GPU memory must be > 0 GB, got {gpu_memory_gb:g}", "--gpu-memory")
    if not fingerprint.cases:
        raise AutosegError("the fingerprint holds no cases", fingerprint.dataset)
    names = check_config_names(configs)
    spacings, shapes = fingerprint.spacings, fingerprint.shapes_after_crop
    target = rules.target_spacing(spacings, shapes)
    transpose = rules.transpose_axes(target.value)
    forward = list(transpose.value[0])
    median = np.median(rules.resampled_shapes(spacings, shapes, target.value), axis=0)[forward]
    grid = _Target(spacing=tuple(target.value[a] for a in forward), median_shape=median,
                   n_cases=len(fingerprint.cases), num_classes=len(class_labels(fingerprint.labels)),
                   gpu_memory_gb=gpu_memory_gb, preset=chosen)
    reasons = {"transpose": transpose.reason, "target_spacing": target.reason}
    if chosen.name != DEFAULT_PRESET:
        reasons["preset"] = f"{chosen.name}: {chosen.description}"
    out: dict[str, Configuration] = {}
    if median[0] == 1:
        reasons["3d_fullres"] = reasons["3d_lowres"] = "not planned: the images are 2D (one slice)"
    elif any(n in names for n in ("3d_fullres", *LOWRES_STAGES)):
        three, why = _plan_3d(grid, names, configs, target.reason)
        out.update(three)
        reasons.update(why)
    if "2d" in names:
        two = plan_configuration("2d", grid.spacing[1:], median[1:], grid.dataset_voxels, grid.num_classes,
                                 gpu_memory_gb, chosen)
        out["2d"] = replace(two, reasons={**two.reasons, "spacing": "in-plane part of the target spacing; "
                                          "the slice axis keeps its own spacing",
                                          "batch_dice": "True for 2d (nnU-Net)"})
    norm = [rules.normalization(fingerprint.channel_names[c], fingerprint.median_relative_size_after_crop,
                                fingerprint.foreground_intensity[i])
            for i, c in enumerate(sorted(fingerprint.channel_names))]
    reasons.update({f"normalization[{i}]": d.reason for i, d in enumerate(norm)})
    plan = Plan(
        dataset=fingerprint.dataset, gpu_memory_gb=float(gpu_memory_gb),
        channel_names=dict(fingerprint.channel_names), labels=dict(fingerprint.labels), regions_class_order=fingerprint.regions_class_order,
        transpose_forward=transpose.value[0], transpose_backward=transpose.value[1],
        original_median_spacing=tuple(float(v) for v in np.median(spacings, axis=0)),  # type: ignore[arg-type]
        original_median_shape=tuple(int(round(v)) for v in np.median(shapes, axis=0)),  # type: ignore[arg-type]
        normalization=tuple(d.value for d in norm),
        configurations={n: out[n] for n in CONFIG_NAMES if n in out}, preset=chosen.name,
        reasons=reasons)
    return apply_plan_overrides(plan, overrides) if overrides else plan


def _plan_3d(grid: _Target, names: tuple[str, ...], configs: tuple[str, ...] | None,
             spacing_reason: str) -> tuple[dict[str, Configuration], dict[str, str]]:
    """3d_fullres, and 3d_lowres + 3d_cascade_fullres where the rules (or ``configs``) call for them.

    Returns the configurations among ``names`` and the plan-level reasons about the cascade.
    """
    full = plan_configuration("3d_fullres", grid.spacing, grid.median_shape, grid.dataset_voxels, grid.num_classes,
                              grid.gpu_memory_gb, grid.preset)
    forced = configs is not None and any(n in names for n in LOWRES_STAGES)
    low, low_reason = _lowres(full, grid.median_shape, grid.n_cases, grid.num_classes, grid.gpu_memory_gb, forced,
                              grid.preset)
    reasons = {"3d_lowres": low_reason}
    full = replace(full, batch_dice=low is not None, reasons={
        **full.reasons, "spacing": spacing_reason,
        "batch_dice": ("True: 3d_lowres exists, fullres trains on its crops (nnU-Net)" if low is not None
                       else "False: no 3d_lowres; Dice per sample (nnU-Net)")})
    out: dict[str, Configuration] = {}
    if "3d_fullres" in names:
        out["3d_fullres"] = full
    if low is not None and (configs is None or forced):
        # the cascade comes whole: a lowres stage without its next stage is still worth
        # training (nnU-Net plans both), and the next stage cannot exist without it
        out["3d_lowres"] = low
        out["3d_cascade_fullres"] = cascade_configuration(full)
        reasons["3d_cascade_fullres"] = "planned with 3d_lowres: it refines the lowres predictions"
    elif low is None:
        reasons["3d_cascade_fullres"] = "not planned: no 3d_lowres"
    return out, reasons


# --------------------------------------------------------------------------- overrides


def _did_you_mean(word: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _overridable() -> dict[str, Any]:
    hints = typing.get_type_hints(Configuration)
    return {f.name: hints[f.name] for f in dataclasses.fields(Configuration) if f.name not in NOT_OVERRIDABLE}


def _parse_value(tp: Any, text: str, where: str) -> Any:
    """``text`` as a value of the Configuration field type ``tp`` (ints, floats, bools, tuples, None)."""
    text = text.strip()
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    try:
        if origin in (typing.Union, types.UnionType):
            if text.lower() in ("none", "null", ""):
                return None
            return _parse_value(next(a for a in args if a is not type(None)), text, where)
        if origin is tuple:
            return _parse_tuple(args[0], text, where)
        if tp is bool:
            low = text.lower()
            if low not in ("true", "false", "yes", "no", "1", "0"):
                raise ValueError(text)
            return low in ("true", "yes", "1")
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            if not text:
                raise ValueError(text)
            return text
    except (ValueError, TypeError, json.JSONDecodeError, StopIteration):
        raise ConfigError(f"cannot read {text!r} as {_type_name(tp)}", where) from None
    raise ConfigError(f"cannot override a value of type {tp}", where)


def _parse_tuple(item: Any, text: str, where: str) -> tuple:
    """``48,64,48`` / ``[48, 64, 48]``; nested: ``1,1,1;2,2,2`` / ``[[1,1,1],[2,2,2]]``."""
    if text.startswith("["):
        raw = json.loads(text)
        if not isinstance(raw, list):
            raise ValueError(text)
        parts = [json.dumps(p) if isinstance(p, list) else str(p) for p in raw]
    else:
        parts = [p for p in text.replace(" ", "").split(";" if typing.get_origin(item) is tuple else ",")]
    if not parts or any(p == "" for p in parts):
        raise ValueError(text)
    return tuple(_parse_value(item, p, where) for p in parts)


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true/false", str: "a name"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) is tuple:
        inner = typing.get_args(tp)[0]
        if typing.get_origin(inner) is tuple:
            return "a list of per-axis lists like 1,1,1;2,2,2 or [[1,1,1],[2,2,2]]"
        return f"a comma-separated list of {'integers' if inner is int else 'numbers'} like 48,64,48"
    return "a name or none"


def check_override_syntax(overrides: typing.Sequence[str]) -> None:
    """Check ``CONFIG.KEY=VALUE`` strings without a plan: known configuration name, key and value type."""
    fields = _overridable()
    for text in overrides:
        key, sep, value = text.partition("=")
        config, dot, name = key.strip().rpartition(".")
        if not sep or not dot or not config or not name:
            raise ConfigError("expected CONFIG.KEY=VALUE, e.g. 3d_fullres.patch_size=48,64,48", text)
        if config not in CONFIG_NAMES:
            raise ConfigError(f"unknown configuration {config!r}{_did_you_mean(config, CONFIG_NAMES)} "
                              f"(known: {', '.join(CONFIG_NAMES)})", key)
        if name not in fields:
            raise ConfigError(f"unknown key {name!r}{_did_you_mean(name, fields)} (keys: {', '.join(fields)})", key)
        _parse_value(fields[name], value, key)


def parse_overrides(overrides: typing.Sequence[str], plan: Plan) -> dict[str, dict[str, tuple[Any, str]]]:
    """``["3d_fullres.patch_size=48,64,48"]`` -> ``{"3d_fullres": {"patch_size": ((48, 64, 48), text)}}``.

    Unknown configurations or keys fail with a "did you mean"; values are parsed against the
    `Configuration` field types.
    """
    fields = _overridable()
    out: dict[str, dict[str, tuple[Any, str]]] = {}
    for text in overrides:
        key, sep, value = text.partition("=")
        config, dot, name = key.strip().rpartition(".")
        if not sep or not dot or not config or not name:
            raise ConfigError("expected CONFIG.KEY=VALUE, e.g. 3d_fullres.patch_size=48,64,48", text)
        if config not in plan.configurations:
            raise ConfigError(f"configuration {config!r} is not in the plan{_did_you_mean(config, plan.configurations)} "
                              f"(planned: {', '.join(plan.configurations)})", key)
        if name not in fields:
            raise ConfigError(f"unknown key {name!r}{_did_you_mean(name, fields)} (keys: {', '.join(fields)})", key)
        out.setdefault(config, {})[name] = (_parse_value(fields[name], value, key), text)
    return out


def apply_plan_overrides(plan: Plan, overrides: typing.Sequence[str]) -> Plan:
    """Apply ``CONFIG.KEY=VALUE`` overrides, re-deriving what depends on them, and record them.

    Overriding ``patch_size`` or ``spacing`` re-derives strides and kernels for that patch
    (unless they are overridden too); a changed stage count re-derives ``features_per_stage``;
    a changed spacing rescales ``median_shape`` and gets its own ``data_identifier``. The
    memory estimate is always recomputed. Inconsistent results are a `ConfigError`.
    """
    parsed = parse_overrides(overrides, plan)
    configs = dict(plan.configurations)
    for name, changes in parsed.items():
        configs[name] = _override_configuration(configs[name], changes, plan)
    for cfg in configs.values():
        for link in (cfg.previous_stage, cfg.next_stage):
            if link is not None and link not in configs:
                raise ConfigError(f"stage {link!r} is not a configuration of the plan", f"{cfg.name}")
    return replace(plan, configurations=configs, overrides=tuple(plan.overrides) + tuple(overrides))


def _override_configuration(cfg: Configuration, changes: dict[str, tuple[Any, str]], plan: Plan) -> Configuration:
    values = {k: v for k, (v, _) in changes.items()}
    reasons = dict(cfg.reasons)
    reasons.update({k: USER_REASON.format(text) for k, (_, text) in changes.items()})
    new = replace(cfg, **values)
    where = f"{cfg.name}.{next(iter(changes))}"
    for key in ("spacing", "patch_size"):
        if len(getattr(new, key)) != cfg.ndim:
            raise ConfigError(f"{key} needs {cfg.ndim} values for {cfg.name}, got {len(getattr(new, key))}",
                              f"{cfg.name}.{key}")
    if any(s <= 0 for s in new.spacing) or any(p < 1 for p in new.patch_size) or new.batch_size < 1:
        raise ConfigError("spacing must be > 0, patch_size and batch_size >= 1", where)
    derived: dict[str, Any] = {}
    if "spacing" in values:
        derived["median_shape"] = tuple(int(round(m * o / n)) for m, o, n in
                                        zip(cfg.median_shape, cfg.spacing, new.spacing))
        if "data_identifier" not in values:
            derived["data_identifier"] = f"{cfg.name}_{'x'.join(f'{s:g}' for s in new.spacing)}"
    if ("spacing" in values or "patch_size" in values) and "strides" not in values:
        topo = rules.network_topology(new.spacing, new.patch_size)
        bad = [a for a in range(cfg.ndim) if new.patch_size[a] % topo.divisor[a]]
        if bad:
            a, d = bad[0], topo.divisor[bad[0]]
            lower = new.patch_size[a] // d * d
            raise ConfigError(f"patch_size {new.patch_size[a]} along axis {a} is not a multiple of {d} (the U-Net "
                              f"pools it {topo.num_pools[a]}x); use {lower or d} or {lower + d}",
                              f"{cfg.name}.patch_size")
        derived["strides"] = topo.strides
        if "kernel_sizes" not in values:
            derived["kernel_sizes"] = topo.kernel_sizes
    elif "strides" in values and "kernel_sizes" not in values:
        derived["kernel_sizes"] = _kernels_for_strides(new.spacing, new.strides)
    new = replace(new, **derived)
    if len(new.features_per_stage) != len(new.strides) and "features_per_stage" not in values:
        new = replace(new, features_per_stage=rules.features_per_stage(len(new.strides), cfg.ndim))
        derived["features_per_stage"] = new.features_per_stage
    if (new.encoder == RESIDUAL_ENCODER and len(new.encoder_blocks_per_stage) != len(new.strides)
            and "encoder_blocks_per_stage" not in values):
        new = replace(new, encoder_blocks_per_stage=get_preset(plan.preset).blocks_for(len(new.strides)))
        derived["encoder_blocks_per_stage"] = new.encoder_blocks_per_stage
    _check_topology(new)
    for k in derived:
        if k not in values:
            reasons[k] = f"re-derived after {', '.join(values)} was set by user"
    voxels = feature_map_voxels(new, plan.num_classes)
    ref = get_preset(plan.preset).reference
    vram = memory.estimated_vram_gb(voxels, new.batch_size, cfg.ndim, ref)
    fits = (voxels * new.batch_size
            <= memory.voxel_budget(cfg.ndim, plan.gpu_memory_gb, ref) * memory.reference_batch_size(cfg.ndim, ref))
    reasons["estimated_vram_gb"] = (f"recomputed after overrides: {voxels / 1e6:.1f} M feature-map voxels per sample x "
                                    f"batch {new.batch_size}" + ("" if fits else
                                    f"; EXCEEDS the {plan.gpu_memory_gb:g} GB budget"))
    if not fits:
        log.warning("%s: the overridden configuration exceeds the %g GB budget (estimate %.1f GB)",
                    cfg.name, plan.gpu_memory_gb, vram)
    return replace(new, estimated_vram_gb=vram, reasons=reasons)


def feature_map_voxels(cfg: Configuration, num_classes: int) -> int:
    """The memory model's count for a configuration's own network (plain or residual encoder)."""
    if cfg.encoder == RESIDUAL_ENCODER:
        return memory.residual_feature_map_voxels(cfg.patch_size, cfg.strides, cfg.features_per_stage, num_classes,
                                                  cfg.encoder_blocks_per_stage, cfg.n_conv_per_stage)
    return memory.conv_feature_map_voxels(cfg.patch_size, cfg.strides, cfg.features_per_stage, num_classes,
                                          cfg.n_conv_per_stage)


def _kernels_for_strides(spacing: tuple[float, ...], strides: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    """Kernels for user-given strides, by `rules.network_topology`'s rule: 3 along an axis once its
    spacing (after the strides so far) is within 2x of the finest, and 3 everywhere in the bottleneck."""
    cur = np.asarray(spacing, dtype=float)
    kernel = [1] * len(spacing)
    out: list[tuple[int, ...]] = []
    for stride in strides[:-1]:
        cur = cur * np.asarray(stride)
        kernel = [3 if k == 3 or c / cur.min() < rules.POOL_SPACING_RATIO else 1 for k, c in zip(kernel, cur)]
        out.append(tuple(kernel))
    return (*out, (3,) * len(spacing))


def _check_topology(cfg: Configuration) -> None:
    where = f"{cfg.name}.strides"
    n = len(cfg.strides)
    if len(cfg.kernel_sizes) != n or len(cfg.features_per_stage) != n:
        raise ConfigError(f"{n} stages in strides but {len(cfg.kernel_sizes)} kernel_sizes and "
                          f"{len(cfg.features_per_stage)} features_per_stage", where)
    for per_axis in (*cfg.strides, *cfg.kernel_sizes):
        if len(per_axis) != cfg.ndim or any(v < 1 for v in per_axis):
            raise ConfigError(f"every stage needs {cfg.ndim} positive values, got {list(per_axis)}", where)
    total = np.prod(np.array(cfg.strides), axis=0)
    for a, (p, t) in enumerate(zip(cfg.patch_size, total)):
        if p % int(t):
            raise ConfigError(f"patch_size {p} along axis {a} is not a multiple of the total stride {int(t)}",
                              f"{cfg.name}.patch_size")
    if any(f < 1 for f in cfg.features_per_stage) or cfg.n_conv_per_stage < 1:
        raise ConfigError("features_per_stage and n_conv_per_stage must be >= 1", f"{cfg.name}.features_per_stage")
    if cfg.encoder == RESIDUAL_ENCODER and (len(cfg.encoder_blocks_per_stage) != n
                                            or any(b < 1 for b in cfg.encoder_blocks_per_stage)):
        raise ConfigError(f"a residual encoder needs {n} positive encoder_blocks_per_stage, got "
                          f"{list(cfg.encoder_blocks_per_stage)}", f"{cfg.name}.encoder_blocks_per_stage")
    if not (0 <= cfg.resample_order_data <= 5 and 0 <= cfg.resample_order_seg <= 5):
        raise ConfigError("resampling orders are spline orders 0..5", f"{cfg.name}.resample_order_data")
