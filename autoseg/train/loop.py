"""`fit`: the training loop, kept on one screen (nanoGPT / Lightning Fabric style).

Per epoch: set the poly learning rate, run ``iterations_per_epoch`` SGD steps (AMP autocast,
gradient clipping), run ``val_iterations`` validation batches collecting TP/FP/FN of the
argmax prediction per foreground class (nnU-Net's online "pseudo-Dice"; voxels with the
ignore label in the target are left out, as in the loss; per region, sigmoid > 0.5, when
training regions), update its moving
average, append one line to ``training_log.jsonl`` (losses, pseudo-Dice, lr, wall time, and
``train_cpu_s``: this process's CPU seconds in the training phase, the figure the parity harness
compares with nnU-Net's per iteration), redraw ``progress.png`` and write
checkpoints. A stop request (SIGINT/SIGTERM, set by the caller on ``stop``) ends the current
iteration, saves ``checkpoint_latest.pt`` and raises `TrainingInterrupted`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autoseg.common.encoding import require_utf8_for_compile
from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import atomic_write_text
from autoseg.common.progress import progress
from autoseg.dataset.spec import LabelScheme
from autoseg.planning.plans import Plan
from autoseg.train import checkpoint as ckpt_files
from autoseg.train.checkpoint import (
    Checkpoint,
    RngState,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
    save_latest,
)
from autoseg.train.config import TrainerConfig
from autoseg.train.ddp import DistContext, all_reduce_sum, device_for, wrap_model
from autoseg.train.progress_plot import plot_progress
from autoseg.train.schedules import learning_rate

log = logging.getLogger(__name__)

LOG_FILE = "training_log.jsonl"
PROGRESS_PNG = "progress.png"
EXIT_INTERRUPTED = 130
"""Exit status after SIGINT/SIGTERM (128 + SIGINT); the scheduler resumes such runs with --continue."""


class TrainingInterrupted(Exception):
    """Training stopped on request after saving ``checkpoint_latest.pt``; continue with resume."""

    def __init__(self, epoch: int, checkpoint: Path | None) -> None:
        self.epoch = epoch
        self.checkpoint = checkpoint
        super().__init__(f"interrupted during epoch {epoch}; saved {checkpoint}")


@dataclass(frozen=True)
class Runtime:
    """Device, precision, compilation and the distributed position, decided once."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    use_grad_scaler: bool = False
    compile: bool = False
    dist: DistContext = field(default_factory=DistContext)
    quiet: bool = False


def resolve_runtime(cfg: TrainerConfig, device: str = "auto", dist: DistContext | None = None,
                    quiet: bool = False) -> Runtime:
    """Turn "auto" settings into concrete ones: bf16 autocast and torch.compile on CUDA only."""
    dist = dist or DistContext()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise AutosegError(f"device must be auto, cpu or cuda, got {device!r}", where="--device")
    if device == "cuda" and not torch.cuda.is_available():
        raise AutosegError("CUDA requested but no GPU is visible to torch", where="--device")
    on_cuda = device == "cuda"
    amp = {"auto": "bf16" if on_cuda else "off"}.get(cfg.amp, cfg.amp)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    compile_on = {"auto": on_cuda, "true": True, "false": False}[cfg.compile]
    if compile_on:
        require_utf8_for_compile()  # inductor reads its templates in the locale's encoding
    return Runtime(device=device_for(dist, device), amp_dtype=dtype, use_grad_scaler=amp == "fp16",
                   compile=compile_on, dist=dist, quiet=quiet)


@dataclass(frozen=True)
class RunMeta:
    """What a checkpoint records about the run besides training state."""

    plan: Plan
    config_name: str
    dataset: str
    fold: int | str
    num_input_channels: int
    num_classes: int
    pretrained_from: dict[str, Any] | None = None
    """Where the initial weights came from (fine-tuning), None from scratch; kept in every checkpoint."""


@dataclass
class FitSetup:
    """Everything `fit` trains with: the network, its loss, the two batch streams, where to write."""

    net: nn.Module
    loss_fn: nn.Module
    train_batches: Iterator[dict[str, Any]]
    val_batches: Iterator[dict[str, Any]]
    cfg: TrainerConfig
    meta: RunMeta
    out_dir: Path
    rng: np.random.Generator
    """The run's numpy Generator (its state goes into checkpoints; the caller derives loader seeds from it)."""
    augment_device: str = "cpu"
    """Where the training batches were augmented (``cpu`` workers or the training ``device``), for the log."""
    on_epoch: Callable[[dict[str, Any]], None] | None = None
    """Called on rank 0 with each epoch's training_log.jsonl record, right after it is written (the fold
    run's tracker hangs here: training knows nothing of trackers). It must return at once and not raise."""


@dataclass(frozen=True)
class FitResult:
    epochs_completed: int
    best_ema_pseudo_dice: float | None
    final_ema_pseudo_dice: float | None
    history: list[dict[str, Any]]
    final_checkpoint: Path | None


def fit(setup: FitSetup, rt: Runtime, resume: Checkpoint | None = None,
        stop: threading.Event | None = None) -> FitResult:
    """Train ``setup.net`` from scratch or from ``resume`` until ``cfg.epochs``; see the module doc."""
    cfg, net, out = setup.cfg, setup.net, setup.out_dir
    main = rt.dist.is_main
    stop = stop or threading.Event()
    net.to(rt.device)
    optimizer = make_optimizer(net, cfg)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.use_grad_scaler)
    epoch, best, history = _restore(setup, optimizer, scaler, resume, main)
    if rt.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed patch size: let cuDNN pick the fastest kernels
    model = wrap_model(net, rt.dist, rt.device)
    if rt.compile:
        model = torch.compile(model)

    def save(name: str, epochs_done: int) -> Path:
        write = (lambda c: save_latest(out, c)) if name == ckpt_files.LATEST else (
            lambda c: save_checkpoint(out / name, c))
        return write(Checkpoint(
            model_state=net.state_dict(), optimizer_state=optimizer.state_dict(),
            scaler_state=scaler.state_dict() if rt.use_grad_scaler else {}, epoch=epochs_done,
            best_ema_pseudo_dice=best, history=history, rng=_capture_rng(setup.rng),
            trainer_config=cfg, plan=setup.meta.plan, config_name=setup.meta.config_name,
            dataset=setup.meta.dataset, fold=setup.meta.fold,
            num_input_channels=setup.meta.num_input_channels, num_classes=setup.meta.num_classes,
            pretrained_from=setup.meta.pretrained_from))

    while epoch < cfg.epochs:
        lr = learning_rate(epoch, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        train = _train_epoch(model, setup, optimizer, scaler, rt, epoch, stop)
        if train is None:  # stop requested mid-epoch: keep the weights, redo this epoch on resume
            raise TrainingInterrupted(epoch, save(ckpt_files.LATEST, epoch) if main else None)
        val_loss, dice = _validate(model, setup, rt)
        record = _epoch_record(epoch, cfg, lr, train, val_loss, dice, history, time.perf_counter() - t0,
                               setup.augment_device)
        history.append(record)
        epoch += 1
        improved = record["ema_pseudo_dice"] is not None and (best is None or record["ema_pseudo_dice"] > best)
        best = record["ema_pseudo_dice"] if improved else best
        stopping = _stop_requested(stop, rt)
        if main:
            _append_log(out / LOG_FILE, record)
            plot_progress(history, out / PROGRESS_PNG)
            if setup.on_epoch is not None:
                setup.on_epoch(record)
            if improved:  # before latest: a kill in between must not leave latest promising a newer best
                save(ckpt_files.BEST, epoch)
            if epoch % cfg.save_every == 0 or epoch == cfg.epochs or stopping:
                save(ckpt_files.LATEST, epoch)
            log.info("epoch %d/%d: train loss %.4f, val loss %.4f, pseudo-Dice %s, EMA %s, %.1f s",
                     epoch, cfg.epochs, train["loss"], val_loss, _fmt(dice), _fmt([record["ema_pseudo_dice"]]),
                     record["epoch_time_s"])
        if stopping and epoch < cfg.epochs:
            raise TrainingInterrupted(epoch, out / ckpt_files.LATEST if main else None)
    final = save(ckpt_files.FINAL, epoch) if main else None
    if main:  # the fallback for an unreadable latest is not needed by a finished run
        (out / ckpt_files.PREVIOUS).unlink(missing_ok=True)
    return FitResult(epochs_completed=epoch, best_ema_pseudo_dice=best,
                     final_ema_pseudo_dice=history[-1]["ema_pseudo_dice"] if history else None,
                     history=history, final_checkpoint=final)


def _restore(setup: FitSetup, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             resume: Checkpoint | None, main: bool) -> tuple[int, float | None, list[dict[str, Any]]]:
    """Load a checkpoint's weights, optimizer, scaler and torch RNG; (epoch, best EMA, history) to go on from."""
    if resume is None:
        return 0, None, []
    out = setup.out_dir
    load_model_state(setup.net, resume.model_state, where=out / ckpt_files.LATEST)
    optimizer.load_state_dict(resume.optimizer_state)
    if resume.scaler_state:
        scaler.load_state_dict(resume.scaler_state)
    _restore_torch_rng(resume.rng)
    history = list(resume.history)
    best = resume.best_ema_pseudo_dice
    if main:  # the log may hold an epoch the checkpoint did not reach (killed in between)
        atomic_write_text(out / LOG_FILE, "".join(json.dumps(r) + "\n" for r in history))
        best = _best_on_disk(out, best)
    return resume.epoch, best, history


def _best_on_disk(out: Path, recorded: float | None) -> float | None:
    """The best EMA pseudo-Dice that ``checkpoint_best.pt`` really holds, so a new best is judged against it.

    ``checkpoint_latest.pt`` may disagree: it is written every ``save_every`` epochs while the best
    is written whenever it improves, and a kill can fall between the two writes. Trusting latest
    would overwrite a better best.pt, or leave an older one standing for a newer value.
    """
    path = out / ckpt_files.BEST
    if not path.is_file():
        if recorded is not None:
            log.warning("%s is missing; the next epoch's EMA pseudo-Dice starts a new best", path)
        return None
    try:
        held = load_checkpoint(path).best_ema_pseudo_dice
    except AutosegError as e:
        log.warning("%s; the next epoch's EMA pseudo-Dice starts a new best", e)
        return None
    if held != recorded:  # lower: an older file (killed between the writes); higher: saved after latest
        lost = held is None or (recorded is not None and held < recorded)
        (log.warning if lost else log.info)(
            "%s holds EMA pseudo-Dice %s, %s recorded %s; new bests are judged against the file",
            path, _fmt([held]), ckpt_files.LATEST, _fmt([recorded]))
    return held


def _epoch_record(epoch: int, cfg: TrainerConfig, lr: float, train: dict[str, float], val_loss: float,
                  dice: list[float], history: list[dict[str, Any]], seconds: float,
                  augment_device: str) -> dict[str, Any]:
    """The training_log.jsonl line of one epoch (NaN written as null, so the file is strict JSON)."""
    previous = history[-1]["ema_pseudo_dice"] if history else None
    return {
        "epoch": epoch, "epochs": cfg.epochs, "train_loss": train["loss"],
        "val_loss": _finite_or_none(val_loss), "pseudo_dice": [_finite_or_none(d) for d in dice],
        "mean_pseudo_dice": _finite_or_none(_nanmean(dice)),
        "ema_pseudo_dice": _ema(previous, dice, cfg.ema_alpha), "lr": lr, "epoch_time_s": seconds,
        "iterations_per_s": train["iterations_per_s"], "data_wait_fraction": train["data_wait_fraction"],
        "train_cpu_s": train["train_cpu_s"], "augment_device": augment_device,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _train_epoch(model: nn.Module, setup: FitSetup, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, rt: Runtime, epoch: int,
                 stop: threading.Event) -> dict[str, float] | None:
    """One epoch of SGD steps; None when a stop was requested (after finishing the current step)."""
    cfg = setup.cfg
    model.train()
    losses, wait_s, t_start, cpu_start = [], 0.0, time.perf_counter(), time.process_time()
    bar = progress(range(cfg.iterations_per_epoch), total=cfg.iterations_per_epoch,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", enabled=not rt.quiet and rt.dist.is_main)
    for _ in bar:
        t_wait = time.perf_counter()
        data, target = _to_device(next(setup.train_batches), rt.device)
        wait_s += time.perf_counter() - t_wait
        optimizer.zero_grad(set_to_none=True)
        with _autocast(rt):
            loss = setup.loss_fn(model(data), target)
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.detach())
        if _stop_requested(stop, rt):
            return None
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t_start
    mean_loss = all_reduce_sum(torch.stack(losses).mean().float().reshape(1), rt.dist) / rt.dist.world_size
    return {"loss": float(mean_loss), "iterations_per_s": len(losses) / elapsed,
            "data_wait_fraction": wait_s / elapsed, "train_cpu_s": time.process_time() - cpu_start}


@torch.no_grad()
def _validate(model: nn.Module, setup: FitSetup, rt: Runtime) -> tuple[float, list[float]]:
    """Mean val loss and per-foreground-class Dice from TP/FP/FN summed over all val batches."""
    scheme = setup.meta.plan.label_scheme
    n_fg = len(scheme.regions) if scheme.has_regions else setup.meta.num_classes - 1
    if setup.cfg.val_iterations == 0:
        return float("nan"), [float("nan")] * n_fg
    model.eval()
    counts = torch.zeros(3, n_fg, dtype=torch.float64, device=rt.device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=rt.device)
    for _ in range(setup.cfg.val_iterations):
        data, target = _to_device(next(setup.val_batches), rt.device)
        with _autocast(rt):
            output = model(data)
            loss_sum += setup.loss_fn(output, target).double()
        full = output[0] if isinstance(output, list | tuple) else output
        ref = target[0] if isinstance(target, list | tuple) else target
        if scheme.has_regions:
            counts += region_tp_fp_fn(full, ref, scheme)
        else:
            counts += tp_fp_fn(full.argmax(1), ref[:, 0].long(), setup.meta.num_classes)
    counts = all_reduce_sum(counts, rt.dist)
    loss_sum = all_reduce_sum(loss_sum, rt.dist)
    tp, fp, fn = counts.cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = 2 * tp / (2 * tp + fp + fn)
    return float(loss_sum) / (setup.cfg.val_iterations * rt.dist.world_size), [float(d) for d in dice]


def tp_fp_fn(pred: torch.Tensor, ref: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(3, K-1)`` true-positive / false-positive / false-negative voxel counts per foreground class.

    Reference voxels holding K (the ignore label of sparse annotations, see
    `autoseg.train.losses`) are unannotated: whatever is predicted there counts nowhere.
    """
    rows = []
    annotated = ref != num_classes
    for k in range(1, num_classes):
        p, r = (pred == k) & annotated, ref == k
        rows.append(torch.stack([(p & r).sum(), (p & ~r).sum(), (~p & r).sum()]))
    return torch.stack(rows, dim=1).double() if rows else torch.zeros(3, 0, dtype=torch.float64,
                                                                       device=pred.device)


def region_tp_fp_fn(logits: torch.Tensor, ref: torch.Tensor, scheme: LabelScheme) -> torch.Tensor:
    """``(3, R)`` TP / FP / FN voxel counts per region: predicted where sigmoid > 0.5 (logit > 0).

    ``ref`` is the label map ``(B, 1, *spatial)``; its ignore-label voxels count nowhere.
    """
    pred = logits > 0
    target = scheme.region_targets(ref.long()).bool()
    if scheme.ignore_label is not None:
        pred = pred & (ref != scheme.ignore_label)
    axes = (0, *range(2, pred.ndim))
    return torch.stack([(pred & target).sum(axes), (pred & ~target).sum(axes), (~pred & target).sum(axes)]).double()


def make_optimizer(net: nn.Module, cfg: TrainerConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (nnU-Net) or AdamW; the lr is set per epoch by the schedule."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _to_device(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, Any]:
    def move(x: Any) -> torch.Tensor:
        return torch.as_tensor(x).to(device, non_blocking=True)

    target = batch["target"]
    target = [move(t) for t in target] if isinstance(target, list | tuple) else move(target)
    return move(batch["data"]).float(), target


def _autocast(rt: Runtime) -> contextlib.AbstractContextManager[Any]:
    """Mixed-precision autocast when configured (bf16/fp16 on CUDA), else nothing."""
    if rt.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(rt.device.type, dtype=rt.amp_dtype)


def _stop_requested(stop: threading.Event, rt: Runtime) -> bool:
    """Whether any rank was asked to stop (all ranks must leave at the same step)."""
    if not rt.dist.enabled:
        return stop.is_set()
    flag = torch.tensor([1.0 if stop.is_set() else 0.0], device=rt.device)
    return bool(all_reduce_sum(flag, rt.dist).item() > 0)


def _ema(previous: float | None, dice: list[float], alpha: float) -> float | None:
    """nnU-Net's moving average of the mean foreground pseudo-Dice; NaN epochs leave it unchanged."""
    mean = _nanmean(dice)
    if math.isnan(mean):
        return previous
    return mean if previous is None else alpha * previous + (1 - alpha) * mean


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _finite_or_none(v: float) -> float | None:
    return None if math.isnan(v) else v


def _fmt(values: list[float | None]) -> str:
    return "[" + ", ".join("nan" if v is None or math.isnan(v) else f"{v:.4f}" for v in values) + "]"


def _append_log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _capture_rng(rng: np.random.Generator) -> RngState:
    cuda = [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return RngState(torch_cpu=torch.get_rng_state(), torch_cuda=cuda, numpy=rng.bit_generator.state)


def _restore_torch_rng(state: RngState) -> None:
    torch.set_rng_state(state.torch_cpu)
    if state.torch_cuda and torch.cuda.is_available() and len(state.torch_cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state.torch_cuda)
