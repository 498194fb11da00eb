"""Connected-component postprocessing, adopted only where cross-validation says it helps.

nnU-Net's rule, in two steps, each decided on the cross-validation predictions:

1. Keep only the largest connected component of all foreground taken together (removed
   voxels become background). Adopted when the mean foreground Dice improves and no
   class's mean Dice gets worse.
2. Then, per foreground class, keep that class's largest component. Adopted for a class
   when its mean Dice improves and no other class's mean Dice gets worse.

Components are 26-connected (full 3D neighbourhood), via ``cc3d``.

Region-based datasets (BraTS style) are scored per region (the mask of every label value a
region covers) and step 2 runs per region: voxels of the region outside its largest
component become background, as nnU-Net does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cc3d
import numpy as np

from autoseg.evaluate.metrics import dice_from_counts, overlap_counts

log = logging.getLogger(__name__)

CONNECTIVITY = 26
"""Voxels touching by a face, edge or corner belong to one component (nnU-Net uses full connectivity)."""

MIN_DICE_GAIN = 1e-6
"""A change smaller than this is numerical noise, not an improvement."""


Targets = Sequence[int] | Mapping[int | str, tuple[int, ...]]
"""What is scored: label values (classes), or key -> label values (regions keyed by name, as in summary.json)."""


def _targets(labels: Targets) -> dict[int | str, tuple[int, ...]]:
    return dict(labels) if isinstance(labels, Mapping) else {int(v): (int(v),) for v in labels}


@dataclass(frozen=True)
class PostprocessingRules:
    """Which largest-component filters to apply, in order (foreground first, then classes, then regions)."""

    keep_largest_foreground: bool = False
    keep_largest_classes: tuple[int, ...] = ()
    keep_largest_regions: tuple[tuple[int, ...], ...] = ()
    """Region-based datasets: the label values of each region filtered to its largest component."""

    @property
    def is_noop(self) -> bool:
        return not (self.keep_largest_foreground or self.keep_largest_classes or self.keep_largest_regions)

    def describe(self) -> str:
        parts = []
        if self.keep_largest_foreground:
            parts.append("largest foreground component")
        if self.keep_largest_classes:
            parts.append("largest component of class(es) " + ", ".join(map(str, self.keep_largest_classes)))
        if self.keep_largest_regions:
            parts.append("largest component of region(s) " + ", ".join(str(list(r)) for r in self.keep_largest_regions))
        return "; ".join(parts) if parts else "none"


def largest_component_mask(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (empty stays empty)."""
    if not mask.any():
        return mask.copy()
    labels, n = cc3d.connected_components(mask.astype(np.uint8), connectivity=CONNECTIVITY, return_N=True)
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def keep_largest_foreground(seg: np.ndarray) -> np.ndarray:
    """Set every foreground voxel outside the largest all-foreground component to background."""
    keep = largest_component_mask(seg > 0)
    out = seg.copy()
    out[(seg > 0) & ~keep] = 0
    return out


def keep_largest_of_class(seg: np.ndarray, label: int | tuple[int, ...]) -> np.ndarray:
    """Set voxels of ``label`` (or of a region's labels) outside its largest component to background."""
    mask = np.isin(seg, label)
    keep = largest_component_mask(mask)
    out = seg.copy()
    out[mask & ~keep] = 0
    return out


def apply_postprocessing(seg: np.ndarray, rules: PostprocessingRules) -> np.ndarray:
    """Apply the adopted rules to one label map (z, y, x)."""
    out = seg
    if rules.keep_largest_foreground:
        out = keep_largest_foreground(out)
    for label in (*rules.keep_largest_classes, *rules.keep_largest_regions):
        out = keep_largest_of_class(out, label)
    return out


def class_dice(seg: np.ndarray, ref: np.ndarray, labels: Targets,
               ignore_label: int | None = None) -> dict[int | str, float]:
    """Dice per label (or region); voxels that are ``ignore_label`` in the reference count for nothing."""
    if ignore_label is not None:
        seg = np.where(ref == ignore_label, ignore_label, seg)
    return {k: dice_from_counts(*overlap_counts(np.isin(seg, v), np.isin(ref, v))) for k, v in _targets(labels).items()}


def _mean_dice(segs: Sequence[np.ndarray], refs: Sequence[np.ndarray], labels: Targets,
               ignore_label: int | None) -> dict[int | str, float]:
    per_case = [class_dice(s, r, labels, ignore_label) for s, r in zip(segs, refs)]
    return {v: float(np.mean([d[v] for d in per_case])) for v in labels}


def _better(after: dict[int | str, float], before: dict[int | str, float], target: Sequence[int | str]) -> bool:
    """Target classes improve on average and no class gets worse."""
    gain = np.mean([after[v] for v in target]) - np.mean([before[v] for v in target])
    worse = any(after[v] < before[v] - MIN_DICE_GAIN for v in before)
    return bool(gain > MIN_DICE_GAIN and not worse)


@dataclass(frozen=True)
class PostprocessingDecision:
    """The adopted rules and the cross-validation mean Dice per class before and after."""

    rules: PostprocessingRules
    dice_before: dict[int | str, float]
    dice_after: dict[int | str, float]


def determine_postprocessing(segs: Sequence[np.ndarray], refs: Sequence[np.ndarray],
                             foreground_labels: Targets,
                             ignore_label: int | None = None) -> PostprocessingDecision:
    """Decide the rules on cross-validation label maps (predictions and references, paired).

    Rules act on the whole prediction; only the scoring leaves out the reference's
    ``ignore_label`` voxels (sparse annotations).
    """
    if len(segs) != len(refs) or not segs:
        raise ValueError("need the same, non-zero number of predictions and references")
    targets = _targets(foreground_labels)
    labels = list(targets)
    base = _mean_dice(segs, refs, targets, ignore_label)
    current, current_dice = list(segs), base
    fg_rule = False
    candidate = [keep_largest_foreground(s) for s in current]
    cand_dice = _mean_dice(candidate, refs, targets, ignore_label)
    if _better(cand_dice, current_dice, labels):
        fg_rule, current, current_dice = True, candidate, cand_dice
        log.info("postprocessing: keeping the largest foreground component helps")
    class_rules, region_rules = [], []
    for v in labels:
        candidate = [keep_largest_of_class(s, targets[v]) for s in current]
        cand_dice = _mean_dice(candidate, refs, targets, ignore_label)
        if _better(cand_dice, current_dice, [v]):
            (region_rules.append(targets[v]) if isinstance(v, str) else class_rules.append(v))
            current, current_dice = candidate, cand_dice
            log.info("postprocessing: keeping the largest component of %s %s helps",
                     "region" if isinstance(v, str) else "class", v)
    rules = PostprocessingRules(fg_rule, tuple(class_rules), tuple(region_rules))
    return PostprocessingDecision(rules, base, current_dice)
