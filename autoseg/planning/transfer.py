"""Plan transfer: give a target dataset the configurations of a source dataset's plans.

``autoseg plan TARGET --from-plans SOURCE`` (nnU-Net's ``move_plans_between_datasets``): a
network pretrained on SOURCE can only be fine-tuned on TARGET (``autoseg train --pretrained``)
when both use the same topology, so TARGET takes SOURCE's configurations whole (transpose,
spacing, patch, batch, strides, kernels, features, cascade), while everything that describes
TARGET's own images comes from TARGET's fingerprint: channel names, labels, the per-channel
normalisation and its intensity statistics, the median shapes. Preprocessing and training then
run on TARGET as usual.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import numpy as np

from autoseg.common.errors import AutosegError
from autoseg.common.paths import Paths
from autoseg.fingerprint import Fingerprint
from autoseg.planning import rules
from autoseg.planning.plan import apply_plan_overrides
from autoseg.planning.plans import Configuration, Plan
from autoseg.planning.store import load_plan, load_plan_file

TRANSFER_REASON = "from the plans of {source}"
"""Prefix of every transferred configuration number's reason, printed by ``autoseg plan``."""


def load_source_plan(paths: Paths, source: str) -> Plan:
    """The plans to transfer: a plans.json file given by path, else the named dataset's plans.json."""
    file = Path(source)
    if file.suffix == ".json":
        if not file.is_file():
            raise AutosegError("plans file not found (--from-plans takes a dataset or a plans.json)", file)
        return load_plan_file(file)
    return load_plan(paths, paths.resolve_dataset(source))


def transfer_plan(source: Plan, fingerprint: Fingerprint, overrides: typing.Sequence[str] = ()) -> Plan:
    """``source``'s configurations for the dataset of ``fingerprint``, with that dataset's own normalisation.

    The input channel count must match (the first conv of a pretrained network takes exactly
    that many); names may differ (e.g. ``T1`` vs ``MRI``), and so may the labels (a different
    class count only re-initialises the segmentation heads when fine-tuning). ``overrides`` are
    ``CONFIG.KEY=VALUE`` strings applied afterwards, as for a planned dataset.
    """
    target = fingerprint.dataset
    if source.dataset == target:
        raise AutosegError("--from-plans names the dataset itself; plan it without --from-plans", target)
    if len(fingerprint.channel_names) != source.num_channels:
        raise AutosegError(f"{target} has {_channels(len(fingerprint.channel_names))} but the plans of "
                           f"{source.dataset} are for {_channels(source.num_channels)}: a network planned "
                           f"there cannot take {target}'s images", target)
    forward = tuple(source.transpose_forward)
    norm = [rules.normalization(fingerprint.channel_names[c], fingerprint.median_relative_size_after_crop,
                                fingerprint.foreground_intensity[i])
            for i, c in enumerate(sorted(fingerprint.channel_names))]
    why = TRANSFER_REASON.format(source=source.dataset)
    reasons = {f"{k}": f"{why}: {v}" for k, v in source.reasons.items() if not k.startswith("normalization[")}
    reasons["transferred_from"] = (f"configurations (transpose, spacing, patch, batch, topology) of "
                                   f"{source.dataset}; normalisation and intensities of {target}'s own fingerprint")
    reasons.update({f"normalization[{i}]": d.reason for i, d in enumerate(norm)})
    spacings, shapes = fingerprint.spacings, fingerprint.shapes_after_crop
    configs = {name: _transfer_configuration(c, why, spacings, shapes, forward)
               for name, c in source.configurations.items()}
    plan = Plan(
        dataset=target, gpu_memory_gb=source.gpu_memory_gb,
        channel_names=dict(fingerprint.channel_names), labels=dict(fingerprint.labels),
        regions_class_order=fingerprint.regions_class_order,
        transpose_forward=source.transpose_forward, transpose_backward=source.transpose_backward,
        original_median_spacing=tuple(float(v) for v in np.median(spacings, axis=0)),  # type: ignore[arg-type]
        original_median_shape=tuple(int(round(v)) for v in np.median(shapes, axis=0)),  # type: ignore[arg-type]
        normalization=tuple(d.value for d in norm), configurations=configs,
        overrides=tuple(source.overrides), reasons=reasons, transferred_from=source.dataset)
    return apply_plan_overrides(plan, overrides) if overrides else plan


def _transfer_configuration(config: Configuration, why: str, spacings: np.ndarray, shapes: np.ndarray,
                            forward: tuple[int, ...]) -> Configuration:
    """``config`` unchanged but for the median shape: the target's cases at the source's spacing."""
    return dataclasses.replace(
        config, median_shape=_median_shape_at(config.spacing, spacings, shapes, forward),
        reasons={**{k: f"{why}: {v}" for k, v in config.reasons.items()},
                 "median_shape": "median of this dataset's cropped shapes resampled to the transferred spacing"})


def _median_shape_at(spacing_t: tuple[float, ...], spacings: np.ndarray, shapes: np.ndarray,
                     forward: tuple[int, ...]) -> tuple[int, ...]:
    """Median case shape (transposed order) at a configuration's spacing; a 2D configuration's spacing
    covers the in-plane axes only, so the slice axis keeps the dataset's median spacing."""
    full_t = list(spacing_t)
    if len(full_t) == 2:
        full_t.insert(0, float(np.median(spacings[:, forward[0]])))
    zyx = np.empty(3)
    zyx[list(forward)] = full_t
    median = np.median(rules.resampled_shapes(spacings, shapes, zyx), axis=0)[list(forward)]
    return tuple(int(round(float(m))) for m in median[-len(spacing_t):])


def _channels(n: int) -> str:
    return f"{n} input channel{'s' if n != 1 else ''}"
