"""The previous stage's segmentation as extra input channels (nnU-Net's 3d_cascade_fullres).

A cascade network sees the image channels followed by one one-hot channel per foreground class
(1..K-1) of the 3d_lowres prediction, on the same grid. The segmentation travels through
sampling and spatial augmentation as a second label channel (so flips, rotations and crops
move it with the image) and is turned into one-hot channels only afterwards, so intensity
augmentation never touches it. During training the one-hot channels are then degraded, so
the network learns to correct the previous stage rather than copy it (nnU-Net's
``ApplyRandomBinaryOperatorTransform`` and ``RemoveRandomConnectedComponentFromOneHotEncodingTransform``,
with its probabilities). As everywhere in `autoseg.data`, parameters are drawn first
(`sample_degradation`) and applied deterministically (`apply_degradation`).

Morphology uses Euclidean distance transforms: dilating by a ball of radius r is "distance
to the mask <= r", eroding is "distance to the background > r". That is exact for a ball,
runs in linear time whatever the radius (a radius-8 structuring element would make scipy's
binary_dilation crawl on a 128^3 patch), and treats the patch border as unknown rather than
as background, so objects touching the border are not eroded from outside the patch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import distance_transform_edt, label

P_MORPHOLOGY_PER_SAMPLE = 0.4
"""Probability that a training sample's one-hot channels get binary operators (nnU-Net: 0.4)."""

P_MORPHOLOGY_PER_CLASS = 1.0
"""Given a selected sample, probability per class channel (nnU-Net's p_per_label: 1)."""

MORPHOLOGY_RADIUS_VOX = (1.0, 8.0)
"""Ball radius range in voxels of the patch (nnU-Net's strel_size (1, 8))."""

MORPHOLOGY_OPERATIONS = ("dilation", "erosion", "opening", "closing")
"""Binary operators drawn with equal probability (nnU-Net's any_of_these)."""

P_REMOVE_COMPONENT_PER_SAMPLE = 0.2
"""Probability that a training sample loses connected components (nnU-Net v2: 0.2)."""

P_REMOVE_COMPONENT_PER_CLASS = 1.0
"""Given a selected sample, probability per class channel of removing one component (nnU-Net: 1)."""

MAX_REMOVED_COMPONENT_FRACTION = 0.15
"""Only components smaller than this fraction of the patch are removed (nnU-Net's 15 %)."""


def one_hot_foreground(seg: np.ndarray, num_classes: int) -> np.ndarray:
    """(K-1, *spatial) float32 masks of classes 1..K-1 of a (*spatial) label map (background has none)."""
    seg = np.asarray(seg)
    return np.stack([seg == k for k in range(1, num_classes)]).astype(np.float32) if num_classes > 1 \
        else np.zeros((0, *seg.shape), np.float32)


@dataclass(frozen=True)
class CascadeDegradation:
    """One sample's drawn degradation; empty tuples mean "not applied".

    ``morphology``: (channel, operation, radius) in application order (a shuffled channel
    order, as nnU-Net). ``remove_component``: (channel, u) where u in [0, 1) picks which of the
    channel's small-enough components is removed.
    """

    morphology: tuple[tuple[int, str, float], ...] = ()
    remove_component: tuple[tuple[int, float], ...] = ()

    @property
    def is_noop(self) -> bool:
        return not self.morphology and not self.remove_component


def sample_degradation(rng: np.random.Generator, num_channels: int) -> CascadeDegradation:
    """Draw one sample's degradation of ``num_channels`` one-hot channels (fixed draw order)."""
    morphology: list[tuple[int, str, float]] = []
    if rng.random() < P_MORPHOLOGY_PER_SAMPLE:
        for c in rng.permutation(num_channels):
            if rng.random() < P_MORPHOLOGY_PER_CLASS:
                op = MORPHOLOGY_OPERATIONS[int(rng.integers(len(MORPHOLOGY_OPERATIONS)))]
                morphology.append((int(c), op, float(rng.uniform(*MORPHOLOGY_RADIUS_VOX))))
    removal: list[tuple[int, float]] = []
    if rng.random() < P_REMOVE_COMPONENT_PER_SAMPLE:
        for c in rng.permutation(num_channels):
            if rng.random() < P_REMOVE_COMPONENT_PER_CLASS:
                removal.append((int(c), float(rng.random())))
    return CascadeDegradation(tuple(morphology), tuple(removal))


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    if mask.all() or not mask.any():
        return mask.copy()
    return distance_transform_edt(~mask) <= radius


def _erode(mask: np.ndarray, radius: float) -> np.ndarray:
    if mask.all() or not mask.any():
        return mask.copy()
    return distance_transform_edt(mask) > radius


def binary_operation(mask: np.ndarray, operation: str, radius: float) -> np.ndarray:
    """Dilation, erosion, opening or closing of a boolean mask by a ball of ``radius`` voxels."""
    if operation == "dilation":
        return _dilate(mask, radius)
    if operation == "erosion":
        return _erode(mask, radius)
    if operation == "opening":
        return _dilate(_erode(mask, radius), radius)
    if operation == "closing":
        return _erode(_dilate(mask, radius), radius)
    raise ValueError(f"unknown binary operation {operation!r} (known: {', '.join(MORPHOLOGY_OPERATIONS)})")


def apply_degradation(one_hot: np.ndarray, params: CascadeDegradation) -> np.ndarray:
    """Apply ``params`` to (K-1, *spatial) one-hot channels; returns a new array, channels stay exclusive.

    Voxels a dilation or closing adds to one class are taken from every other class (nnU-Net
    keeps the encoding one-hot the same way); removed components become background.
    """
    out = np.array(one_hot, dtype=np.float32, copy=True)
    for c, operation, radius in params.morphology:
        mask = out[c] > 0.5
        if not mask.any():
            continue
        new = binary_operation(mask, operation, radius)
        added = new & ~mask
        out[c] = new
        if added.any():
            for other in range(out.shape[0]):
                if other != c:
                    out[other][added] = 0.0
    for c, u in params.remove_component:
        components, n = label(out[c] > 0.5)
        if n == 0:
            continue
        sizes = np.bincount(components.ravel())[1:]
        eligible = np.flatnonzero(sizes < MAX_REMOVED_COMPONENT_FRACTION * components.size) + 1
        if len(eligible):
            out[c][components == eligible[min(int(u * len(eligible)), len(eligible) - 1)]] = 0.0
    return out
