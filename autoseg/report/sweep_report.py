"""The report of an ablation sweep: one row per variant, differences to the baseline, and a plot.

For every expected run (dataset × config × variant × seed × fold) we read the fold folder:
``validation/summary.json`` (a `Summary`: foreground and per-class Dice, HD95) when the final
validation ran, and ``training_log.jsonl`` (epoch times, iterations/s, the EMA pseudo-Dice).
Per variant we give mean ± sample std over folds and seeds, the difference to the baseline, the
per-fold (paired) differences and a Wilcoxon signed-rank p-value when there are at least
`MIN_PAIRS_FOR_TEST` pairs, so a reader can tell a real effect from fold-to-fold noise. Runs
without a summary are only compared on the pseudo-Dice, and the table says so. Unfinished
runs are listed as missing, so a partial sweep gives a partial, honest report.

Files (in ``<results>/sweeps/<name>/``): ``report.md``, ``report.csv`` (one row per variant),
``runs.csv`` (one row per run) and ``report.png`` (a box plot per dataset/config).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import atomic_write_bytes, atomic_write_text, load_record
from autoseg.common.paths import Paths, TrainingId
from autoseg.evaluate.summary import Summary
from autoseg.schedule.sweep import SweepSpec

log = logging.getLogger(__name__)

MIN_PAIRS_FOR_TEST = 5
"""Below 5 pairs the smallest attainable two-sided Wilcoxon p-value is >= 0.0625: no test can
reach 0.05, so we print ``n<5`` instead of a p-value that looks meaningful."""

METRIC_DICE = "dice"
METRIC_PSEUDO = "pseudo_dice"
METRIC_LABELS = {METRIC_DICE: "Dice (validation)", METRIC_PSEUDO: "pseudo-Dice (EMA, last epoch; not a validation Dice)"}

SUMMARY_RELATIVE = Path("validation") / "summary.json"
LOG_FILE = "training_log.jsonl"
FINAL_CHECKPOINT = "checkpoint_final.pt"

MAX_MISSING_LISTED = 20
"""report.md lists at most this many missing runs by name (then a count)."""

PLOT_DPI = 100


@dataclass(frozen=True)
class RunKey:
    """Which run: dataset, config, readable variant name, seed, fold."""

    dataset: str
    config: str
    variant: str
    seed: int
    fold: int | str


@dataclass(frozen=True)
class RunResult:
    """What one fold folder says (None where the file or value is not there yet)."""

    key: RunKey
    finished: bool
    """checkpoint_final.pt exists."""
    epochs_done: int
    epochs: int | None
    dice: float | None = None
    """Foreground mean Dice of the final validation (summary.json)."""
    class_dice: tuple[tuple[str, float], ...] = ()
    hd95: float | None = None
    pseudo_dice: float | None = None
    train_time_s: float | None = None
    iterations_per_s: float | None = None

    def metric(self, name: str) -> float | None:
        return self.dice if name == METRIC_DICE else self.pseudo_dice


@dataclass(frozen=True)
class MeanStd:
    """Mean and sample standard deviation (ddof=1; NaN with one value) of the finite values."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> "MeanStd":
        v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
        if not v:
            return cls(math.nan, math.nan, 0)
        return cls(float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else math.nan, len(v))

    def text(self, digits: int = 4) -> str:
        if self.n == 0:
            return "–"
        if math.isnan(self.std):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass(frozen=True)
class Comparison:
    """A variant against the baseline on the runs both have (paired by seed and fold)."""

    deltas: tuple[tuple[str, float], ...]
    """(``s<seed>/f<fold>``, variant - baseline) per pair."""
    p_value: float | None
    """Two-sided Wilcoxon signed-rank p-value; None with fewer than MIN_PAIRS_FOR_TEST pairs."""

    @property
    def n(self) -> int:
        return len(self.deltas)

    @property
    def mean_delta(self) -> float:
        return float(np.mean([d for _, d in self.deltas])) if self.deltas else math.nan

    def p_text(self) -> str:
        if self.n == 0:
            return "–"
        if self.p_value is None:
            return f"n<{MIN_PAIRS_FOR_TEST}"
        return f"{self.p_value:.3g}"


@dataclass(frozen=True)
class VariantRow:
    """One line of the table."""

    dataset: str
    config: str
    variant: str
    baseline: bool
    n_expected: int
    n_finished: int
    metric: str
    """Which score `comparison` (and the plot) uses: METRIC_DICE, or METRIC_PSEUDO when no run of
    this dataset/config has a validation summary yet."""
    dice: MeanStd
    class_dice: tuple[tuple[str, MeanStd], ...]
    hd95: MeanStd
    pseudo_dice: MeanStd
    train_time_s: MeanStd
    iterations_per_s: MeanStd
    comparison: Comparison | None
    """None for the baseline itself."""


@dataclass(frozen=True)
class SweepReport:
    """Rows for every dataset/config/variant, the runs behind them and what is still missing."""

    sweep: str
    rows: tuple[VariantRow, ...]
    runs: tuple[RunResult, ...]
    missing: tuple[RunKey, ...]
    n_expected: int


# --------------------------------------------------------------------------- pure statistics


def paired_comparison(baseline: dict[tuple[int, int | str], float],
                      variant: dict[tuple[int, int | str], float]) -> Comparison:
    """Per-(seed, fold) differences variant - baseline and a Wilcoxon signed-rank test on them.

    Pairing by fold removes the fold-to-fold spread (folds differ far more than most ablations),
    which an unpaired comparison of two means would count as noise.
    """
    keys = sorted(set(baseline) & set(variant), key=lambda k: (k[0], str(k[1])))
    deltas = tuple((f"s{s}/f{f}", float(variant[(s, f)] - baseline[(s, f)])) for s, f in keys)
    p: float | None = None
    if len(deltas) >= MIN_PAIRS_FOR_TEST:
        d = np.array([x for _, x in deltas])
        if np.allclose(d, 0.0):
            p = 1.0
        else:
            from scipy.stats import wilcoxon

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # scipy warns about ties/zeros; the p-value stays valid
                p = float(wilcoxon(d).pvalue)
    return Comparison(deltas=deltas, p_value=p)


def summarize_runs(runs: Sequence[RunResult], variants: Sequence[str], baseline: str,
                   expected: dict[tuple[str, str, str], int]) -> list[VariantRow]:
    """Group runs into one row per (dataset, config, variant), in the given variant order.

    ``expected`` maps (dataset, config, variant) to the number of runs the sweep asks for.
    Only finished runs count; the score compared is the validation Dice when any finished run
    of the dataset/config has one, else the pseudo-Dice (METRIC_PSEUDO, labelled as such).
    """
    groups = sorted({(ds, cfg) for ds, cfg, _ in expected}, key=str)
    rows = []
    for ds, cfg in groups:
        done = [r for r in runs if r.finished and r.key.dataset == ds and r.key.config == cfg]
        metric = METRIC_DICE if any(r.dice is not None for r in done) else METRIC_PSEUDO
        by_variant = {v: [r for r in done if r.key.variant == v] for v in variants}

        def scores(rs: list[RunResult]) -> dict[tuple[int, int | str], float]:
            return {(r.key.seed, r.key.fold): float(r.metric(metric)) for r in rs
                    if r.metric(metric) is not None and math.isfinite(float(r.metric(metric)))}

        base_scores = scores(by_variant.get(baseline, []))
        for v in variants:
            rs = by_variant[v]
            classes = sorted({c for r in rs for c, _ in r.class_dice})
            class_dice = tuple((c, MeanStd.of([dict(r.class_dice).get(c) for r in rs])) for c in classes)
            rows.append(VariantRow(
                dataset=ds, config=cfg, variant=v, baseline=(v == baseline),
                n_expected=expected.get((ds, cfg, v), 0), n_finished=len(rs), metric=metric,
                dice=MeanStd.of([r.dice for r in rs]), class_dice=class_dice,
                hd95=MeanStd.of([r.hd95 for r in rs]), pseudo_dice=MeanStd.of([r.pseudo_dice for r in rs]),
                train_time_s=MeanStd.of([r.train_time_s for r in rs]),
                iterations_per_s=MeanStd.of([r.iterations_per_s for r in rs]),
                comparison=None if v == baseline else paired_comparison(base_scores, scores(rs))))
    return rows


# --------------------------------------------------------------------------- reading runs


def read_training_log(path: Path) -> list[dict]:
    """The per-epoch records of training_log.jsonl, last record per epoch (a resumed run may
    repeat an epoch); a torn last line (a run killed mid-write) is skipped."""
    if not path.is_file():
        return []
    by_epoch: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s: skipping an unreadable line", path)
            continue
        if isinstance(rec, dict) and isinstance(rec.get("epoch"), int):
            by_epoch[rec["epoch"]] = rec
    return [by_epoch[e] for e in sorted(by_epoch)]


def _finite(x: object) -> float | None:
    if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x)):
        return float(x)
    return None


def read_run(fold_dir: Path, key: RunKey) -> RunResult:
    """Everything the report needs from one fold folder (missing files give None fields)."""
    records = read_training_log(fold_dir / LOG_FILE)
    times = [_finite(r.get("epoch_time_s")) for r in records]
    speeds = [s for s in (_finite(r.get("iterations_per_s")) for r in records) if s is not None]
    last = records[-1] if records else {}
    dice = hd95 = None
    class_dice: tuple[tuple[str, float], ...] = ()
    summary_file = fold_dir / SUMMARY_RELATIVE
    if summary_file.is_file():
        summary = load_record(summary_file, Summary)
        dice = _finite(summary.foreground_mean.dice)
        hd95 = _finite(summary.foreground_mean.hd95)
        class_dice = tuple((summary.class_name(v), float(m.dice)) for v, m in sorted(summary.mean.items()))
    return RunResult(
        key=key, finished=(fold_dir / FINAL_CHECKPOINT).is_file(), epochs_done=len(records),
        epochs=last.get("epochs") if isinstance(last.get("epochs"), int) else None,
        dice=dice, class_dice=class_dice, hd95=hd95, pseudo_dice=_finite(last.get("ema_pseudo_dice")),
        train_time_s=sum(t for t in times if t is not None) if any(t is not None for t in times) else None,
        iterations_per_s=float(np.mean(speeds)) if speeds else None)


def build_sweep_report(spec: SweepSpec, paths: Paths,
                       read: Callable[[Path, RunKey], RunResult] = read_run) -> SweepReport:
    """Read every expected run of the sweep (from its fold folder, or as ``read`` says) and compute the table."""
    runs, missing = [], []
    expected: dict[tuple[str, str, str], int] = {}
    for ds in spec.datasets:
        for cfg in spec.configs:
            for v in spec.variants:
                for seed in spec.seeds:
                    for fold in spec.folds:
                        key = RunKey(ds, cfg, v.name, seed, fold)
                        expected[(ds, cfg, v.name)] = expected.get((ds, cfg, v.name), 0) + 1
                        folder = paths.training_dir(TrainingId(ds, cfg, fold, v.run_name(spec.name), seed,
                                                               plans=spec.preset(v)))
                        run = read(folder, key)
                        runs.append(run)
                        if not run.finished:
                            missing.append(key)
    rows = summarize_runs(runs, [v.name for v in spec.variants], spec.baseline.name, expected)
    return SweepReport(sweep=spec.name, rows=tuple(rows), runs=tuple(runs), missing=tuple(missing),
                       n_expected=len(runs))


# --------------------------------------------------------------------------- rendering


def _num(x: float, digits: int = 4, sign: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "–"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_markdown(report: SweepReport) -> str:
    """The report as markdown: one table per dataset/config, the per-fold deltas, then what is missing."""
    lines = [f"# Sweep `{report.sweep}`", ""]
    done = report.n_expected - len(report.missing)
    lines.append(f"{done} of {report.n_expected} runs finished." + (" Partial results." if report.missing else ""))
    groups = sorted({(r.dataset, r.config) for r in report.rows}, key=str)
    for ds, cfg in groups:
        rows = [r for r in report.rows if (r.dataset, r.config) == (ds, cfg)]
        metric = rows[0].metric
        label = METRIC_LABELS[metric]
        classes = sorted({c for r in rows for c, _ in r.class_dice})
        lines += ["", f"## {ds} / {cfg}", "", f"Compared on: **{label}**. Δ = variant − baseline, paired by "
                  f"seed and fold; p = Wilcoxon signed-rank (two-sided) when ≥ {MIN_PAIRS_FOR_TEST} pairs.", ""]
        header = ["variant", "runs", "Dice (val)", f"Δ {'Dice' if metric == METRIC_DICE else 'pseudo-Dice'}",
                  "p", *[f"Dice {c}" for c in classes], "HD95 mm", "pseudo-Dice (EMA)", "train time / run", "it/s"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        for r in rows:
            name = f"**{r.variant}** (baseline)" if r.baseline else r.variant
            delta = "–" if r.comparison is None else _num(r.comparison.mean_delta, sign=True)
            p = "–" if r.comparison is None else r.comparison.p_text()
            cd = dict(r.class_dice)
            cells = [name, f"{r.n_finished}/{r.n_expected}", r.dice.text(), delta, p,
                     *[cd[c].text() if c in cd else "–" for c in classes], r.hd95.text(2),
                     r.pseudo_dice.text(), _duration(r.train_time_s.mean), _num(r.iterations_per_s.mean, 2)]
            lines.append("| " + " | ".join(cells) + " |")
        deltas = [r for r in rows if r.comparison is not None and r.comparison.n]
        if deltas:
            lines += ["", "Per-fold Δ vs baseline:", ""]
            for r in deltas:
                text = ", ".join(f"{k} {d:+.4f}" for k, d in r.comparison.deltas)
                lines.append(f"- {r.variant}: {text}")
    if report.missing:
        lines += ["", f"## Missing ({len(report.missing)} runs not finished)", ""]
        for k in report.missing[:MAX_MISSING_LISTED]:
            lines.append(f"- {k.dataset} / {k.config} / {k.variant} / seed {k.seed} / fold {k.fold}")
        if len(report.missing) > MAX_MISSING_LISTED:
            lines.append(f"- ... and {len(report.missing) - MAX_MISSING_LISTED} more")
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ("dataset", "config", "variant", "baseline", "runs_finished", "runs_expected", "compared_on",
               "dice_mean", "dice_std", "delta_mean", "n_pairs", "p_value", "hd95_mean", "hd95_std",
               "pseudo_dice_mean", "pseudo_dice_std", "train_time_s_mean", "iterations_per_s_mean")


def format_csv(report: SweepReport) -> str:
    """One row per variant; per-class Dice as extra ``dice_<class>_mean/std`` columns."""
    classes = sorted({c for r in report.rows for c, _ in r.class_dice})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*CSV_COLUMNS, *[f"dice_{c}_{s}" for c in classes for s in ("mean", "std")]])

    def f(x: float | None) -> str:
        return "" if x is None or not math.isfinite(x) else f"{x:.6g}"

    for r in report.rows:
        c = r.comparison
        cd = dict(r.class_dice)
        writer.writerow([
            r.dataset, r.config, r.variant, str(r.baseline).lower(), r.n_finished, r.n_expected, r.metric,
            f(r.dice.mean), f(r.dice.std), "" if c is None else f(c.mean_delta), "" if c is None else c.n,
            "" if c is None or c.p_value is None else f(c.p_value), f(r.hd95.mean), f(r.hd95.std),
            f(r.pseudo_dice.mean), f(r.pseudo_dice.std), f(r.train_time_s.mean), f(r.iterations_per_s.mean),
            *[x for k in classes for x in ((f(cd[k].mean), f(cd[k].std)) if k in cd else ("", ""))]])
    return out.getvalue()


def format_runs_csv(report: SweepReport) -> str:
    """One row per expected run (finished or not): the raw numbers behind every mean."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["dataset", "config", "variant", "seed", "fold", "finished", "epochs_done", "dice", "hd95",
                     "pseudo_dice", "train_time_s", "iterations_per_s"])

    def f(x: float | None) -> str:
        return "" if x is None else f"{x:.6g}"

    for r in report.runs:
        k = r.key
        writer.writerow([k.dataset, k.config, k.variant, k.seed, k.fold, str(r.finished).lower(), r.epochs_done,
                         f(r.dice), f(r.hd95), f(r.pseudo_dice), f(r.train_time_s), f(r.iterations_per_s)])
    return out.getvalue()


def plot_sweep(report: SweepReport) -> bytes:
    """A PNG: per dataset/config, one box per variant of its per-run score, runs as dots,
    the baseline's mean as a dashed line (box plots show the fold spread a bar would hide)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    groups = sorted({(r.dataset, r.config) for r in report.rows}, key=str)
    n = max(1, len(groups))
    variants_max = max((sum(1 for r in report.rows if (r.dataset, r.config) == g) for g in groups), default=1)
    fig = Figure(figsize=(max(6.0, 1.1 * variants_max + 2), 4.2 * n), dpi=PLOT_DPI, layout="constrained")
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    for ax, (ds, cfg) in zip(axes, groups):
        rows = [r for r in report.rows if (r.dataset, r.config) == (ds, cfg)]
        metric = rows[0].metric
        data = []
        for r in rows:
            vals = [x.metric(metric) for x in report.runs if x.finished and x.key.dataset == ds
                    and x.key.config == cfg and x.key.variant == r.variant]
            data.append([float(v) for v in vals if v is not None and math.isfinite(float(v))])
        positions = list(range(1, len(rows) + 1))
        filled = [(p, d) for p, d in zip(positions, data) if d]
        if filled:
            boxes = ax.boxplot([d for _, d in filled], positions=[p for p, _ in filled], widths=0.5,
                               patch_artist=True, showfliers=False)
            for (p, _), box in zip(filled, boxes["boxes"]):
                box.set_facecolor("tab:orange" if rows[p - 1].baseline else "tab:blue")
                box.set_alpha(0.45)
            rng = np.random.default_rng(0)  # fixed jitter: the same report draws the same picture
            for p, d in filled:
                ax.scatter(p + rng.uniform(-0.12, 0.12, len(d)), d, s=14, color="black", zorder=3)
        base = next((r for r in rows if r.baseline), None)
        if base is not None:
            mean = base.dice.mean if metric == METRIC_DICE else base.pseudo_dice.mean
            if math.isfinite(mean):
                ax.axhline(mean, color="tab:orange", linestyle="--", linewidth=1, label="baseline mean")
                ax.legend(loc="lower right", fontsize=8)
        ax.set_xticks(positions)
        ax.set_xticklabels([f"{r.variant}\n({r.n_finished}/{r.n_expected})" for r in rows], fontsize=8,
                           rotation=20 if len(rows) > 4 else 0)
        ax.set_xlim(0.4, len(rows) + 0.6)
        ax.set_ylabel(METRIC_LABELS[metric].split(";")[0])
        ax.set_title(f"{report.sweep}: {ds} / {cfg}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


@dataclass(frozen=True)
class ReportFiles:
    """Where `write_sweep_report` put its outputs."""

    markdown: Path
    csv: Path
    runs_csv: Path
    png: Path


def write_sweep_report(report: SweepReport, folder: Path) -> ReportFiles:
    """Write report.md, report.csv, runs.csv and report.png into the sweep's folder (atomically)."""
    folder = Path(folder)
    if not report.rows:
        raise AutosegError("nothing to report (the sweep has no variants)", folder)
    files = ReportFiles(folder / "report.md", folder / "report.csv", folder / "runs.csv", folder / "report.png")
    atomic_write_text(files.markdown, format_markdown(report))
    atomic_write_text(files.csv, format_csv(report))
    atomic_write_text(files.runs_csv, format_runs_csv(report))
    atomic_write_bytes(files.png, plot_sweep(report))
    return files
