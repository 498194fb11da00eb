"""Checkpoints: state dicts plus JSON metadata, written atomically, loaded with ``weights_only=True``.

A checkpoint holds everything needed to (a) continue a run exactly where it stopped
(model / optimizer / GradScaler state, epoch, best EMA pseudo-Dice, the per-epoch log, RNG
states) and (b) rebuild the network without any other file (the `TrainerConfig`, the
`Plan`, the configuration name, channel and class counts). Records are stored as JSON
strings, never pickled objects, so loading needs only ``torch.load(..., weights_only=True)``.
Inference rebuilds a network with `load_checkpoint` + ``autoseg.nets.unet.build_unet``.

A file that cannot be used (truncated, not a torch file, or a pickle that would import code)
is a `CheckpointUnreadable` with one line naming the file; nothing in it is ever executed.
Before each new ``checkpoint_latest.pt`` the old one becomes ``checkpoint_latest.prev.pt``,
so ``--continue`` has a good checkpoint to fall back on when the newest is unreadable.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import warnings
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
PREVIOUS = "checkpoint_latest.prev.pt"
"""The ``checkpoint_latest.pt`` before the current one (`save_latest`); removed once the run is finished."""

STALE_TEMP_RE = re.compile(r"^\.checkpoint_[A-Za-z0-9_.]+\.pt\..+\.tmp$")
"""Temp files of checkpoint writes (``atomic_write_with``: ``.<name>.<random>.tmp``)."""


class CheckpointUnreadable(AutosegError):
    """A checkpoint file exists but cannot be used: truncated, not a torch file, refused or foreign."""


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
    pretrained_from: dict[str, Any] | None = None
    """Where the run's initial weights came from (`autoseg.train.pretrained.transfer_weights`'s
    record); None for a run trained from scratch. Absent in older checkpoints (read as None)."""


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
        "pretrained_from_json": json.dumps(ckpt.pretrained_from),
    }
    return atomic_write_with(path, lambda f: torch.save(payload, f))


def save_latest(fold_dir: str | os.PathLike[str], ckpt: Checkpoint) -> Path:
    """Write ``checkpoint_latest.pt``, first keeping the current one as ``checkpoint_latest.prev.pt``.

    The old file is hard-linked (copied where links fail) to a temp name and renamed over
    the previous one, so at every instant both names hold a complete checkpoint.
    """
    fold_dir = Path(fold_dir)
    latest = fold_dir / LATEST
    if latest.is_file():
        _atomic_copy(latest, fold_dir / PREVIOUS)
    return save_checkpoint(latest, ckpt)


def load_latest(fold_dir: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Checkpoint:
    """``--continue``'s checkpoint: ``checkpoint_latest.pt``, else ``checkpoint_latest.prev.pt``.

    When latest is unreadable (or gone) and the previous one loads, a warning names both and
    the previous file is copied over latest, so the run goes on from a good state and the next
    save keeps a good ``prev``. With neither usable: one `CheckpointUnreadable` line.
    """
    fold_dir = Path(fold_dir)
    latest, previous = fold_dir / LATEST, fold_dir / PREVIOUS
    try:
        return load_checkpoint(latest, map_location)
    except AutosegError as e:
        if not previous.is_file():
            raise CheckpointUnreadable(f"{e.message}; no {PREVIOUS} to fall back on: start over with --force",
                                       where=latest) from None
        problem = e.message
    try:
        ckpt = load_checkpoint(previous, map_location)
    except AutosegError as e:
        raise CheckpointUnreadable(f"{problem}; {PREVIOUS} is no good either ({e.message}): start over with "
                                   "--force", where=latest) from None
    log.warning("%s: %s; continuing from %s (epoch %d), which replaces it", latest, problem, previous, ckpt.epoch)
    _atomic_copy(previous, latest)
    return ckpt


def _atomic_copy(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # copyfile's disk-full error names no file
            raise OSError(e.errno, os.strerror(e.errno), str(dest)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temp_files(fold_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete checkpoint temp files left by a killed writer; call only while holding the fold's lock.

    The lock means no other process is writing this fold's checkpoints, so every
    ``.checkpoint_*.pt.*.tmp`` in the folder belongs to a dead writer. Nothing else is touched.
    """
    removed = []
    for f in Path(fold_dir).iterdir() if Path(fold_dir).is_dir() else ():
        if STALE_TEMP_RE.match(f.name) and f.is_file():
            size = f.stat().st_size
            f.unlink(missing_ok=True)
            removed.append(f)
            log.info("removed %s (%.1f MB), left by a killed checkpoint write", f, size / 1e6)
    return removed


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu",
                    hint: str = "") -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint` (``weights_only=True``; strict format check).

    A file that cannot be used raises `CheckpointUnreadable`: one line naming the file and the
    problem, then ``hint`` (what the caller's user can do instead, e.g. another ``--checkpoint``).
    """
    path = Path(path)
    suffix = f"; {hint}" if hint else ""
    if not path.is_file():
        raise AutosegError(f"checkpoint not found{suffix}", where=path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files
            warnings.simplefilter("ignore")
            raw = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, foreign pickle, ...
        raise CheckpointUnreadable(_load_problem(e) + suffix, where=path) from None
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointUnreadable(f"not an autoseg checkpoint{suffix}", where=path)
    if raw.get("format_version") != CHECKPOINT_VERSION:
        raise CheckpointUnreadable(f"checkpoint format_version {raw.get('format_version')!r} is not "
                                   f"{CHECKPOINT_VERSION}{suffix}", where=path)
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
            pretrained_from=json.loads(raw.get("pretrained_from_json", "null")),
        )
    except KeyError as e:
        raise CheckpointUnreadable(f"checkpoint lacks key {e.args[0]!r}{suffix}", where=path) from None
    except (ValueError, TypeError, AttributeError) as e:  # a damaged JSON record inside
        raise CheckpointUnreadable(f"damaged checkpoint record ({type(e).__name__}){suffix}", where=path) from None


def _load_problem(e: Exception) -> str:
    """One line for what ``torch.load(weights_only=True)`` refused (its own text runs ~8 lines)."""
    text = str(e)
    found = re.search(r"GLOBAL (\S+)", text)
    if found:
        return (f"refused to load: the file is a pickle that would import {found.group(1).rstrip('.,:;')} "
                "(it could run code), not an autoseg checkpoint")
    if isinstance(e, PermissionError):
        return "cannot read checkpoint: permission denied"
    if (isinstance(e, EOFError) or "PytorchStreamReader" in text
            or isinstance(e, OSError) and e.errno == errno.EINVAL):  # EINVAL: a seek past the end
        return "cannot load checkpoint: the file is truncated or corrupt"
    first = text.strip().splitlines()[0] if text.strip() else ""
    if "Weights only load failed" in first or "Unsupported operand" in text:
        return "cannot load checkpoint: not a torch checkpoint file (corrupt or another format)"
    return f"cannot load checkpoint ({type(e).__name__}: {first[:120]})"


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
