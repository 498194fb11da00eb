"""Builders for sweep tests: sweep files, and fold folders with synthetic logs and summaries."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from autoseg.common.jsonio import save_record
from autoseg.evaluate.summary import MeanMetrics, Summary

HIPPO_LABELS = {"background": 0, "Anterior": 1, "Posterior": 2}


def write_sweep(folder: Path, body: dict, name: str = "sweep.yaml") -> Path:
    """A sweep YAML file with ``body`` as its content."""
    path = Path(folder) / name
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def minimal_sweep(**changes: object) -> dict:
    """A valid sweep body (2 x 2 grid, 2 folds); ``changes`` replace top-level keys (None drops one)."""
    body: dict = {"name": "toy", "datasets": ["Dataset004_Hippocampus"], "configs": ["3d_fullres"],
                  "folds": [0, 1], "seeds": [0], "base": {"epochs": 1},
                  "grid": {"lr": [0.01, 0.003], "augment.mirror": [True, False]}}
    for k, v in changes.items():
        if v is None:
            body.pop(k, None)
        else:
            body[k] = v
    return body


def fake_summary(dice_per_class: dict[int, float], hd95: float = 3.0) -> Summary:
    """A Summary with given per-class Dice (no per-case entries: the report reads only the means)."""
    mean = {v: MeanMetrics(dice=d, iou=d / (2 - d), hd95=hd95, nsd=d, n_cases=3, n_hd95=3)
            for v, d in dice_per_class.items()}
    fg = sum(dice_per_class.values()) / len(dice_per_class)
    return Summary(labels=HIPPO_LABELS, tolerance_mm=1.0, cases=(), mean=mean,
                   foreground_mean=MeanMetrics(dice=fg, iou=fg / (2 - fg), hd95=hd95, nsd=fg, n_cases=3, n_hd95=3))


def fake_fold(folder: Path, *, epochs: int = 2, ema: float = 0.5, summary: Summary | None = None,
              finished: bool = True, epoch_time_s: float = 10.0, its: float = 5.0) -> Path:
    """A fold folder as `autoseg train` leaves it: log lines, optionally a final checkpoint and summary."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"epoch": e, "epochs": epochs, "train_loss": -0.1 * e, "val_loss": -0.1 * e,
                         "pseudo_dice": [ema, ema], "ema_pseudo_dice": ema, "epoch_time_s": epoch_time_s,
                         "iterations_per_s": its}) for e in range(epochs)]
    (folder / "training_log.jsonl").write_text("\n".join(lines) + "\n")
    if finished:
        (folder / "checkpoint_final.pt").write_bytes(b"not a real checkpoint")
    if summary is not None:
        save_record(folder / "validation" / "summary.json", summary)
    return folder
