"""Checkpoints: state dicts plus JSON metadata, written atomically, loaded with ``weights_only=True``.

A checkpoint holds everything needed to (a) continue a run exactly where it stopped
(model / optimizer / GradScaler state, epoch, best EMA pseudo-Dice, the per-epoch log, RNG
states) and (b) rebuild the network without any other file (the `TrainerConfig`, the
`Plan`, the configuration name, channel and class counts). Records are stored as JSON
strings, never pickled objects, so loading needs only ``torch.load(..., weights_only=True)``.
Inference rebuilds a network with `load_checkpoint` + ``autoseg.nets.unet.build_unet``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import atomic_write_with, record_from_dict, record_to_dict
from autoseg.planning.plans import Plan
from autoseg.train.config import TrainerConfig

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "autoseg.checkpoint"
CHECKPOINT_VERSION = 1

LATEST = "checkpoint_latest.pt"
"""Written every `TrainerConfig.save_every` epochs and on SIGINT/SIGTERM; `--continue` starts here."""
BEST = "checkpoint_best.pt"
"""Written when the EMA pseudo-Dice reaches a new best."""
FINAL = "checkpoint_final.pt"
"""Written once, when the last epoch is done; its presence means the run is finished."""


@dataclass(frozen=True)
class RngState:
    """Random generator states to continue a run exactly (torch CPU / CUDA, the run's numpy Generator)."""

    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] = field(default_factory=list)
    numpy: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Checkpoint:
    """One training checkpoint, as loaded (or about to be saved)."""

    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scaler_state: dict[str, Any]
    epoch: int
    """Epochs completed; training continues with epoch index ``epoch``."""
    best_ema_pseudo_dice: float | None
    history: list[dict[str, Any]]
    """The per-epoch log records (as in training_log.jsonl), epochs 0..epoch-1."""
    rng: RngState
    trainer_config: TrainerConfig
    plan: Plan
    config_name: str
    dataset: str
    fold: int | str
    num_input_channels: int
    num_classes: int


def save_checkpoint(path: str | os.PathLike[str], ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically: a unique temp file in the same folder, fsync, ``os.replace``."""
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "model_state": ckpt.model_state,
        "optimizer_state": ckpt.optimizer_state,
        "scaler_state": ckpt.scaler_state,
        "epoch": int(ckpt.epoch),
        "best_ema_pseudo_dice": ckpt.best_ema_pseudo_dice,
        "history_json": json.dumps(ckpt.history),
        "rng_torch_cpu": ckpt.rng.torch_cpu,
        "rng_torch_cuda": list(ckpt.rng.torch_cuda),
        "rng_numpy_json": json.dumps(ckpt.rng.numpy),
        "trainer_config_json": json.dumps(record_to_dict(ckpt.trainer_config)),
        "plan_json": json.dumps(record_to_dict(ckpt.plan)),
        "config_name": ckpt.config_name,
        "dataset": ckpt.dataset,
        "fold": str(ckpt.fold),
        "num_input_channels": int(ckpt.num_input_channels),
        "num_classes": int(ckpt.num_classes),
    }
    return atomic_write_with(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint` (``weights_only=True``; strict format check)."""
    path = Path(path)
    if not path.is_file():
        raise AutosegError("checkpoint not found", where=path)
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, foreign pickle, ...
        raise AutosegError(f"cannot load checkpoint ({type(e).__name__}: {e})", where=path) from None
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        raise AutosegError("not an autoseg checkpoint", where=path)
    if raw.get("format_version") != CHECKPOINT_VERSION:
        raise AutosegError(f"checkpoint format_version {raw.get('format_version')!r} is not "
                           f"{CHECKPOINT_VERSION}", where=path)
    try:
        fold_text = raw["fold"]
        return Checkpoint(
            model_state=raw["model_state"],
            optimizer_state=raw["optimizer_state"],
            scaler_state=raw["scaler_state"],
            epoch=int(raw["epoch"]),
            best_ema_pseudo_dice=raw["best_ema_pseudo_dice"],
            history=json.loads(raw["history_json"]),
            rng=RngState(torch_cpu=raw["rng_torch_cpu"], torch_cuda=list(raw["rng_torch_cuda"]),
                         numpy=json.loads(raw["rng_numpy_json"])),
            trainer_config=record_from_dict(TrainerConfig, json.loads(raw["trainer_config_json"]),
                                            where=f"{path}:trainer_config"),
            plan=record_from_dict(Plan, json.loads(raw["plan_json"]), where=f"{path}:plan"),
            config_name=raw["config_name"],
            dataset=raw["dataset"],
            fold=int(fold_text) if fold_text.isdigit() else fold_text,
            num_input_channels=int(raw["num_input_channels"]),
            num_classes=int(raw["num_classes"]),
        )
    except KeyError as e:
        raise AutosegError(f"checkpoint lacks key {e.args[0]!r}", where=path) from None


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], where: str | os.PathLike[str]) -> None:
    """Load weights strictly: a missing or an unused key is an error (a different network)."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise AutosegError(f"weights do not fit the network: {str(e).splitlines()[-1].strip()}",
                           where=where) from None
    problems = []
    if result.missing_keys:
        problems.append(f"missing keys {result.missing_keys[:5]}{' ...' if len(result.missing_keys) > 5 else ''}")
    if result.unexpected_keys:
        problems.append(f"unused keys {result.unexpected_keys[:5]}"
                        f"{' ...' if len(result.unexpected_keys) > 5 else ''}")
    if problems:
        raise AutosegError("weights do not fit the network: " + "; ".join(problems), where=where)
