"""`train_fold`: train one model (dataset x configuration x fold [x variant x seed]) end to end.

The run is isolated in its fold dir (``results/<ds>/<config>/<variant>/[seed_<s>/]fold_<k>/``,
`autoseg.pipeline.folds`): it writes nothing elsewhere, keeps its own ``tmp/`` and
``compile_cache/`` (`autoseg.pipeline.isolation`), and holds an exclusive ``.lock`` while it
trains so that two processes never train the same fold. It records what it used
(``trainer_config.json``, ``plans.json``, ``dataset.json``), trains with
`autoseg.train.loop.fit`, and finally predicts and scores the fold's validation cases
(`autoseg.pipeline.validate`).

Cascade (a configuration with ``previous_stage``, i.e. 3d_cascade_fullres): every fold of the
previous stage (same variant and seed) must be trained and validated first; their validation
exports give each case's previous-stage segmentation, which the loaders append as one-hot
input channels (C + K - 1 network inputs) and the final validation uses too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autoseg.common.errors import AutosegError
from autoseg.common.paths import Paths, TrainingId
from autoseg.data.augment import masked_channels, resolve_augment_device
from autoseg.data.loader import BatchLoader, DeviceAugmentedLoader, LoaderSpec, make_train_loader, make_val_loader
from autoseg.data.sampling import class_voxel_counts
from autoseg.dataset.spec import LabelScheme
from autoseg.infer.cascade import previous_stage_exports
from autoseg.nets.unet import build_unet, deep_supervision_scales, init_heads_to_prior, init_heads_to_region_prior
from autoseg.pipeline.folds import (
    VALIDATION_DIR,
    TrainResult,
    check_training_id,
    fold_lock,
    prepare_fold_dir,
    record_inputs,
)
from autoseg.pipeline.isolation import compile_cache, isolated_dirs, stop_on_signals
from autoseg.pipeline.tracking import FoldTracker, cpu_share, start_fold_tracking, tracked, tracked_validation
from autoseg.pipeline.validate import FoldValidation, validate_finished, validate_fold, validation_complete
from autoseg.planning.store import load_plan
from autoseg.planning.plans import Plan
from autoseg.splits import fold_cases, load_splits
from autoseg.track.fold import FoldFacts
from autoseg.track.spec import TrackRequest
from autoseg.train import checkpoint as ckpt_files
from autoseg.train.checkpoint import Checkpoint, load_checkpoint
from autoseg.train.config import TrainerConfig, changed_keys, default_num_workers, format_changes
from autoseg.train.ddp import DistContext, all_ranks_ok, barrier, init_distributed, shutdown_distributed
from autoseg.train.ddp import split_batch, split_oversample
from autoseg.train.loop import FitSetup, RunMeta, Runtime, fit, resolve_runtime
from autoseg.train.losses import build_loss
from autoseg.train.pretrained import PretrainedWeights, load_pretrained, transfer_weights

log = logging.getLogger(__name__)

VAL_LOADER_SEED_OFFSET = 10_000
"""Validation loaders draw from a different stream than training loaders of the same seed."""

RESUME_MAY_CHANGE = ("num_workers", "final_validation", "augment.device")
"""Keys a resumed (or finished) run takes from the command line: they do not change what is trained
(``augment.device`` moves the same augmentation between the CPU workers and the training device)."""

Loader = BatchLoader | DeviceAugmentedLoader


def train_fold(paths: Paths, tid: TrainingId, cfg: TrainerConfig, plan: Plan | None = None,
               device: str = "auto", resume: bool = False, force: bool = False,
               num_workers: int | None = None, quiet: bool = False,
               dist: DistContext | None = None, save_probabilities: bool = False,
               validation_only: bool = False, track: TrackRequest | None = None) -> TrainResult:
    """Train one fold; resume from ``checkpoint_latest.pt`` when asked; validate the fold at the end.

    ``save_probabilities`` keeps the validation softmax maps (``CASE.npz``, nnU-Net's ``--npz``)
    so that `find_best` can score ensembles. ``validation_only`` re-runs just the final
    validation from ``checkpoint_final.pt`` (nnU-Net's ``--val``), e.g. to add the probabilities.
    Resuming a finished run whose validation is missing or lacks requested probabilities
    (killed while validating) completes the validation instead of reporting it finished.

    ``tid.seed`` (sweeps) overrides ``cfg.seed``. ``num_workers`` is the caller's CPU share
    for data workers, used when ``cfg.num_workers`` is None. ``dist`` places this process in
    a torchrun group (rank 0 alone writes files). ``track`` logs the run to a tracker
    (`autoseg.pipeline.tracking`; rank 0 only, never stopping training); a fold whose validation
    ``resume`` completes gets its final metrics into its run; ``validation_only`` is not tracked.
    """
    dist = dist or DistContext()
    check_training_id(tid)
    if tid.seed is not None:
        cfg = dataclasses.replace(cfg, seed=tid.seed)
    rt = resolve_runtime(cfg, device, dist, quiet)
    if validation_only and (resume or force):
        raise AutosegError("--validation-only cannot be combined with --continue or --force",
                           where=paths.training_dir(tid))
    if save_probabilities and cfg.final_validation == "off" and not validation_only:
        raise AutosegError("--save-probabilities needs the final validation; drop --set final_validation=off",
                           where="final_validation")
    init_distributed(dist, rt.device.type)
    clean = False
    try:
        if validation_only:
            result = _validation_only(paths, tid, rt, save_probabilities, cfg.final_validation != "no_mirroring")
        else:
            request = _Request(paths, tid, cfg, plan, rt, resume, force, num_workers, save_probabilities, track)
            result = _train_fold_locked(request)
        clean = True
        return result
    finally:
        shutdown_distributed(dist, clean=clean)


@dataclass(frozen=True)
class _Request:
    """What `train_fold` was asked to do, once checked (``rt``: the resolved device, AMP, compile, ranks)."""

    paths: Paths
    tid: TrainingId
    cfg: TrainerConfig
    plan: Plan | None
    rt: Runtime
    resume: bool
    force: bool
    num_workers: int | None
    save_probabilities: bool
    track: TrackRequest | None = None


@dataclass(frozen=True)
class _FoldRun:
    """One fold's training as it will run: the settled config and plan, where to start from."""

    request: _Request
    cfg: TrainerConfig
    plan: Plan
    ckpt: Checkpoint | None
    fold_dir: Path
    workers: int
    rt: Runtime
    pretrained: PretrainedWeights | None


def _validation_only(paths: Paths, tid: TrainingId, rt: Runtime, save_probabilities: bool,
                     mirroring: bool = True) -> TrainResult:
    """Re-run the final validation of a trained fold under its lock (rank 0; other ranks wait)."""
    fold_dir = paths.training_dir(tid)
    if not (fold_dir / ckpt_files.FINAL).is_file():
        raise AutosegError(f"{ckpt_files.FINAL} not found: train this fold to the end before validating it",
                           where=fold_dir)
    if not rt.dist.is_main:
        barrier(rt.dist)
        return TrainResult(tid, fold_dir, "validated", 0, None, None)
    with fold_lock(fold_dir), isolated_dirs(fold_dir):
        job = FoldValidation(paths, tid, rt.device, save_probabilities, show_progress=not rt.quiet)
        result = validate_finished(job, mirroring)
    barrier(rt.dist)
    return result


def _checked_inputs(req: _Request, resumable: bool) -> tuple[Plan | None, PretrainedWeights | None]:
    """The plan and pretrained weights, checked before the fold dir is touched (a bad input leaves no trace)."""
    fold_dir = req.paths.training_dir(req.tid)
    plan = req.plan
    if plan is None and not resumable:
        plan = load_plan(req.paths, req.tid.dataset, req.tid.plans)
    if plan is not None and plan.preset != req.tid.plans:
        raise AutosegError(f"the plan is a {plan.preset!r} plan but the run is filed under {req.tid.plans!r} plans",
                           where=fold_dir)
    if plan is not None:  # a cascade fold without its previous stage fails here
        previous_stage_exports(req.paths, req.tid, plan)
    pretrained = None
    if req.cfg.pretrained is not None and not resumable:
        pretrained = _checked_pretrained(req.cfg, plan, req.tid.config)
    return plan, pretrained


def _train_fold_locked(req: _Request) -> TrainResult:
    """Lock the fold dir (rank 0), settle resume/force, record inputs, then `_train`."""
    dist, tid, paths = req.rt.dist, req.tid, req.paths
    fold_dir = paths.training_dir(tid)
    resumable = req.resume and any((fold_dir / n).is_file()
                                   for n in (ckpt_files.LATEST, ckpt_files.PREVIOUS, ckpt_files.FINAL))
    plan, pretrained = _checked_inputs(req, resumable)
    fold_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        ckpt = _enter_fold_dir(stack, req, fold_dir)
        stack.enter_context(isolated_dirs(fold_dir))
        if ckpt is None and not dist.is_main and req.resume and (fold_dir / ckpt_files.LATEST).is_file():
            ckpt = load_checkpoint(fold_dir / ckpt_files.LATEST)
        if ckpt is not None and req.resume and (fold_dir / ckpt_files.FINAL).is_file():
            return _finished(req, ckpt, fold_dir)
        cfg, rt = req.cfg, req.rt
        if ckpt is not None:
            cfg, plan = _config_for_resume(ckpt, cfg), ckpt.plan
            rt = resolve_runtime(cfg, rt.device.type, dist, rt.quiet)  # amp/compile as the run began
        elif plan is None:  # resumable files vanished meanwhile
            plan = load_plan(paths, tid.dataset, tid.plans)
        workers = cfg.num_workers if cfg.num_workers is not None else (
            req.num_workers if req.num_workers is not None
            else default_num_workers(os.cpu_count() or 1, dist.world_size))
        if dist.is_main:
            record_inputs(paths, tid.dataset, fold_dir, cfg, plan)
        return _train(_FoldRun(req, cfg, plan, ckpt, fold_dir, workers, rt, pretrained))


def _enter_fold_dir(stack: contextlib.ExitStack, req: _Request, fold_dir: Path) -> Checkpoint | None:
    """Take the fold's lock (rank 0) and check its contents; every rank learns whether rank 0 refused."""
    dist = req.rt.dist
    try:
        if dist.is_main:
            stack.enter_context(fold_lock(fold_dir))
        ckpt = prepare_fold_dir(fold_dir, req.resume, req.force, dist.is_main)
    except AutosegError:
        all_ranks_ok(False, dist)  # release the other ranks before failing
        raise
    if not all_ranks_ok(True, dist):
        raise AutosegError("rank 0 refused to start (see its error)", where=fold_dir)
    return ckpt


def _finished(req: _Request, ckpt: Checkpoint, fold_dir: Path) -> TrainResult:
    """Resuming a finished run: complete its validation if that is missing, else report it finished."""
    tid, dist = req.tid, req.rt.dist
    finished_cfg = _config_for_resume(ckpt, req.cfg, finished=True)
    wanted = req.save_probabilities or finished_cfg.final_validation != "off"
    if dist.is_main and wanted and not validation_complete(req.paths, tid, fold_dir, req.save_probabilities):
        log.info("%s is trained but its validation is incomplete; validating", tid)
        return tracked_validation(req.track, ckpt, fold_dir, tid, lambda: validate_finished(
            _validation_of(req, req.rt), finished_cfg.final_validation != "no_mirroring"))
    log.info("%s is finished (%s exists); nothing to do", tid, ckpt_files.FINAL)
    return TrainResult(tid, fold_dir, "already_finished", ckpt.epoch, ckpt.best_ema_pseudo_dice,
                       ckpt.history[-1]["ema_pseudo_dice"] if ckpt.history else None,
                       fold_dir / VALIDATION_DIR if dist.is_main else None)


def _validation_of(req: _Request, rt: Runtime) -> FoldValidation:
    """The request's final validation, run on ``rt``'s device (rank 0 only)."""
    return FoldValidation(req.paths, req.tid, rt.device, req.save_probabilities, not rt.quiet)


def _checked_pretrained(cfg: TrainerConfig, plan: Plan | None, config_name: str) -> PretrainedWeights:
    """Load ``cfg.pretrained`` and check it fits this run's network (a throwaway one, built on the CPU)."""
    pretrained = load_pretrained(str(cfg.pretrained))
    if plan is not None:
        n_in = input_channels(plan, config_name)
        net = build_unet(plan.configuration(config_name), n_in, plan.num_classes, cfg.deep_supervision)
        transfer_weights(net, pretrained, n_in, plan.num_classes)
    return pretrained


def input_channels(plan: Plan, config_name: str) -> int:
    """Network inputs: the image channels, plus K-1 one-hot channels of the previous stage for a cascade."""
    extra = plan.num_classes - 1 if plan.configuration(config_name).previous_stage is not None else 0
    return plan.num_channels + extra


def _train(run: _FoldRun) -> TrainResult:
    """Build the network, loss and loaders, run `fit`, then validate the fold (rank 0)."""
    req, cfg, plan, rt, tid = run.request, run.cfg, run.plan, run.rt, run.request.tid
    config = plan.configuration(tid.config)
    train_ids, val_ids = fold_cases(load_splits(req.paths, tid.dataset), tid.fold)
    exports = previous_stage_exports(req.paths, tid, plan)  # {} unless a cascade stage
    if plan.label_scheme.has_regions and exports:
        raise AutosegError("region-based training has no cascade yet; train 3d_fullres or 2d", tid.config)
    rng = np.random.default_rng(cfg.seed)
    if run.ckpt is not None:
        rng.bit_generator.state = run.ckpt.rng.numpy
    # fresh runs seed loaders with seed + rank; a resumed run draws a new base from the restored
    # generator, so it neither replays the batches already seen nor depends on wall-clock time
    base_seed = cfg.seed if run.ckpt is None else int(rng.integers(2**31 - 1 - VAL_LOADER_SEED_OFFSET))
    net, meta = _build_network(run, train_ids)
    tracker = _start_tracking(run, req.track) if rt.dist.is_main and req.track is not None else None
    with tracked(tracker):
        train_loader, val_loader, augment_where = _make_loaders(run, train_ids, val_ids, exports, base_seed)
        num_ds = len(deep_supervision_scales(config)) if cfg.deep_supervision else 1
        setup = FitSetup(net=net, loss_fn=build_loss(cfg.loss, config.batch_dice, num_ds, rt.dist.enabled,
                                                     plan.label_scheme),
                         train_batches=train_loader, val_batches=val_loader, cfg=cfg, meta=meta,
                         out_dir=run.fold_dir, rng=rng, augment_device=augment_where,
                         on_epoch=tracker.on_epoch if tracker is not None else None)
        try:
            with stop_on_signals() as stop, compile_cache(run.fold_dir, rt.compile):
                result = fit(setup, rt, resume=run.ckpt, stop=stop)
        finally:
            train_loader.close()
            val_loader.close()
        validation_dir = None
        if rt.dist.is_main and cfg.final_validation == "off":
            log.info("%s: final validation skipped (final_validation=off); `--validation-only` runs it later", tid)
        elif rt.dist.is_main:
            validation_dir = validate_fold(_validation_of(req, rt), net, plan, cfg)
        if tracker is not None:
            tracker.finish(result, validation_dir)
    barrier(rt.dist)
    return TrainResult(tid, run.fold_dir, "trained", result.epochs_completed, result.best_ema_pseudo_dice,
                       result.final_ema_pseudo_dice, validation_dir)


def _start_tracking(run: _FoldRun, track: TrackRequest) -> FoldTracker | None:
    """Open the fold's tracker run before the loaders fork their workers (the tracker is imported here)."""
    cfg, plan, tid = run.cfg, run.plan, run.request.tid
    facts = FoldFacts(tid=tid, cfg=cfg, plan=plan, device=str(run.rt.device), data_workers=run.workers,
                      cpu_share=cpu_share(), environment=track.context.environment, sweep_params=track.context.params)
    batch = cfg.batch_size or plan.configuration(tid.config).batch_size
    return start_fold_tracking(track, facts, run.fold_dir, resumed=run.ckpt is not None, batch_size=batch)


def _build_network(run: _FoldRun, train_ids: list[str]) -> tuple[nn.Module, RunMeta]:
    """The run's network, its heads at the label prior or its weights from ``cfg.pretrained`` (fresh runs).

    A resumed run loads its checkpoint later (in `fit`), whose record says where its first weights came from.
    """
    cfg, plan, tid = run.cfg, run.plan, run.request.tid
    config = plan.configuration(tid.config)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    in_channels = input_channels(plan, tid.config)
    net = build_unet(config, in_channels, plan.num_classes, deep_supervision=cfg.deep_supervision)
    data_dir = run.request.paths.preprocessed_data(tid.dataset, config.data_identifier)
    scheme = plan.label_scheme
    if cfg.head_init == "prior" and run.ckpt is None:  # a resumed run loads its trained heads
        if scheme.has_regions:
            share = init_heads_to_region_prior(net, _region_shares(data_dir, train_ids, scheme))
        else:
            share = init_heads_to_prior(net, class_voxel_counts(data_dir, train_ids, plan.num_classes))
        log.info("segmentation heads start at the label prior %s", np.round(share, 4).tolist())
    pretrained_from = run.ckpt.pretrained_from if run.ckpt is not None else None
    if run.ckpt is None and cfg.pretrained is not None:
        pretrained_from = transfer_weights(net, run.pretrained or load_pretrained(cfg.pretrained), in_channels,
                                           plan.num_classes)
    meta = RunMeta(plan=plan, config_name=tid.config, dataset=tid.dataset, fold=tid.fold,
                   num_input_channels=in_channels, num_classes=plan.num_classes, pretrained_from=pretrained_from)
    return net, meta


def _make_loaders(run: _FoldRun, train_ids: list[str], val_ids: list[str], exports: dict[str, Path],
                  base_seed: int) -> tuple[Loader, BatchLoader, str]:
    """This rank's training and validation loaders, and where the training batches are augmented."""
    cfg, plan, rt, tid = run.cfg, run.plan, run.rt, run.request.tid
    config = plan.configuration(tid.config)
    global_batch = cfg.batch_size or config.batch_size
    batch = split_batch(global_batch, rt.dist)
    # this rank's share of the global batch's forced-foreground samples, not the rule on its local batch
    oversample = split_oversample(global_batch, cfg.oversample_foreground, rt.dist)
    data_dir = run.request.paths.preprocessed_data(tid.dataset, config.data_identifier)

    def spec(ids: list[str], seed: int) -> LoaderSpec:
        return LoaderSpec(data_dir=data_dir, case_ids=tuple(ids), config=config, augment=cfg.augment,
                          batch_size=batch, num_workers=run.workers, seed=seed,
                          deep_supervision=cfg.deep_supervision,
                          oversample_foreground=oversample,
                          pin_memory=rt.device.type == "cuda",
                          previous_stage=tuple(exports[c] for c in ids) if exports else (),
                          num_classes=plan.num_classes if exports else 0,
                          masked_channels=masked_channels(plan.normalization))

    augment_where = resolve_augment_device(cfg.augment.device, rt.device.type)
    log.info("augmentation runs on %s (augment.device=%s)",
             "the CPU data workers" if augment_where == "cpu" else f"the training device ({rt.device})",
             cfg.augment.device)
    train_loader = make_train_loader(spec(train_ids, base_seed + rt.dist.rank), rt.device)
    val_loader = make_val_loader(spec(val_ids, base_seed + VAL_LOADER_SEED_OFFSET + rt.dist.rank))
    return train_loader, val_loader, augment_where


def _region_shares(data_dir: Path, case_ids: list[str], scheme: LabelScheme) -> np.ndarray:
    """Each region's share of the labelled voxels (the ignore label not counted), from the same cases as the class prior."""
    counts = class_voxel_counts(data_dir, case_ids, max(scheme.label_values) + 1)
    return np.array([counts[list(r)].sum() for r in scheme.regions], dtype=np.float64) / max(counts.sum(), 1)


def _config_for_resume(ckpt: Checkpoint, given: TrainerConfig, finished: bool = False) -> TrainerConfig:
    """A resumed run keeps the config it started with; keys given differently are named in one warning.

    Only keys set away from their defaults count as given (`changed_keys`), so a plain
    ``--continue`` warns about nothing. A ``finished`` run would silently stand for a setting it
    was not trained with, so the warning says how to get the new one.
    """
    saved = ckpt.trainer_config
    changes = changed_keys(given, saved, ignore=RESUME_MAY_CHANGE)
    if changes and finished:
        log.warning("this fold finished with the checkpoint's trainer config; ignoring changed keys: %s "
                    "(to train with them use --force to start over, or a new --variant)", format_changes(changes))
    elif changes:
        log.warning("continuing with the checkpoint's trainer config; ignoring changed keys: %s",
                    format_changes(changes))
    final_validation = saved.final_validation if given.final_validation == TrainerConfig().final_validation \
        else given.final_validation
    augment = dataclasses.replace(saved.augment, device=given.augment.device)
    return dataclasses.replace(saved, num_workers=given.num_workers, final_validation=final_validation,
                               augment=augment)
