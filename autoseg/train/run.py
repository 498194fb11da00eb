"""`train_fold`: train one model (dataset x configuration x fold [x variant x seed]) end to end.

The run is isolated in its fold dir (``results/<ds>/<config>/<variant>/[seed_<s>/]fold_<k>/``):
it writes nothing elsewhere, keeps its own ``tmp/`` and ``compile_cache/``, and holds an
exclusive ``.lock`` while it trains so that two processes never train the same fold. It
records what it used (``trainer_config.json``, ``plans.json``, ``dataset.json``), trains
with `autoseg.train.loop.fit`, and finally predicts and scores the fold's validation cases.

Cascade (a configuration with ``previous_stage``, i.e. 3d_cascade_fullres): every fold of the
previous stage (same variant and seed) must be trained and validated first; their validation
exports give each case's previous-stage segmentation, which the loaders append as one-hot
input channels (C + K - 1 network inputs) and the final validation uses too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import atomic_write_bytes, atomic_write_text, load_record, save_record
from autoseg.common.paths import Paths, TrainingId
from autoseg.common.procs import fork_private
from autoseg.planning.plans import Plan
from autoseg.train import checkpoint as ckpt_files
from autoseg.train.checkpoint import Checkpoint, load_checkpoint, load_latest, remove_stale_temp_files
from autoseg.train.config import TrainerConfig, changed_keys, default_num_workers, format_changes
from autoseg.train.ddp import (
    DistContext,
    all_ranks_ok,
    barrier,
    init_distributed,
    shutdown_distributed,
    split_batch,
    split_oversample,
)
from autoseg.train.loop import (
    LOG_FILE,
    PROGRESS_PNG,
    FitSetup,
    RunMeta,
    Runtime,
    fit,
    resolve_runtime,
)
from autoseg.train.losses import build_loss

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
TRAINER_CONFIG_FILE = "trainer_config.json"
PLANS_COPY = "plans.json"
DATASET_JSON_COPY = "dataset.json"
VALIDATION_DIR = "validation"
RUN_OUTPUTS = (TRAINER_CONFIG_FILE, PLANS_COPY, DATASET_JSON_COPY, LOG_FILE, PROGRESS_PNG,
               ckpt_files.LATEST, ckpt_files.BEST, ckpt_files.FINAL, ckpt_files.PREVIOUS)
"""Files a run writes in its fold dir; ``force`` removes them (and validation/) before starting."""

SAFE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]*")
"""Variant / configuration names are used as folder names."""

VAL_LOADER_SEED_OFFSET = 10_000
"""Validation loaders draw from a different stream than training loaders of the same seed."""


@dataclass(frozen=True)
class TrainResult:
    """What one `train_fold` call did."""

    training_id: TrainingId
    fold_dir: Path
    status: str
    """``trained``; ``already_finished`` when resuming a finished, validated run; ``validated`` when
    only the final validation ran (``validation_only``, or resuming a run killed while validating)."""
    epochs_completed: int
    best_ema_pseudo_dice: float | None
    final_ema_pseudo_dice: float | None
    validation_dir: Path | None = None
    """Where the full validation of the fold was written (None when skipped)."""


def train_fold(paths: Paths, tid: TrainingId, cfg: TrainerConfig, plan: Plan | None = None,
               device: str = "auto", resume: bool = False, force: bool = False,
               num_workers: int | None = None, quiet: bool = False,
               dist: DistContext | None = None, save_probabilities: bool = False,
               validation_only: bool = False) -> TrainResult:
    """Train one fold; resume from ``checkpoint_latest.pt`` when asked; validate the fold at the end.

    ``save_probabilities`` keeps the validation softmax maps (``CASE.npz``, nnU-Net's ``--npz``)
    so that `find_best` can score ensembles. ``validation_only`` re-runs just the final
    validation from ``checkpoint_final.pt`` (nnU-Net's ``--val``), e.g. to add the probabilities.
    Resuming a finished run whose validation is missing or lacks requested probabilities
    (killed while validating) completes the validation instead of reporting it finished.

    ``tid.seed`` (sweeps) overrides ``cfg.seed``. ``num_workers`` is the caller's CPU share
    for data workers, used when ``cfg.num_workers`` is None. ``dist`` places this process in
    a torchrun group (rank 0 alone writes files).
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
            result = _train_fold_locked(paths, tid, cfg, plan, rt, resume, force, num_workers,
                                        save_probabilities)
        clean = True
        return result
    finally:
        shutdown_distributed(dist, clean=clean)


def _train_fold_locked(paths: Paths, tid: TrainingId, cfg: TrainerConfig, plan: Plan | None, rt: Runtime,
                       resume: bool, force: bool, num_workers: int | None,
                       save_probabilities: bool) -> TrainResult:
    """Lock the fold dir (rank 0), settle resume/force, record inputs, then `_train`."""
    dist = rt.dist
    fold_dir = paths.training_dir(tid)
    resumable = resume and any((fold_dir / n).is_file()
                               for n in (ckpt_files.LATEST, ckpt_files.PREVIOUS, ckpt_files.FINAL))
    if plan is None and not resumable:  # fail on a missing plan before touching the fold dir
        from autoseg.planning.store import load_plan
        plan = load_plan(paths, tid.dataset, tid.plans)
    if plan is not None and plan.preset != tid.plans:
        raise AutosegError(f"the plan is a {plan.preset!r} plan but the run is filed under {tid.plans!r} plans",
                           where=fold_dir)
    if plan is not None:  # a cascade fold without its previous stage fails before touching the fold dir
        from autoseg.infer.cascade import previous_stage_exports
        previous_stage_exports(paths, tid, plan)
    pretrained = None
    if cfg.pretrained is not None and not resumable:  # refused weights fail before touching the fold dir too
        pretrained = _checked_pretrained(cfg, plan, tid.config)
    fold_dir.mkdir(parents=True, exist_ok=True)
    lock = fold_lock(fold_dir) if dist.is_main else contextlib.nullcontext()
    ckpt: Checkpoint | None = None
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(lock)
            ckpt = _prepare_fold_dir(fold_dir, resume, force, dist)
        except AutosegError:
            all_ranks_ok(False, dist)  # release the other ranks before failing
            raise
        if not all_ranks_ok(True, dist):
            raise AutosegError("rank 0 refused to start (see its error)", where=fold_dir)
        stack.enter_context(_isolated_dirs(fold_dir))
        if ckpt is None and not dist.is_main and resume and (fold_dir / ckpt_files.LATEST).is_file():
            ckpt = load_checkpoint(fold_dir / ckpt_files.LATEST)
        if ckpt is not None and resume and (fold_dir / ckpt_files.FINAL).is_file():
            finished_cfg = _config_for_resume(ckpt, cfg, finished=True)
            wanted = save_probabilities or finished_cfg.final_validation != "off"
            if dist.is_main and wanted and not validation_complete(paths, tid, fold_dir, save_probabilities):
                log.info("%s is trained but its validation is incomplete; validating", tid)
                return _validate_finished(paths, tid, fold_dir, rt, save_probabilities,
                                          finished_cfg.final_validation != "no_mirroring")
            log.info("%s is finished (%s exists); nothing to do", tid, ckpt_files.FINAL)
            return TrainResult(tid, fold_dir, "already_finished", ckpt.epoch, ckpt.best_ema_pseudo_dice,
                               ckpt.history[-1]["ema_pseudo_dice"] if ckpt.history else None,
                               fold_dir / VALIDATION_DIR if dist.is_main else None)
        if ckpt is not None:
            cfg, plan = _config_for_resume(ckpt, cfg), ckpt.plan
            rt = resolve_runtime(cfg, rt.device.type, dist, rt.quiet)  # amp/compile as the run began
        elif plan is None:  # resumable files vanished meanwhile
            from autoseg.planning.store import load_plan
            plan = load_plan(paths, tid.dataset, tid.plans)
        workers = cfg.num_workers if cfg.num_workers is not None else (
            num_workers if num_workers is not None else default_num_workers(os.cpu_count() or 1, dist.world_size))
        if dist.is_main:
            _record_inputs(paths, tid.dataset, fold_dir, cfg, plan)
        return _train(paths, tid, cfg, plan, ckpt, fold_dir, workers, rt, save_probabilities, pretrained)


def _checked_pretrained(cfg: TrainerConfig, plan: Plan | None, config_name: str) -> Any:
    """Load ``cfg.pretrained`` and check it fits this run's network (a throwaway one, built on the CPU)."""
    from autoseg.nets.unet import build_unet
    from autoseg.train.pretrained import load_pretrained, transfer_weights

    pretrained = load_pretrained(str(cfg.pretrained))
    if plan is not None:
        n_in = input_channels(plan, config_name)
        net = build_unet(plan.configuration(config_name), n_in, plan.num_classes, cfg.deep_supervision)
        transfer_weights(net, pretrained, n_in, plan.num_classes)
    return pretrained


def parse_fold(text: str | int) -> int | str:
    """A fold from the command line: a non-negative integer or ``all``."""
    value = str(text).strip().lower()
    if value.isdigit():
        return int(value)
    if value == "all":
        return "all"
    raise AutosegError(f"fold must be a number (0, 1, ...) or 'all', got {text!r}", where="FOLD")


def check_training_id(tid: TrainingId) -> None:
    """Variant and config names become folder names: keep them plain."""
    for what, name in (("variant", tid.variant), ("configuration", tid.config)):
        if not SAFE_NAME_RE.fullmatch(name):
            raise AutosegError(f"{what} name {name!r} must use letters, digits, '.', '_' or '-' only",
                               where=what)
    if isinstance(tid.fold, bool) or not (isinstance(tid.fold, int) and tid.fold >= 0 or tid.fold == "all"):
        raise AutosegError(f"fold must be a non-negative integer or 'all', got {tid.fold!r}", where="fold")


def _train(paths: Paths, tid: TrainingId, cfg: TrainerConfig, plan: Plan, ckpt: Checkpoint | None,
           fold_dir: Path, workers: int, rt: Runtime, save_probabilities: bool,
           pretrained: Any = None) -> TrainResult:
    """Build the network, loss and loaders, run `fit`, then validate the fold (rank 0).

    A fresh run with ``cfg.pretrained`` starts from those weights (``pretrained``: already loaded);
    a resumed one from its checkpoint, whose record says where its first weights came from.
    """
    from autoseg.data.augment import masked_channels, resolve_augment_device
    from autoseg.data.loader import LoaderSpec, make_train_loader, make_val_loader
    from autoseg.infer.cascade import previous_stage_exports
    from autoseg.data.sampling import class_voxel_counts
    from autoseg.nets.unet import (build_unet, deep_supervision_scales, init_heads_to_prior,
                                   init_heads_to_region_prior)
    from autoseg.splits import fold_cases, load_splits

    config = plan.configuration(tid.config)
    train_ids, val_ids = fold_cases(load_splits(paths, tid.dataset), tid.fold)
    exports = previous_stage_exports(paths, tid, plan)  # {} unless a cascade stage
    rng = np.random.default_rng(cfg.seed)
    if ckpt is not None:
        rng.bit_generator.state = ckpt.rng.numpy
    # fresh runs seed loaders with seed + rank; a resumed run draws a new base from the restored
    # generator, so it neither replays the batches already seen nor depends on wall-clock time
    base_seed = cfg.seed if ckpt is None else int(rng.integers(2**31 - 1 - VAL_LOADER_SEED_OFFSET))
    global_batch = cfg.batch_size or config.batch_size
    batch = split_batch(global_batch, rt.dist)
    # this rank's share of the global batch's forced-foreground samples, not the rule on its local batch
    oversample = split_oversample(global_batch, cfg.oversample_foreground, rt.dist)
    num_ds = len(deep_supervision_scales(config)) if cfg.deep_supervision else 1
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    in_channels = input_channels(plan, tid.config)
    net = build_unet(config, in_channels, plan.num_classes, deep_supervision=cfg.deep_supervision)
    data_dir = paths.preprocessed_data(tid.dataset, config.data_identifier)
    scheme = plan.label_scheme
    if scheme.has_regions and exports:
        raise AutosegError("region-based training has no cascade yet; train 3d_fullres or 2d", tid.config)
    if cfg.head_init == "prior" and ckpt is None:  # a resumed run loads its trained heads
        if scheme.has_regions:
            share = init_heads_to_region_prior(net, _region_shares(data_dir, train_ids, scheme))
        else:
            share = init_heads_to_prior(net, class_voxel_counts(data_dir, train_ids, plan.num_classes))
        log.info("segmentation heads start at the label prior %s", np.round(share, 4).tolist())
    pretrained_from = ckpt.pretrained_from if ckpt is not None else None
    if ckpt is None and cfg.pretrained is not None:
        from autoseg.train.pretrained import load_pretrained, transfer_weights
        pretrained_from = transfer_weights(net, pretrained or load_pretrained(cfg.pretrained), in_channels,
                                           plan.num_classes)

    def spec(ids: list[str], seed: int) -> Any:
        return LoaderSpec(data_dir=data_dir, case_ids=tuple(ids), config=config, augment=cfg.augment,
                          batch_size=batch, num_workers=workers, seed=seed,
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
    meta = RunMeta(plan=plan, config_name=tid.config, dataset=tid.dataset, fold=tid.fold,
                   num_input_channels=in_channels, num_classes=plan.num_classes, pretrained_from=pretrained_from)
    setup = FitSetup(net=net, loss_fn=build_loss(cfg.loss, config.batch_dice, num_ds, rt.dist.enabled, scheme),
                     train_batches=train_loader, val_batches=val_loader, cfg=cfg, meta=meta,
                     out_dir=fold_dir, rng=rng, augment_device=augment_where)
    try:
        with _stop_on_signals() as stop, _compile_cache(fold_dir, rt.compile):
            result = fit(setup, rt, resume=ckpt, stop=stop)
    finally:
        train_loader.close()
        val_loader.close()
    validation_dir = None
    if rt.dist.is_main and cfg.final_validation == "off":
        log.info("%s: final validation skipped (final_validation=off); `--validation-only` runs it later", tid)
    elif rt.dist.is_main:
        validation_dir = _validate_fold(paths, tid, net, plan, cfg, val_ids, fold_dir, rt.device, not rt.quiet,
                                        save_probabilities, _previous_stage(exports, val_ids))
    barrier(rt.dist)
    return TrainResult(tid, fold_dir, "trained", result.epochs_completed, result.best_ema_pseudo_dice,
                       result.final_ema_pseudo_dice, validation_dir)


def _region_shares(data_dir: Path, case_ids: list[str], scheme: Any) -> np.ndarray:
    """Each region's share of the labelled voxels (the ignore label not counted), from the same cases as the class prior."""
    from autoseg.data.sampling import class_voxel_counts

    counts = class_voxel_counts(data_dir, case_ids, max(scheme.label_values) + 1)
    return np.array([counts[list(r)].sum() for r in scheme.regions], dtype=np.float64) / max(counts.sum(), 1)


def input_channels(plan: Plan, config_name: str) -> int:
    """Network inputs: the image channels, plus K-1 one-hot channels of the previous stage for a cascade."""
    extra = plan.num_classes - 1 if plan.configuration(config_name).previous_stage is not None else 0
    return plan.num_channels + extra


def _previous_stage(exports: dict[str, Path], case_ids: list[str]) -> Any:
    """The CV exports of ``case_ids`` as a validation's previous-stage source (None without a cascade)."""
    if not exports:
        return None
    from autoseg.infer.cascade import PreviousStage
    return PreviousStage(exports={c: exports[c] for c in case_ids})


def _validate_fold(paths: Paths, tid: TrainingId, net: torch.nn.Module, plan: Plan, cfg: TrainerConfig,
                   val_ids: list[str], fold_dir: Path, device: torch.device, show_progress: bool,
                   save_probabilities: bool = False, previous_stage: Any = None) -> Path:
    """Sliding-window prediction and metrics of the fold's validation cases (nnU-Net's final validation);
    ``final_validation=no_mirroring`` leaves out the test-time mirroring."""
    from autoseg.data.augment import training_mirror_axes
    from autoseg.infer.validate import run_validation

    config = plan.configuration(tid.config)
    out_dir = fold_dir / VALIDATION_DIR
    net.deep_supervision = False
    net.eval()
    mirror_axes = () if cfg.final_validation == "no_mirroring" else training_mirror_axes(config, cfg.augment)
    run_validation(net, plan, config, mirror_axes, val_ids, paths,
                   tid.dataset, out_dir, device, save_probabilities=save_probabilities, show_progress=show_progress,
                   previous_stage=previous_stage)
    return out_dir


def validation_complete(paths: Paths, tid: TrainingId, fold_dir: Path, with_probabilities: bool) -> bool:
    """The fold's validation finished (summary.json is written last), with probabilities if asked,
    and with the exports every next stage of the run's plan needs (a cascade's previous stage)."""
    from autoseg.evaluate.summary import SUMMARY_FILE
    from autoseg.infer.cascade import next_stage_file, next_stages
    from autoseg.planning.store import load_plan_file
    from autoseg.splits import fold_cases, load_splits

    out_dir = fold_dir / VALIDATION_DIR
    if not (out_dir / SUMMARY_FILE).is_file():
        return False
    nexts = next_stages(load_plan_file(fold_dir / PLANS_COPY), tid.config) if (fold_dir / PLANS_COPY).is_file() else []
    if not with_probabilities and not nexts:
        return True
    _, val_ids = fold_cases(load_splits(paths, tid.dataset), tid.fold)
    if not all(next_stage_file(out_dir, n.name, c).is_file() for n in nexts for c in val_ids):
        return False
    return not with_probabilities or all((out_dir / f"{cid}.json").is_file() for cid in val_ids)  # sidecar after npz


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
    with fold_lock(fold_dir), _isolated_dirs(fold_dir):
        result = _validate_finished(paths, tid, fold_dir, rt, save_probabilities, mirroring)
    barrier(rt.dist)
    return result


def _validate_finished(paths: Paths, tid: TrainingId, fold_dir: Path, rt: Runtime,
                       save_probabilities: bool, mirroring: bool = True) -> TrainResult:
    """Validate with ``checkpoint_final.pt``'s network (the same code path as the end of training),
    with the model's test-time mirroring unless ``mirroring`` is False (``final_validation=no_mirroring``).

    The previous validation folder is replaced only once the new one is complete.
    """
    from autoseg.infer.cascade import previous_stage_exports
    from autoseg.infer.predict import load_model
    from autoseg.infer.validate import run_validation
    from autoseg.splits import fold_cases, load_splits

    ckpt = load_checkpoint(fold_dir / ckpt_files.FINAL, hint="retrain this fold with --force")
    model = load_model([fold_dir], rt.device, checkpoint="final")
    _, val_ids = fold_cases(load_splits(paths, tid.dataset), tid.fold)
    previous = _previous_stage(previous_stage_exports(paths, tid, model.plan), val_ids)
    final_dir = fold_dir / VALIDATION_DIR
    staging = fold_dir / f".{VALIDATION_DIR}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    run_validation(model.nets[0], model.plan, model.config, model.mirror_axes if mirroring else (), val_ids,
                   paths, tid.dataset,
                   staging, rt.device, save_probabilities=save_probabilities, show_progress=not rt.quiet,
                   previous_stage=previous)
    _point_summary_at(staging, final_dir)
    old = fold_dir / f".{VALIDATION_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final_dir.exists():
        final_dir.rename(old)
    staging.rename(final_dir)
    shutil.rmtree(old, ignore_errors=True)
    last = ckpt.history[-1]["ema_pseudo_dice"] if ckpt.history else None
    return TrainResult(tid, fold_dir, "validated", ckpt.epoch, ckpt.best_ema_pseudo_dice, last, final_dir)


def _point_summary_at(staging: Path, final_dir: Path) -> None:
    """Rewrite the staged summary.json's prediction paths to where the rename will put them."""
    from autoseg.evaluate.summary import SUMMARY_FILE, Summary

    summary = load_record(staging / SUMMARY_FILE, Summary)
    cases = tuple(dataclasses.replace(c, prediction=str(final_dir / Path(c.prediction).relative_to(staging)))
                  if Path(c.prediction).is_relative_to(staging) else c for c in summary.cases)
    save_record(staging / SUMMARY_FILE, dataclasses.replace(summary, cases=cases))


def _prepare_fold_dir(fold_dir: Path, resume: bool, force: bool, dist: DistContext) -> Checkpoint | None:
    """Check what is in the fold dir against resume/force; the checkpoint to continue from, if any."""
    latest, final = fold_dir / ckpt_files.LATEST, fold_dir / ckpt_files.FINAL
    if not dist.is_main:
        return None
    if resume and force:
        raise AutosegError("--continue and --force contradict each other; pick one", where=fold_dir)
    remove_stale_temp_files(fold_dir)  # we hold the fold's lock: their writers are dead
    existing = [p for p in (final, latest, fold_dir / ckpt_files.BEST) if p.is_file()]
    if resume:
        if final.is_file():
            rebuild = f"move it away and --continue rebuilds it from {latest.name}, or " if latest.is_file() else ""
            return load_checkpoint(final, hint=f"{rebuild}start over with --force")
        if latest.is_file() or (fold_dir / ckpt_files.PREVIOUS).is_file():
            return load_latest(fold_dir)
        log.info("no %s in %s; starting from scratch", ckpt_files.LATEST, fold_dir)
    elif existing and not force:
        raise AutosegError(f"{existing[0].name} exists; use --continue to resume or --force to start over",
                           where=fold_dir)
    if force:
        for name in RUN_OUTPUTS:
            (fold_dir / name).unlink(missing_ok=True)
        shutil.rmtree(fold_dir / VALIDATION_DIR, ignore_errors=True)
    atomic_write_text(fold_dir / LOG_FILE, "")  # a fresh run starts a fresh log
    return None


RESUME_MAY_CHANGE = ("num_workers", "final_validation", "augment.device")
"""Keys a resumed (or finished) run takes from the command line: they do not change what is trained
(``augment.device`` moves the same augmentation between the CPU workers and the training device)."""


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


def _record_inputs(paths: Paths, dataset: str, fold_dir: Path, cfg: TrainerConfig, plan: Plan) -> None:
    """Copy what the run used next to its checkpoints (config, plan, raw dataset.json)."""
    save_record(fold_dir / TRAINER_CONFIG_FILE, cfg)
    save_record(fold_dir / PLANS_COPY, plan)
    raw_json = paths.raw_dataset(dataset) / "dataset.json"
    if raw_json.is_file():
        atomic_write_bytes(fold_dir / DATASET_JSON_COPY, raw_json.read_bytes())
    else:
        log.warning("%s not found; the fold dir will lack its copy of dataset.json", raw_json)


@contextlib.contextmanager
def fold_lock(fold_dir: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``<fold_dir>/.lock`` (with our pid inside) while training.

    The kernel drops the lock when the holder dies, so a SIGKILLed run never leaves a stale
    lock; a live holder makes us refuse with its pid. The lock belongs to the open file
    description, which a forked child (a data-loader worker) would share and keep alive after
    we die, so forked children close their copy of the fd at once (`fork_private`).
    """
    path = fold_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    owner = os.getpid()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise AutosegError(f"another process (pid {holder}) is training this fold; "
                           "wait for it to finish or stop it first", where=fold_dir) from None
    try:
        with fork_private(fd):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{owner}\n".encode(), 0)
            yield
    finally:
        if os.getpid() == owner:  # a forked child unwinding through here has no fd to unlock
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


@contextlib.contextmanager
def _isolated_dirs(fold_dir: Path) -> Iterator[None]:
    """Point Python temp files and the torch.compile cache into the fold dir for the run's duration.

    Set in-process (``tempfile.tempdir``, torch's inductor cache context), restored afterwards;
    ``os.environ`` of whoever launched us is not touched.
    """
    tmp = fold_dir / "tmp"
    tmp.mkdir(exist_ok=True)
    (fold_dir / "compile_cache").mkdir(exist_ok=True)
    previous = tempfile.tempdir
    tempfile.tempdir = str(tmp)
    try:
        yield
    finally:
        tempfile.tempdir = previous


def _compile_cache(fold_dir: Path, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """torch.compile's inductor cache inside the fold dir while compiling (torch restores it after)."""
    if not enabled:
        return contextlib.nullcontext()
    try:
        from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
    except ImportError:  # other torch versions: the cache follows tempfile.tempdir (the fold's tmp/)
        return contextlib.nullcontext()
    return temporary_cache_dir(str(fold_dir / "compile_cache"))


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """SIGINT/SIGTERM set a stop flag (the loop saves and exits after its current step); a second one aborts."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        log.warning("%s received: stopping after the current iteration (send again to abort)",
                    signal.Signals(signum).name)
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)
