"""Evaluate a folder of predictions against references into one `Summary` (summary.json).

Predictions and references are paired by case name (``CASE<ending>``, the label-file
convention). Every reference must have a prediction unless ``allow_missing`` is set (a
missing one is an error that names it), and every prediction must have a reference.
Per-class means average over cases skipping NaN (``np.nanmean``, as nnU-Net's
``summary.json``): a case where reference and prediction are both empty has NaN Dice, IoU,
NSD and HD95 and counts in no mean, HD95 is also NaN when one mask is empty
(`autoseg.evaluate.metrics`), and ``n_dice`` / ``n_hd95`` say how many cases a mean is
over; a class with no defined value in any case has a NaN mean. The foreground mean is the
plain mean of the per-class means over the foreground classes (nnU-Net's
``foreground_mean``: NaN when some class's mean is). NaN is written as JSON null.
When ``labels`` declares an ``"ignore"`` label (sparse annotations), it is not a class:
it gets no metrics, and reference voxels holding it are excluded from every class's
metrics (`autoseg.evaluate.metrics.case_metrics`).
When ``labels`` declares regions (lists of label values, BraTS style), regions are evaluated
as regions: each region's mask (every voxel holding one of its values) in the prediction
against the same in the reference, keyed by the region's name in summary.json.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import from_jsonable, save_record, to_jsonable
from autoseg.common.procs import spawn_pool
from autoseg.common.progress import progress
from autoseg.dataset.io import read_image
from autoseg.dataset.spec import LabelScheme, LabelValue, ignore_label
from autoseg.evaluate.metrics import DEFAULT_TOLERANCE_MM, ClassMetrics, case_metrics

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class CaseEvaluation:
    """One case: the files compared and the metrics per label value (or per region name)."""

    case_id: str
    prediction: str
    reference: str
    metrics: dict[int | str, ClassMetrics]


@dataclass(frozen=True)
class MeanMetrics:
    """Means over cases (or over classes, for the foreground mean)."""

    dice: float
    iou: float
    hd95: float
    nsd: float
    n_cases: int
    n_hd95: int
    """Cases with a defined HD95, both masks non-empty (NaN ones are excluded from the HD95 mean)."""
    n_dice: int = -1
    """Cases with a defined Dice, class in the reference or the prediction (-1: not recorded)."""


@dataclass(frozen=True)
class Summary:
    """The evaluation of one prediction folder: per case, per class, and means."""

    SCHEMA: ClassVar[str] = "autoseg.summary"
    VERSION: ClassVar[int] = 2
    MIGRATIONS: ClassVar[dict] = {1: lambda body: migrate_v1_to_v2(body)}

    labels: dict[str, LabelValue]
    tolerance_mm: float
    cases: tuple[CaseEvaluation, ...]
    mean: dict[int | str, MeanMetrics]
    """Per foreground label value (or region name), averaged over cases."""
    foreground_mean: MeanMetrics
    """The per-class means averaged over foreground classes (the headline figure)."""

    @property
    def foreground_dice(self) -> float:
        """Mean foreground Dice, the number configurations are ranked by."""
        return self.foreground_mean.dice

    def class_name(self, value: int | str) -> str:
        if isinstance(value, str):  # a region, keyed by its name
            return value
        for name, v in self.labels.items():
            if v == value:
                return name
        return str(value)


def _nanmean(values: Sequence[float]) -> tuple[float, int]:
    """Mean of the non-NaN values (NaN if there are none) and how many there were."""
    finite = [v for v in values if not math.isnan(v)]
    return (float(np.mean(finite)) if finite else math.nan), len(finite)


def class_mean(per_case: Sequence[ClassMetrics]) -> MeanMetrics:
    """One class's means over cases, each skipping the cases where that metric is NaN."""
    dice, n_dice = _nanmean([m.dice for m in per_case])
    hd, n_hd = _nanmean([m.hd95 for m in per_case])
    return MeanMetrics(dice=dice, iou=_nanmean([m.iou for m in per_case])[0], hd95=hd,
                       nsd=_nanmean([m.nsd for m in per_case])[0], n_cases=len(per_case), n_hd95=n_hd,
                       n_dice=n_dice)


def foreground_mean(means: Sequence[MeanMetrics], n_cases: int) -> MeanMetrics:
    """The plain mean of per-class means (nnU-Net's ``foreground_mean``: NaN if one class's is)."""
    def avg(values: list[float]) -> float:
        return float(np.mean(values)) if values else math.nan

    return MeanMetrics(dice=avg([m.dice for m in means]), iou=avg([m.iou for m in means]),
                       hd95=avg([m.hd95 for m in means]), nsd=avg([m.nsd for m in means]), n_cases=n_cases,
                       n_hd95=min((m.n_hd95 for m in means), default=0),
                       n_dice=min((m.n_dice for m in means), default=0))


def summarize(cases: Sequence[CaseEvaluation], labels: dict[str, LabelValue],
              tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> Summary:
    """Build a `Summary` (means included) from per-case evaluations (classes, or regions by name)."""
    mean = {v: class_mean([c.metrics[v] for c in cases]) for v in _foreground(labels)}
    return Summary(labels=LabelScheme.from_labels(labels).labels, tolerance_mm=float(tolerance_mm), cases=tuple(cases), mean=mean,
                   foreground_mean=foreground_mean(list(mean.values()), len(cases)))


def migrate_v1_to_v2(body: dict) -> dict:
    """Version 1 scored a class absent from reference and prediction as Dice = IoU = NSD = 1,
    HD95 = 0; version 2 makes them NaN and recomputes the means (the stored counts say which
    cases). NSD of the other cases stays version 1's voxel-count NSD: re-run `autoseg
    evaluate` for the surface-area NSD."""
    for case in body.get("cases", []):
        for m in case.get("metrics", {}).values():
            if m.get("n_pred") == 0 and m.get("n_ref") == 0:
                m.update(dice=None, iou=None, nsd=None, hd95=None)
    cases = from_jsonable(tuple[CaseEvaluation, ...], body.get("cases", []), "summary.json (version 1)")
    labels = LabelScheme.from_labels(body.get("labels", {})).labels  # region lists stay regions
    redone = summarize(cases, labels, float(body.get("tolerance_mm", DEFAULT_TOLERANCE_MM)))
    return {**body, "mean": to_jsonable(redone.mean), "foreground_mean": to_jsonable(redone.foreground_mean)}


def _foreground(labels: dict[str, LabelValue]) -> dict[int | str, tuple[int, ...]]:
    """What is evaluated: every class but background (or every region), never the ignore label."""
    return LabelScheme.from_labels(labels).eval_targets


def target_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                   targets: Sequence[int] | dict[int | str, tuple[int, ...]],
                   tolerance_mm: float = DEFAULT_TOLERANCE_MM, ignore: int | None = None
                   ) -> dict[int | str, ClassMetrics]:
    """`case_metrics` per class, or per region on the masks of its label values (keyed by region name)."""
    if not isinstance(targets, dict):
        return case_metrics(pred, ref, spacing, list(targets), tolerance_mm, ignore)
    if all(isinstance(k, int) and v == (k,) for k, v in targets.items()):
        return case_metrics(pred, ref, spacing, list(targets), tolerance_mm, ignore)  # type: ignore[arg-type]
    out: dict[int | str, ClassMetrics] = {}
    for key, values in targets.items():
        p = np.isin(pred, values).astype(np.uint8)
        r = np.isin(ref, values).astype(np.uint8)
        if ignore is not None:
            r[ref == ignore] = 2  # same rule as for classes: unannotated voxels count for nothing
        out[key] = case_metrics(p, r, spacing, [1], tolerance_mm, None if ignore is None else 2)[1]
    return out


def evaluate_case(case_id: str, pred_file: Path, ref_file: Path,
                  label_values: Sequence[int] | dict[int | str, tuple[int, ...]],
                  tolerance_mm: float = DEFAULT_TOLERANCE_MM, ignore: int | None = None) -> CaseEvaluation:
    """Read one prediction/reference pair and compute its metrics (spacing from the reference).

    ``label_values``: classes, or key -> label values (regions). ``ignore``: the reference's
    ignore label, whose voxels count for no class.
    """
    pred, pg = read_image(pred_file)
    ref, rg = read_image(ref_file)
    if pred.shape != ref.shape:
        raise AutosegError(f"prediction shape {pred.shape} differs from reference shape {ref.shape} "
                           f"({ref_file})", pred_file)
    if not np.allclose(pg.spacing, rg.spacing, rtol=1e-3, atol=1e-4):
        log.warning("%s: spacing %s differs from the reference's %s; using the reference's",
                    pred_file, pg.spacing, rg.spacing)
    metrics = target_metrics(np.asarray(pred), np.asarray(ref), rg.spacing, label_values, tolerance_mm, ignore)
    return CaseEvaluation(case_id=case_id, prediction=str(pred_file), reference=str(ref_file), metrics=metrics)


def _evaluate_star(args: tuple) -> CaseEvaluation:
    return evaluate_case(*args)


def evaluate_pairs(pairs: Sequence[tuple[str, Path, Path]], labels: dict[str, LabelValue],
                   tolerance_mm: float = DEFAULT_TOLERANCE_MM, num_workers: int = 1,
                   show_progress: bool = True) -> Summary:
    """Evaluate explicit (case_id, prediction, reference) triples; cases in the order given."""
    fg, ignore = _foreground(labels), ignore_label(labels)
    jobs = [(cid, Path(p), Path(r), fg, tolerance_mm, ignore) for cid, p, r in pairs]
    if num_workers > 1 and len(jobs) > 1:
        with spawn_pool(num_workers) as pool:  # workers die with us (kill -9 leaves no orphans)
            results = list(progress(pool.map(_evaluate_star, jobs), total=len(jobs), desc="evaluate",
                                    enabled=show_progress, unit="case"))
    else:
        results = [_evaluate_star(j) for j in progress(jobs, total=len(jobs), desc="evaluate",
                                                         enabled=show_progress, unit="case")]
    return summarize(results, labels, tolerance_mm)


def _cases_in(folder: Path, file_ending: str) -> dict[str, Path]:
    return {f.name[: -len(file_ending)]: f for f in sorted(folder.iterdir())
            if f.is_file() and not f.name.startswith(".") and f.name.endswith(file_ending)}


def evaluate_folder(pred_dir: Path, ref_dir: Path, labels: dict[str, LabelValue], file_ending: str,
                    tolerance_mm: float = DEFAULT_TOLERANCE_MM, num_workers: int = 1,
                    output_file: Path | None = None, allow_missing: bool = False,
                    show_progress: bool = True, force: bool = False) -> Summary:
    """Evaluate ``pred_dir/CASE<ending>`` against ``ref_dir/CASE<ending>``; write summary.json.

    ``output_file`` defaults to ``pred_dir/summary.json`` and is written atomically; an
    existing one is replaced only with ``force``.
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    output_file = Path(output_file) if output_file else pred_dir / SUMMARY_FILE
    if output_file.exists() and not force:
        raise AutosegError("exists; use --force to overwrite it", output_file)
    for folder in (pred_dir, ref_dir):
        if not folder.is_dir():
            raise AutosegError("folder not found", folder)
    if 0 not in labels.values():
        raise AutosegError("labels must include background = 0", "labels")
    preds, refs = _cases_in(pred_dir, file_ending), _cases_in(ref_dir, file_ending)
    if not refs:
        raise AutosegError(f"no reference files ending in {file_ending!r}", ref_dir)
    orphans = sorted(set(preds) - set(refs))
    if orphans:
        raise AutosegError(f"{len(orphans)} prediction(s) have no reference in {ref_dir}, "
                           f"e.g. {orphans[0]}{file_ending}", pred_dir)
    missing = sorted(set(refs) - set(preds))
    if missing and not allow_missing:
        raise AutosegError(f"missing prediction for {len(missing)} reference case(s), first "
                           f"{missing[0]}{file_ending} (use --allow-missing to evaluate the predicted ones only)",
                           pred_dir)
    if not preds:
        raise AutosegError(f"no predictions ending in {file_ending!r}", pred_dir)
    pairs = [(cid, preds[cid], refs[cid]) for cid in sorted(preds)]
    summary = evaluate_pairs(pairs, labels, tolerance_mm, num_workers, show_progress)
    save_record(output_file, summary)
    return summary


def _cell(value: float, width: int, fmt: str) -> str:
    return f"{'n/a':>{width}}" if math.isnan(value) else f"{value:>{width}{fmt}}"


def format_summary_table(summary: Summary) -> str:
    """A plain-text table: one row per foreground class, then the foreground mean."""
    header = (f"{'class':<16}{'Dice':>8}{'IoU':>8}{'HD95 mm':>10}{'NSD':>8}{'cases':>7}"
              f"{'empty':>7}{'HD95 n':>8}")
    lines = [header, "-" * len(header)]

    def row(name: str, m: MeanMetrics, counts: bool = True) -> str:
        empty = f"{m.n_cases - m.n_dice:>7d}" if counts and m.n_dice >= 0 else f"{'-':>7}"
        n_hd = f"{m.n_hd95:>8d}" if counts else f"{'-':>8}"
        return (f"{name[:15]:<16}{_cell(m.dice, 8, '.4f')}{_cell(m.iou, 8, '.4f')}{_cell(m.hd95, 10, '.2f')}"
                f"{_cell(m.nsd, 8, '.4f')}{m.n_cases:>7d}{empty}{n_hd}")

    for v, m in summary.mean.items():
        lines.append(row(v if isinstance(v, str) else f"{summary.class_name(v)} ({v})", m))
    lines.append("-" * len(header))
    lines.append(row("foreground mean", summary.foreground_mean, counts=False))
    lines.append(f"NSD tolerance {summary.tolerance_mm:g} mm. empty: cases with the class in neither mask (no Dice, "
                 "IoU, NSD, HD95),")
    lines.append("left out of every mean as in nnU-Net; HD95 n: cases with both masks non-empty; n/a: undefined.")
    ignore = ignore_label(summary.labels)
    if ignore is not None:
        lines.append(f"Reference voxels labelled 'ignore' ({ignore}) are excluded from every metric.")
    return "\n".join(lines)
