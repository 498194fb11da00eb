"""Learning-rate schedules: pure functions of the epoch and the config.

nnU-Net updates the learning rate once per epoch with the "poly" rule
``lr * (1 - epoch / epochs) ** 0.9``; we do the same, so epoch 0 trains at the full lr and
the last epoch at a small but nonzero one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class LrSettings(Protocol):
    """The part of `autoseg.train.config.TrainerConfig` a schedule reads (so this module needs no config import)."""

    @property
    def lr(self) -> float: ...
    @property
    def epochs(self) -> int: ...
    @property
    def poly_exponent(self) -> float: ...
    @property
    def lr_schedule(self) -> str: ...


def poly_lr(epoch: int, cfg: LrSettings) -> float:
    """``cfg.lr * (1 - epoch / cfg.epochs) ** cfg.poly_exponent`` (nnU-Net's PolyLRScheduler)."""
    if not 0 <= epoch <= cfg.epochs:
        raise ValueError(f"epoch {epoch} outside 0..{cfg.epochs}")
    return cfg.lr * (1.0 - epoch / cfg.epochs) ** cfg.poly_exponent


def constant_lr(epoch: int, cfg: LrSettings) -> float:
    """``cfg.lr`` every epoch (an ablation baseline)."""
    if not 0 <= epoch <= cfg.epochs:
        raise ValueError(f"epoch {epoch} outside 0..{cfg.epochs}")
    return cfg.lr


LR_SCHEDULES: dict[str, Callable[[int, LrSettings], float]] = {
    "poly": poly_lr,
    "constant": constant_lr,
}
"""``TrainerConfig.lr_schedule`` name -> schedule."""


def learning_rate(epoch: int, cfg: LrSettings) -> float:
    """The learning rate for ``epoch`` under the configured schedule."""
    return LR_SCHEDULES[cfg.lr_schedule](epoch, cfg)
