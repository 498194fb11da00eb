"""Pick the best configuration (or ensemble of two) from cross-validation, plus postprocessing.

Reads each configuration's cross-validation results, ``results/<ds>/<config>/<variant>/
fold_<k>/validation/`` (predictions, ``summary.json`` and, when training saved them,
``CASE.npz`` probabilities). Candidates are every configuration alone and every pair
averaged (softmax probabilities averaged, like nnU-Net's ensembling; only where all their
validation probabilities exist). The winner has the highest mean foreground Dice over all
cross-validation cases (per class a mean over cases skipping NaN, i.e. cases without the
class in reference and prediction, as nnU-Net; then the mean over the classes that have
one); on a tie the simpler candidate (one configuration before a pair) wins.
Connected-component postprocessing is then decided on the winner's predictions
(`autoseg.evaluate.postprocess`). The result is ``results/<ds>/best.json`` (`BestConfig`),
which ``autoseg predict --best`` uses.

Memory: cases stream. The scoring pass reads one case at a time (its reference, each
configuration's label map, and for a pair the two probability maps, summed in place) and
keeps only Dice numbers; a second pass re-reads the winner's cases for the postprocessing
decision. Peak memory is one case's arrays, whatever the number of cases (a 300-case CT
dataset), at the price of reading each configuration's probabilities once per pair.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import load_record, save_record
from autoseg.common.paths import Paths, TrainingId
from autoseg.common.progress import progress
from autoseg.dataset.io import read_image
from autoseg.dataset.spec import LabelScheme
from autoseg.evaluate.postprocess import (
    PostprocessingRules,
    PostprocessingTally,
    Targets,
    apply_postprocessing,
    class_dice,
    nanmean,
)
from autoseg.evaluate.summary import SUMMARY_FILE, Summary
from autoseg.infer.predict import (
    FolderResult,
    PredictOptions,
    labels_from_probabilities,
    load_configuration,
    load_probabilities,
    predict_folder,
)

log = logging.getLogger(__name__)

BEST_FILE = "best.json"
DICE_TIE_TOLERANCE = 1e-6
"""Mean Dice values closer than this count as a tie (the simpler candidate wins)."""

_FOLD_DIR_RE = re.compile(r"^fold_(\d+)$")


@dataclass(frozen=True)
class CandidateResult:
    """One candidate's cross-validation mean Dice.

    ``class_dice``: per class, the mean over cases skipping NaN (NaN if no case has the class
    in reference or prediction); ``foreground_dice``: the mean of those that are defined
    (equal to summary.json's foreground mean unless some class is absent everywhere, where
    that one is NaN, which could not rank).
    """

    configs: tuple[str, ...]
    foreground_dice: float
    class_dice: dict[int | str, float]
    """Per class value, or per region name (region-based training)."""
    num_cases: int

    @property
    def name(self) -> str:
        return " + ".join(self.configs)


@dataclass(frozen=True)
class BestConfig:
    """What to predict with: configurations (averaged), folds, checkpoint, postprocessing."""

    SCHEMA: ClassVar[str] = "autoseg.best_config"
    VERSION: ClassVar[int] = 1

    dataset: str
    configs: tuple[str, ...]
    folds: tuple[int, ...]
    variant: str
    checkpoint: str
    postprocessing: PostprocessingRules
    cv_dice: float
    """Mean foreground Dice of the chosen candidate over the cross-validation cases."""
    cv_dice_postprocessed: float
    class_dice_postprocessed: dict[int | str, float]
    candidates: tuple[CandidateResult, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class _CVCase:
    case_id: str
    validation_dir: Path
    prediction: Path
    reference: Path


def _validation_dir(paths: Paths, dataset: str, config: str, fold: int, variant: str) -> Path:
    return paths.training_dir(TrainingId(dataset, config, fold, variant)) / "validation"


def _folds_with_summary(paths: Paths, dataset: str, config: str, variant: str) -> list[int]:
    root = paths.results_dataset(dataset) / config / variant
    if not root.is_dir():
        return []
    folds = []
    for d in root.iterdir():
        m = _FOLD_DIR_RE.match(d.name)
        if m and (d / "validation" / SUMMARY_FILE).is_file():
            folds.append(int(m.group(1)))
    return sorted(folds)


def _discover_configs(paths: Paths, dataset: str, variant: str) -> list[str]:
    root = paths.results_dataset(dataset)
    if not root.is_dir():
        raise AutosegError("no results for this dataset (train it first)", root)
    return sorted(d.name for d in root.iterdir() if d.is_dir() and _folds_with_summary(paths, dataset, d.name, variant))


def _cv_cases(paths: Paths, dataset: str, config: str, folds: Sequence[int], variant: str) -> dict[str, _CVCase]:
    cases: dict[str, _CVCase] = {}
    for k in folds:
        vdir = _validation_dir(paths, dataset, config, k, variant)
        summary = load_record(vdir / SUMMARY_FILE, Summary)
        for c in summary.cases:
            if c.case_id in cases:
                raise AutosegError(f"case {c.case_id!r} is in the validation of two folds; "
                                   "cross-validation folds must not overlap", vdir / SUMMARY_FILE)
            pred = vdir / Path(c.prediction).name
            cases[c.case_id] = _CVCase(c.case_id, vdir, pred, Path(c.reference))
    return cases


def _has_probabilities(cv: dict[str, dict[str, _CVCase]], configs: tuple[str, ...],
                       case_ids: Sequence[str]) -> bool:
    """Whether every case of every configuration kept its validation probabilities (files only)."""
    for c in configs:
        for cid in case_ids:
            vdir = cv[c][cid].validation_dir
            if not (vdir / f"{cid}.npz").is_file() or not (vdir / f"{cid}.json").is_file():
                log.warning("ensemble %s skipped: no saved probabilities for %s in %s (train with "
                            "validation probabilities saved to compare ensembles)", " + ".join(configs), cid, vdir)
                return False
    return True


def _segmentation(cv: dict[str, dict[str, _CVCase]], configs: tuple[str, ...], cid: str) -> np.ndarray:
    """One case's label map of a candidate: the saved prediction, or the label map of the averaged
    probabilities of a pair (summed in place: two probability maps in memory at most; argmax for
    classes, regions_class_order for regions)."""
    if len(configs) == 1:
        return read_image(cv[configs[0]][cid].prediction)[0]
    total, rec = None, None
    for c in configs:
        probs, rec = load_probabilities(cv[c][cid].validation_dir, cid)
        if total is None:
            total = probs
        else:
            total += probs
        del probs
    total /= len(configs)  # the mean, not the sum: region probabilities are thresholded at 0.5
    return labels_from_probabilities(total, rec.label_scheme if rec else None)


def _score_candidates(cv: dict[str, dict[str, _CVCase]], candidates: Sequence[tuple[str, ...]],
                      case_ids: Sequence[str], labels: Targets, ignore: int | None,
                      ref_config: str) -> list[CandidateResult]:
    """Per-case Dice of every candidate, streamed case by case; only the numbers are kept."""
    per_case: dict[tuple[str, ...], dict[int | str, list[float]]] = {k: {v: [] for v in labels} for k in candidates}
    for cid in progress(case_ids, total=len(case_ids), desc="find-best", unit="case"):
        ref = read_image(cv[ref_config][cid].reference)[0]
        for k in candidates:
            seg = _segmentation(cv, k, cid)
            for v, d in class_dice(seg, ref, labels, ignore).items():
                per_case[k][v].append(d)
            del seg
        del ref
    results = []
    for k in candidates:
        means = {v: nanmean(per_case[k][v]) for v in labels}
        results.append(CandidateResult(k, nanmean(means.values()), means, len(case_ids)))
    return results


def _winner_cases(cv: dict[str, dict[str, _CVCase]], configs: tuple[str, ...], case_ids: Sequence[str],
                  ref_config: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(label map, reference) of the chosen candidate, one case at a time."""
    for cid in progress(case_ids, total=len(case_ids), desc="postprocessing", unit="case"):
        yield _segmentation(cv, configs, cid), read_image(cv[ref_config][cid].reference)[0]


def _rank(r: CandidateResult) -> float:
    """Higher is better; a candidate with no defined Dice at all ranks last."""
    return -math.inf if math.isnan(r.foreground_dice) else round(r.foreground_dice / DICE_TIE_TOLERANCE)


def find_best(paths: Paths, dataset: str, configs: Sequence[str] | None = None, variant: str = "default",
              checkpoint: str = "final", output: Path | None = None, force: bool = False) -> BestConfig:
    """Compare configurations and pair ensembles on cross-validation; write best.json."""
    output = Path(output) if output else paths.results_dataset(dataset) / BEST_FILE
    if output.exists() and not force:
        raise AutosegError("exists; use --force to recompute it", output)
    configs = list(configs) if configs else _discover_configs(paths, dataset, variant)
    if not configs:
        raise AutosegError(f"no configuration of variant {variant!r} has validation results "
                           "(fold_k/validation/summary.json)", paths.results_dataset(dataset))
    fold_sets = {c: set(_folds_with_summary(paths, dataset, c, variant)) for c in configs}
    for c, fs in fold_sets.items():
        if not fs:
            raise AutosegError("no fold has validation/summary.json",
                               paths.results_dataset(dataset) / c / variant)
    folds = sorted(set.intersection(*fold_sets.values()))
    if not folds:
        raise AutosegError(f"configurations {configs} share no validated fold", paths.results_dataset(dataset))
    for c, fs in fold_sets.items():
        if fs != set(folds):
            log.warning("%s: fold(s) %s left out (not validated for every configuration)", c, sorted(fs - set(folds)))
    cv = {c: _cv_cases(paths, dataset, c, folds, variant) for c in configs}
    case_ids = sorted(set.intersection(*(set(v) for v in cv.values())))
    if not case_ids:
        raise AutosegError("the configurations share no validation case", paths.results_dataset(dataset))
    first = load_record(cv[configs[0]][case_ids[0]].validation_dir / SUMMARY_FILE, Summary)
    scheme = LabelScheme.from_labels(first.labels)
    labels, ignore = scheme.eval_targets, scheme.ignore_label  # classes, or regions by name
    pairs = [p for p in itertools.combinations(configs, 2) if _has_probabilities(cv, p, case_ids)]
    order = [(c,) for c in configs] + pairs
    candidates = _score_candidates(cv, order, case_ids, labels, ignore, configs[0])
    best = min(candidates, key=lambda r: (-_rank(r), len(r.configs), order.index(r.configs)))
    tally = PostprocessingTally(labels, ignore)
    for seg, ref in _winner_cases(cv, best.configs, case_ids, configs[0]):
        tally.add(seg, ref)
    decision = tally.decide()
    after = nanmean(decision.dice_after.values())
    result = BestConfig(dataset=dataset, configs=best.configs, folds=tuple(folds), variant=variant,
                        checkpoint=checkpoint, postprocessing=decision.rules, cv_dice=best.foreground_dice,
                        cv_dice_postprocessed=after, class_dice_postprocessed=decision.dice_after,
                        candidates=tuple(sorted(candidates, key=lambda r: -_rank(r))))
    save_record(output, result)
    return result


def load_best(path: Path) -> BestConfig:
    """Read a best.json written by `find_best`."""
    return load_record(path, BestConfig)


def predict_with_best(paths: Paths, best_file: Path, input_dir: Path, output_dir: Path, device: str = "auto",
                      save_probabilities: bool = False, force: bool = False,
                      options: "PredictOptions | None" = None, show_progress: bool = True,
                      dataset: str | None = None, num_workers: int = 1,
                      prev_stage_dir: Path | None = None) -> FolderResult:
    """Predict a folder with the configurations, folds and postprocessing recorded in best.json.

    ``dataset``, when given (``-d``), must be the one best.json was made for. A cascade
    configuration predicts its previous stage first, or reads it from ``prev_stage_dir``.
    """
    best = load_best(Path(best_file))
    if dataset is not None and dataset != best.dataset:
        raise AutosegError(f"was made for {best.dataset}, not {dataset}", best_file)
    models = [load_configuration(paths, best.dataset, c, best.folds, best.variant, device, best.checkpoint,
                                 prev_stage_dir) for c in best.configs]
    post = None if best.postprocessing.is_noop else partial(apply_postprocessing, rules=best.postprocessing)
    return predict_folder(models, input_dir, output_dir, save_probabilities=save_probabilities, force=force,
                          options=options or PredictOptions(), postprocess=post, show_progress=show_progress,
                          num_workers=num_workers)


def format_best(best: BestConfig) -> str:
    """Candidates table and the choice, for the CLI."""
    lines = [f"{'candidate':<36}{'CV fg Dice':>12}{'cases':>7}"]
    for c in best.candidates:
        mark = " *" if c.configs == best.configs else ""
        dice = "n/a" if math.isnan(c.foreground_dice) else f"{c.foreground_dice:.4f}"
        lines.append(f"{c.name[:35]:<36}{dice:>12}{c.num_cases:>7d}{mark}")
    lines.append(f"best: {' + '.join(best.configs)} (folds {', '.join(map(str, best.folds))}, "
                 f"checkpoint {best.checkpoint})")
    lines.append(f"postprocessing: {best.postprocessing.describe()} -> CV fg Dice "
                 f"{best.cv_dice:.4f} -> {best.cv_dice_postprocessed:.4f}")
    return "\n".join(lines)
