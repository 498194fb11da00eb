"""What a fold run logs, as pure functions over its records, and ``fold_k/tracking.json``.

Names are stable so that runs compare across datasets and versions:

- params: ``dataset``, ``configuration``, ``fold``, ``variant``, ``seed``, ``plans`` (preset),
  ``plans.digest`` (of the plan trained with), ``plans.data_identifier``, every resolved
  `TrainerConfig` field as ``trainer.<key>``, the sweep's ``sweep.*`` params, ``autoseg.version``,
  ``autoseg.commit``, ``device``, ``data_workers``, ``cpu_share`` and ``env.<VAR>``;
- per epoch (step = epoch index): `EPOCH_METRICS`, ``pseudo_dice/<class>``, ``samples_per_s``;
- at the end: ``final/<dice|iou|hd95|nsd>/<class>`` and ``final/<metric>_mean`` (summary.json's
  foreground mean), ``final/ema_pseudo_dice``, ``epochs_completed``.

``tracking.json`` holds the run id, so that ``--continue`` resumes the same tracker run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import autoseg
from autoseg.common.jsonio import record_to_dict
from autoseg.common.paths import TrainingId
from autoseg.evaluate.summary import Summary
from autoseg.planning.plans import Plan
from autoseg.train.config import TrainerConfig

TRACKING_FILE = "tracking.json"
"""In the fold dir: which tracker run this fold logs to (resumed by ``--continue``)."""

EPOCH_METRICS = {"train_loss": "train_loss", "val_loss": "val_loss", "mean_pseudo_dice": "pseudo_dice_mean",
                 "ema_pseudo_dice": "ema_pseudo_dice", "lr": "lr", "epoch_time_s": "epoch_time_s",
                 "iterations_per_s": "iterations_per_s", "data_wait_fraction": "data_wait_fraction"}
"""training_log.jsonl key -> metric name, logged every epoch."""

FINAL_METRICS = ("dice", "iou", "hd95", "nsd")
"""summary.json's metrics, per class and as the foreground mean."""

TAG_PREFIX = "autoseg."
GIT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class TrackingRecord:
    """``fold_k/tracking.json``: the tracker run of this fold."""

    SCHEMA: ClassVar[str] = "autoseg.tracking"
    VERSION: ClassVar[int] = 1

    backend: str
    target: str
    run_id: str
    experiment: str
    name: str


def run_name(tid: TrainingId) -> str:
    """``Dataset004_Hippocampus/3d_fullres/default/fold_0``: the fold dir's own relative path."""
    return tid.relative_dir().as_posix()


def run_tags(tid: TrainingId, context_tags: Mapping[str, str]) -> dict[str, str]:
    """What a fold run is found by (``autoseg.dataset`` groups train-all's runs; sweeps add theirs)."""
    tags = {f"{TAG_PREFIX}dataset": tid.dataset, f"{TAG_PREFIX}config": tid.config_dirname,
            f"{TAG_PREFIX}variant": tid.variant, f"{TAG_PREFIX}fold": str(tid.fold),
            f"{TAG_PREFIX}kind": "fold"}
    if tid.seed is not None:
        tags[f"{TAG_PREFIX}seed"] = str(tid.seed)
    return {**tags, **context_tags}


def plan_digest(plan: Plan) -> str:
    """12 hex digits of SHA-1 over the plan record: two runs with equal digests trained with the same plan."""
    text = json.dumps(record_to_dict(plan), sort_keys=True)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def source_revision() -> str:
    """The git commit of the autoseg source (``+dirty`` with local changes), ``unknown`` outside a checkout."""
    root = Path(autoseg.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, check=True, encoding="utf-8").stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=GIT_TIMEOUT_S, encoding="utf-8").stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty.strip() else "")


@dataclass(frozen=True)
class FoldFacts:
    """What a fold run's params are made of (gathered by the fold run, which knows them)."""

    tid: TrainingId
    cfg: TrainerConfig
    plan: Plan
    device: str
    data_workers: int
    cpu_share: int
    environment: Mapping[str, str]
    sweep_params: Mapping[str, str]


def fold_params(facts: FoldFacts) -> dict[str, str]:
    """Every param of a fold run, as strings (see the module doc)."""
    tid, plan = facts.tid, facts.plan
    params = {"dataset": tid.dataset, "configuration": tid.config, "fold": str(tid.fold), "variant": tid.variant,
              "seed": str(facts.cfg.seed), "plans": tid.plans, "plans.digest": plan_digest(plan),
              "plans.data_identifier": plan.configuration(tid.config).data_identifier,
              "autoseg.version": autoseg.__version__, "autoseg.commit": source_revision(),
              "device": facts.device, "data_workers": str(facts.data_workers), "cpu_share": str(facts.cpu_share)}
    params.update({f"trainer.{k}": _text(v) for k, v in facts.cfg.flat_dict().items()})
    params.update({f"env.{k}": v for k, v in facts.environment.items()})
    params.update(facts.sweep_params)
    return params


def class_names(plan: Plan) -> list[str]:
    """The foreground classes (or regions) in network output order: the pseudo-Dice's order."""
    return [metric_key(n) for n in plan.label_scheme.foreground]


def epoch_metrics(record: Mapping[str, Any], classes: Sequence[str], batch_size: int) -> dict[str, float | None]:
    """One training_log.jsonl record as tracker metrics (None values are dropped by the logger)."""
    out: dict[str, float | None] = {name: record.get(key) for key, name in EPOCH_METRICS.items()}
    for name, value in zip(classes, record.get("pseudo_dice") or []):
        out[f"pseudo_dice/{name}"] = value
    speed = record.get("iterations_per_s")
    out["samples_per_s"] = speed * batch_size if isinstance(speed, int | float) else None
    return out


def final_metrics(summary: Summary) -> dict[str, float]:
    """summary.json as ``final/<metric>/<class>`` and ``final/<metric>_mean`` (the foreground mean)."""
    out: dict[str, float] = {}
    for value, means in sorted(summary.mean.items(), key=lambda kv: str(kv[0])):
        name = metric_key(summary.class_name(value))
        for metric in FINAL_METRICS:
            out[f"final/{metric}/{name}"] = getattr(means, metric)
    for metric in FINAL_METRICS:
        out[f"final/{metric}_mean"] = getattr(summary.foreground_mean, metric)
    return out


def metric_key(name: str) -> str:
    """A class name as part of a metric key (letters, digits, ``_ - .``: every tracker takes those)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(name)) or "class"


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | tuple | dict) or value is None else str(value)
