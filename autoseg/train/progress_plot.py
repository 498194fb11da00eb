"""``progress.png`` of a training run (losses, pseudo-Dice, epoch time, learning rate).

Drawn with matplotlib's Agg backend (no display needed on cluster nodes) and written
atomically, so a reader never sees a half-written image while training redraws it.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

from autoseg.common.jsonio import atomic_write_bytes  # noqa: E402

PROGRESS_FIGSIZE_IN = (10.0, 12.0)
PROGRESS_DPI = 80
"""Small enough to redraw every epoch in well under a second."""


def _series(history: Sequence[dict[str, Any]], key: str) -> list[float]:
    out = []
    for rec in history:
        v = rec.get(key)
        out.append(float("nan") if v is None else float(v))
    return out


def plot_progress(history: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Draw the training curves from the per-epoch log records and write ``path`` (PNG).

    Panels: train/val loss with mean pseudo-Dice and its moving average on a second axis;
    epoch time; learning rate. Same picture as nnU-Net's progress.png, so its users can read it.
    """
    epochs = [int(r["epoch"]) for r in history]
    fig = Figure(figsize=PROGRESS_FIGSIZE_IN, dpi=PROGRESS_DPI)
    ax_loss, ax_time, ax_lr = fig.subplots(3, 1)

    ax_loss.plot(epochs, _series(history, "train_loss"), color="tab:blue", label="train loss")
    ax_loss.plot(epochs, _series(history, "val_loss"), color="tab:red", label="val loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_dice = ax_loss.twinx()
    mean_dice = [(_nanmean(r.get("pseudo_dice") or [])) for r in history]
    ax_dice.plot(epochs, mean_dice, color="tab:green", linestyle=":", label="pseudo Dice")
    ax_dice.plot(epochs, _series(history, "ema_pseudo_dice"), color="tab:green", label="pseudo Dice (EMA)")
    ax_dice.set_ylabel("pseudo Dice")
    lines = ax_loss.get_legend_handles_labels()
    lines2 = ax_dice.get_legend_handles_labels()
    ax_loss.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right")

    ax_time.plot(epochs, _series(history, "epoch_time_s"), color="tab:purple", label="epoch time")
    ax_time.set_xlabel("epoch")
    ax_time.set_ylabel("time [s]")
    ax_time.legend(loc="upper right")

    ax_lr.plot(epochs, _series(history, "lr"), color="tab:orange", label="learning rate")
    ax_lr.set_xlabel("epoch")
    ax_lr.set_ylabel("lr")
    ax_lr.legend(loc="upper right")

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def _nanmean(values: Sequence[float | None]) -> float:
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(finite) / len(finite) if finite else float("nan")
