"""Connected-component postprocessing, adopted only where cross-validation says it helps.

nnU-Net's rule, in two steps, each decided on the cross-validation predictions:

1. Keep only the largest connected component of all foreground taken together (removed
   voxels become background). Adopted when the mean foreground Dice improves and no
   class's mean Dice gets worse.
2. Then, per foreground class, keep that class's largest component. Adopted for a class
   when its mean Dice improves and no other class's mean Dice gets worse.

Components are 26-connected (full 3D neighbourhood), via ``cc3d``. Mean Dice skips NaN
(a class absent from both reference and prediction, nnU-Net's ``nanmean``): removing a
stray island from a case without that class makes its Dice NaN, not 1, so cases without a
class cannot outvote the cases that have it.

The decision streams: `PostprocessingTally` takes one (prediction, reference) pair at a
time and keeps four Dice numbers per class, so only one case is in memory. That is exact:
a class's largest-component rule changes only that class's voxels (to background), so
each class's rule is judged on its own Dice, with or without the foreground rule.

Region-based datasets (BraTS style) are scored per region (the mask of every label value a
region covers) and step 2 runs per region: voxels of the region outside its largest
component become background, as nnU-Net does. Regions overlap, so a region's rule changes
other regions' Dice: the tally then scores every combination of the rules per case
(2^(regions+1) label maps, made one rule at a time, depth-first: at most regions+2 maps in
memory) and the decision walks those combinations, still one case in memory.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

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


def nanmean(values: Iterable[float]) -> float:
    """Mean of the values that are not NaN; NaN when there are none (no warning, unlike numpy)."""
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def _better(after: dict[int | str, float], before: dict[int | str, float], target: Sequence[int | str]) -> bool:
    """Target classes improve on average and no class gets worse (NaN-aware means)."""
    gain = nanmean(after[v] for v in target) - nanmean(before[v] for v in target)
    worse = any(after[v] < before[v] - MIN_DICE_GAIN for v in before)  # NaN (no case left) is not worse
    return bool(gain > MIN_DICE_GAIN and not worse)


@dataclass(frozen=True)
class PostprocessingDecision:
    """The adopted rules and the cross-validation mean Dice per class before and after."""

    rules: PostprocessingRules
    dice_before: dict[int | str, float]
    dice_after: dict[int | str, float]


@dataclass
class PostprocessingTally:
    """Per-case Dice of every rule outcome, accumulated one case at a time (see the module doc).

    Classes: for each class, Dice as predicted (``base``), after the foreground rule (``fg``),
    and after the class's own rule applied to either of those (``base_cls``, ``fg_cls``).
    Regions: Dice of every region for every combination of the rules (``combos``, keyed by
    which of foreground, region 1, region 2, ... is applied).
    """

    foreground_labels: Targets
    ignore_label: int | None = None
    base: dict[int | str, list[float]] = field(default_factory=dict)
    fg: dict[int | str, list[float]] = field(default_factory=dict)
    base_cls: dict[int | str, list[float]] = field(default_factory=dict)
    fg_cls: dict[int | str, list[float]] = field(default_factory=dict)
    combos: dict[tuple[bool, ...], dict[int | str, list[float]]] = field(default_factory=dict)

    @property
    def targets(self) -> dict[int | str, tuple[int, ...]]:
        return _targets(self.foreground_labels)

    @property
    def has_regions(self) -> bool:
        return any(isinstance(k, str) for k in self.targets)

    def add(self, seg: np.ndarray, ref: np.ndarray) -> None:
        """Score one cross-validation case (its label maps are not kept)."""
        targets = self.targets
        if self.has_regions:
            self._add_combos(seg, ref, targets)
            return
        fg_seg = keep_largest_foreground(seg)
        scores = {"base": class_dice(seg, ref, targets, self.ignore_label),
                  "fg": class_dice(fg_seg, ref, targets, self.ignore_label)}
        for v, values in targets.items():
            for name, value in scores.items():
                getattr(self, name).setdefault(v, []).append(value[v])
            self.base_cls.setdefault(v, []).append(
                class_dice(keep_largest_of_class(seg, values), ref, {v: values}, self.ignore_label)[v])
            self.fg_cls.setdefault(v, []).append(
                class_dice(keep_largest_of_class(fg_seg, values), ref, {v: values}, self.ignore_label)[v])

    def _add_combos(self, seg: np.ndarray, ref: np.ndarray, targets: dict[int | str, tuple[int, ...]]) -> None:
        """Every combination of the rules, in their fixed order, depth-first (a rule applied once per branch)."""
        rules = [keep_largest_foreground] + [lambda s, r=r: keep_largest_of_class(s, r) for r in targets.values()]

        def walk(current: np.ndarray, applied: tuple[bool, ...]) -> None:
            if len(applied) == len(rules):
                scores = class_dice(current, ref, targets, self.ignore_label)
                per = self.combos.setdefault(applied, {})
                for v in targets:
                    per.setdefault(v, []).append(scores[v])
                return
            walk(current, (*applied, False))
            walk(rules[len(applied)](current), (*applied, True))

        walk(seg, ())
        self.base = self.combos[(False,) * len(rules)]

    @property
    def num_cases(self) -> int:
        return len(next(iter(self.base.values()), []))

    def decide(self) -> PostprocessingDecision:
        """nnU-Net's two steps on the accumulated cases."""
        if not self.num_cases:
            raise ValueError("no case was added")
        if self.has_regions:
            return self._decide_regions()
        labels = list(self.targets)
        before = {v: nanmean(self.base[v]) for v in labels}
        with_fg = {v: nanmean(self.fg[v]) for v in labels}
        fg_rule = _better(with_fg, before, labels)
        if fg_rule:
            log.info("postprocessing: keeping the largest foreground component helps")
        current = with_fg if fg_rule else dict(before)
        class_rules = []
        for v in labels:
            candidate = {**current, v: nanmean((self.fg_cls if fg_rule else self.base_cls)[v])}
            if _better(candidate, current, [v]):
                class_rules.append(int(v))
                current = candidate
                log.info("postprocessing: keeping the largest component of class %s helps", v)
        return PostprocessingDecision(PostprocessingRules(fg_rule, tuple(class_rules)), before, current)

    def _decide_regions(self) -> PostprocessingDecision:
        """The same two steps; every rule is judged on every region's Dice (regions overlap)."""
        targets = self.targets
        names = list(targets)

        def means(applied: list[bool]) -> dict[int | str, float]:
            return {v: nanmean(self.combos[tuple(applied)][v]) for v in names}

        applied = [False] * (len(names) + 1)
        before = current = means(applied)
        if _better(means([True, *applied[1:]]), current, names):
            applied[0] = True
            current = means(applied)
            log.info("postprocessing: keeping the largest foreground component helps")
        for i, v in enumerate(names, start=1):
            candidate = means(applied[:i] + [True] + applied[i + 1:])
            if _better(candidate, current, [v]):
                applied[i] = True
                current = candidate
                log.info("postprocessing: keeping the largest component of region %s helps", v)
        regions = tuple(targets[v] for i, v in enumerate(names, start=1) if applied[i])
        return PostprocessingDecision(PostprocessingRules(applied[0], (), regions), before, current)


def determine_postprocessing(segs: Iterable[np.ndarray], refs: Iterable[np.ndarray],
                             foreground_labels: Targets,
                             ignore_label: int | None = None) -> PostprocessingDecision:
    """Decide the rules on cross-validation label maps (predictions and references, paired).

    Rules act on the whole prediction; only the scoring leaves out the reference's
    ``ignore_label`` voxels (sparse annotations). Iterables are consumed one pair at a time.
    ``foreground_labels``: classes, or region name -> label values.
    """
    tally = PostprocessingTally(foreground_labels, ignore_label)
    for seg, ref in itertools.zip_longest(segs, refs):
        if seg is None or ref is None:
            raise ValueError("need the same number of predictions and references")
        tally.add(seg, ref)
    if not tally.num_cases:
        raise ValueError("need at least one prediction and reference")
    return tally.decide()
