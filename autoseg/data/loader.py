"""Infinite batch loaders for training and validation (pseudo-Dice) batches.

``make_train_loader(spec)`` samples patches (foreground-oversampled), augments them
(`autoseg.data.augment`) and, with deep supervision, adds targets at every output scale of the
U-Net. ``make_val_loader(spec)`` does the same without augmentation (crop only). With
``num_workers > 0`` batches are made in batchgenerators' MultiThreadedAugmenter worker
processes; worker ``k`` draws from ``np.random.default_rng([seed, k])`` and batches come
round-robin from the workers, so a seed fixes the whole sequence (``num_workers=0`` is
worker 0 run in-process). Batches are numpy in the workers and become torch tensors in the
caller's process. The workers start with the first batch drawn and die with their parent
process; the kernel ties that to the thread that forked them, so draw the first batch from a
thread that outlives the loader (the main thread in `autoseg train`). Batches are:

    {"data": float32 (B, C, *patch), "target": int64 (B, 1, *patch) or a list of such per DS scale}

A cascade stage (`LoaderSpec.previous_stage`) reads each case's previous-stage segmentation,
cuts and augments it with the labels, and appends it as K-1 one-hot channels after the image
channels (degraded in training batches only, `autoseg.data.cascade`), so ``C`` is then the
image channels plus K-1.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import load_record
from autoseg.common.procs import die_with_parent
from autoseg.data.augment import (
    AugmentConfig,
    AugmentSetup,
    augmentation_setup,
    crop_only_setup,
    masked_channels,
    resolve_augment_device,
    restore_masked_background,
    sample_params,
)
from autoseg.data.augment_cpu import apply_augmentation, downsample_seg_for_ds
from autoseg.data.augment_device import augment_batch, deep_supervision_targets
from autoseg.data.cascade import apply_degradation, one_hot_foreground, sample_degradation
from autoseg.data.cascade_device import degrade_one_hot
from autoseg.data.sampling import (
    OVERSAMPLE_FOREGROUND,
    CaseFiles,
    is_forced_foreground,
    load_arrays,
    load_foreground,
    sample_patch,
)
from autoseg.nets.unet import deep_supervision_scales
from autoseg.planning.plans import Configuration
from autoseg.preprocess import SETTINGS_FILENAME, PreprocessingSettings

logger = logging.getLogger(__name__)

BATCHES_CACHED_PER_WORKER = 4
"""Batches each worker may have ready ahead of the consumer (memory vs. smoothing stalls)."""


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a loader needs; the caller decides the worker count (its share of the CPUs)."""

    data_dir: Path
    case_ids: tuple[str, ...]
    config: Configuration
    augment: AugmentConfig
    batch_size: int
    num_workers: int
    seed: int
    deep_supervision: bool
    oversample_foreground: float = OVERSAMPLE_FOREGROUND
    pin_memory: bool = False
    previous_stage: tuple[Path, ...] = ()
    """Cascade only: per case (same order as ``case_ids``) the previous stage's segmentation,
    int (1, *spatial) on this configuration's preprocessed grid; empty for other configurations."""
    num_classes: int = 0
    """Classes K (background included) of the previous stage's one-hot channels; cascade only."""
    masked_channels: tuple[int, ...] | None = None
    """Image channels normalized inside the nonzero mask, zeroed where the label is -1 after augmentation;
    None: as the data folder's ``preprocessing.json`` says (`data_masked_channels`)."""


class _BatchSource:
    """Makes numpy batches; runs in the caller (num_workers=0) or in each worker process.

    Holds no torch state so that forked workers stay light. `set_thread_id` is called by
    MultiThreadedAugmenter first thing in each worker: it selects that worker's random stream
    and ties the worker's life to the process that made this source (`die_with_parent`).
    """

    def __init__(self, spec: LoaderSpec, setup: AugmentSetup, augment: bool, deferred: bool = False) -> None:
        self.spec = spec
        self.setup = setup
        self.augment = augment
        self.deferred = deferred
        """Only crop the initial patch and draw the parameters (same draws, same order); augmentation
        happens later, batched on the training device (`DeviceAugmentedLoader`)."""
        self.files = [CaseFiles.of(Path(spec.data_dir), c) for c in spec.case_ids]
        self.ds_scales = deep_supervision_scales(spec.config) if spec.deep_supervision else None
        self._foreground: dict[int, dict[int, np.ndarray]] = {}
        self._owner_pid = os.getpid()
        self.set_thread_id(0)

    def set_thread_id(self, thread_id: int) -> None:
        """Switch to worker ``thread_id``'s generator, derived from (seed, worker); in a worker process,
        also have it SIGKILLed when the trainer dies (else a SIGKILLed trainer leaves orphans)."""
        if os.getpid() != self._owner_pid:
            die_with_parent(self._owner_pid)
        self.rng = np.random.default_rng([self.spec.seed, thread_id])

    def _case_foreground(self, index: int) -> dict[int, np.ndarray]:
        if index not in self._foreground:  # small, read once per worker
            self._foreground[index] = load_foreground(self.files[index].foreground)
        return self._foreground[index]

    def __iter__(self) -> "_BatchSource":
        return self

    def __next__(self) -> dict[str, Any]:
        spec, setup, rng = self.spec, self.setup, self.rng
        datas, segs, params_list, degradations = [], [], [], []
        for i in range(spec.batch_size):
            index = int(rng.integers(len(self.files)))
            data, seg = load_arrays(self.files[index])
            previous = load_previous_stage(spec.previous_stage[index], seg.shape) if spec.previous_stage else None
            forced = is_forced_foreground(i, spec.batch_size, spec.oversample_foreground)
            data_patch, seg_patch = sample_patch(rng, data, seg, self._case_foreground(index),
                                                 setup.initial_patch_size, setup.patch_size, forced, previous)
            params = sample_params(rng, setup, data.shape[0]) if self.augment else None
            if self.deferred:  # the training process augments the whole batch on its device
                params_list.append(params)
                if previous is not None:
                    degradations.append(sample_degradation(rng, spec.num_classes - 1))
                datas.append(data_patch)
                segs.append(seg_patch)
                continue
            if params is not None:
                data_patch, seg_patch = apply_augmentation(data_patch, seg_patch, params, setup)
            else:
                data_patch, seg_patch = restore_masked_background(data_patch, seg_patch, setup.masked_channels)
            if previous is not None:
                one_hot = one_hot_foreground(seg_patch[1], spec.num_classes)
                if self.augment:
                    one_hot = apply_degradation(one_hot, sample_degradation(rng, one_hot.shape[0]))
                data_patch, seg_patch = np.concatenate([data_patch, one_hot]), seg_patch[:1]
            datas.append(data_patch)
            segs.append(seg_patch.astype(np.int64))
        if self.deferred:
            return {"data": np.stack(datas).astype(np.float32, copy=False), "seg": np.stack(segs),
                    "params": params_list, "degradations": degradations}
        target = np.stack(segs)
        return {"data": np.stack(datas).astype(np.float32, copy=False),
                "target": downsample_seg_for_ds(target, self.ds_scales) if self.ds_scales else target}


class BatchLoader:
    """Infinite iterator of training or validation batches; `close` (or ``with``) stops its workers."""

    def __init__(self, source: _BatchSource, num_workers: int, pin_memory: bool) -> None:
        self._source = source
        self._pin = pin_memory and torch.cuda.is_available()
        self._augmenter: MultiThreadedAugmenter | None = None
        if num_workers > 0:
            self._augmenter = MultiThreadedAugmenter(source, None, num_workers,
                                                     num_cached_per_queue=BATCHES_CACHED_PER_WORKER,
                                                     seeds=list(range(num_workers)), pin_memory=False)
        self._closed = False

    @property
    def patch_size(self) -> tuple[int, ...]:
        return self._source.setup.patch_size

    def __iter__(self) -> "BatchLoader":
        return self

    def __next__(self) -> dict[str, Any]:
        if self._closed:
            raise RuntimeError("BatchLoader is closed")
        if self._augmenter is None:
            batch = next(self._source)
        else:
            try:
                batch = next(self._augmenter)
            except RuntimeError:  # a worker died; batchgenerators printed its traceback on stderr
                self.close()
                raise AutosegError("data loading failed in a worker process (its traceback is above)",
                                   where=self._source.spec.data_dir) from None
        return {key: self._tensors(value) for key, value in batch.items()}

    def _tensors(self, value: Any) -> Any:
        """numpy arrays (and lists of them) -> torch tensors, pinned for fast copies to a GPU; rest as is."""
        if isinstance(value, np.ndarray):
            tensor = torch.from_numpy(value)
            return tensor.pin_memory() if self._pin else tensor
        if isinstance(value, list) and value and isinstance(value[0], np.ndarray):
            return [self._tensors(v) for v in value]
        return value

    def close(self) -> None:
        """Stop and join the worker processes (idempotent)."""
        if self._augmenter is not None and not self._closed:
            self._augmenter._finish()
        self._closed = True

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing sensible left to do
            pass


class DeviceAugmentedLoader:
    """Training batches augmented as torch ops on ``device`` (``augment.device=device``).

    The workers of the wrapped loader only sample and cut the enlarged initial patch and draw
    each sample's parameters (into pinned memory on CUDA); this process copies the batch
    without blocking and applies `autoseg.data.augment_device.augment_batch`, then builds the
    cascade's one-hot channels and the deep-supervision targets on the device. The draws are the
    CPU path's, so a seed gives the same parameters on either path.
    """

    def __init__(self, loader: BatchLoader, device: torch.device) -> None:
        self._loader = loader
        self._source = loader._source
        self.device = torch.device(device)

    @property
    def patch_size(self) -> tuple[int, ...]:
        return self._loader.patch_size

    def __iter__(self) -> "DeviceAugmentedLoader":
        return self

    def __next__(self) -> dict[str, Any]:
        raw = next(self._loader)
        spec, setup = self._source.spec, self._source.setup
        data = raw["data"].to(self.device, non_blocking=True)
        seg = raw["seg"].to(self.device, non_blocking=True)
        if setup.masked_channels:
            # labels go through as label + 1: the patch padding and outside-mask label -1 becomes 0, the
            # value augment_batch fills in outside the patch (nnU-Net: outside is -1 too), so both stay
            # "outside" until the masked channels are zeroed there
            data, seg = augment_batch(data, seg.to(torch.int16) + 1, raw["params"], setup)  # int8 + 1 could wrap
            data, seg = restore_masked_background(data, seg - 1, setup.masked_channels, channel_axis=1)
        else:
            # no mask: the padding label -1 ends as background anyway (nnU-Net's RemoveLabelTransform);
            # folding it in first spares augment_batch one interpolated indicator channel
            data, seg = augment_batch(data, seg.clamp_min(0), raw["params"], setup)
        if spec.previous_stage:
            previous = seg[:, 1]
            one_hot = torch.stack([previous == k for k in range(1, spec.num_classes)], 1).to(data.dtype)
            data = torch.cat([data, degrade_one_hot(one_hot, raw["degradations"])], 1)
        target = seg[:, :1].long()
        scales = self._source.ds_scales
        return {"data": data, "target": deep_supervision_targets(target, scales) if scales else target}

    def close(self) -> None:
        self._loader.close()

    def __enter__(self) -> "DeviceAugmentedLoader":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def load_previous_stage(path: Path, seg_shape: tuple[int, ...]) -> np.ndarray:
    """A previous-stage segmentation (1, *spatial), memory-mapped, checked against the case's grid."""
    try:
        prev = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise AutosegError(f"cannot read the previous stage's segmentation ({e})", where=path) from None
    if tuple(prev.shape) != tuple(seg_shape):
        raise AutosegError(f"previous-stage segmentation has shape {tuple(prev.shape)}, the case {tuple(seg_shape)} "
                           "(exported for another plan? retrain the previous stage)", where=path)
    return prev


def data_masked_channels(data_dir: Path) -> tuple[int, ...] | None:
    """Channels a preprocessed folder's labels mark -1 outside the nonzero mask for (its ``preprocessing.json``);
    None for a folder without that record (arrays written by hand)."""
    path = Path(data_dir) / SETTINGS_FILENAME
    if not path.is_file():
        return None
    settings = load_record(path, PreprocessingSettings)
    return masked_channels(settings.normalization) if settings.outside_mask_label is not None else ()


def _masked_channels(spec: LoaderSpec) -> tuple[int, ...]:
    """The spec's masked channels, checked against (or, when None, taken from) the data folder's record."""
    made = data_masked_channels(spec.data_dir)
    if spec.masked_channels is None:
        return made or ()
    if made is not None and tuple(made) != tuple(spec.masked_channels):
        raise AutosegError(f"the labels mark the outside of the nonzero mask for channel(s) {list(made)}, the "
                           f"plan normalizes channel(s) {list(spec.masked_channels)} inside it (preprocessed by an "
                           "older autoseg or another plan); rerun `autoseg preprocess --force`",
                           where=Path(spec.data_dir) / SETTINGS_FILENAME)
    return tuple(spec.masked_channels)


def _check_spec(spec: LoaderSpec) -> None:
    """Fail early, naming the file or field, instead of inside a worker process."""
    if not spec.case_ids:
        raise AutosegError("no cases to load", where=spec.data_dir)
    if spec.batch_size < 1:
        raise AutosegError(f"batch_size must be >= 1, got {spec.batch_size}", where="batch_size")
    if spec.num_workers < 0:
        raise AutosegError(f"num_workers must be >= 0, got {spec.num_workers}", where="num_workers")
    if not 0.0 <= spec.oversample_foreground <= 1.0:
        raise AutosegError(f"must be in [0, 1], got {spec.oversample_foreground}", where="oversample_foreground")
    if not Path(spec.data_dir).is_dir():
        raise AutosegError("preprocessed data folder not found (run `autoseg preprocess`)", where=spec.data_dir)
    for case_id in spec.case_ids:
        CaseFiles.of(Path(spec.data_dir), case_id).check()
    _, seg = load_arrays(CaseFiles.of(Path(spec.data_dir), spec.case_ids[0]))  # readable, (C, z, y, x) + (1, z, y, x)
    if spec.previous_stage:
        if len(spec.previous_stage) != len(spec.case_ids) or spec.num_classes < 2:
            raise AutosegError(f"{len(spec.previous_stage)} previous-stage segmentations for {len(spec.case_ids)} "
                               f"cases and {spec.num_classes} classes", where="previous_stage")
        for path in spec.previous_stage:
            if not Path(path).is_file():
                raise AutosegError("previous-stage segmentation missing (train the previous stage's folds)",
                                   where=path)
        load_previous_stage(spec.previous_stage[0], seg.shape)
    if spec.config.ndim not in (2, 3):
        raise AutosegError(f"patch_size {spec.config.patch_size} must have 2 or 3 axes",
                           where=f"plans.json:configurations.{spec.config.name}")


def make_train_loader(spec: LoaderSpec, device: torch.device | str = "cpu"
                      ) -> BatchLoader | DeviceAugmentedLoader:
    """Augmented, foreground-oversampled training batches (nnU-Net's training pipeline).

    ``device`` is where the network trains; ``spec.augment.device`` (resolved for it by
    `resolve_augment_device`) decides whether the workers augment each sample on the CPU or
    only crop, leaving the batch to be augmented on ``device``.
    """
    _check_spec(spec)
    setup = augmentation_setup(spec.config, spec.augment, _masked_channels(spec))
    where = resolve_augment_device(spec.augment.device, torch.device(device).type)
    logger.info("train loader: %d cases, batch %d, patch %s cut at %s, dummy 2D %s, mirror axes %s, %d workers, "
                "augmentation on %s", len(spec.case_ids), spec.batch_size, setup.patch_size,
                setup.initial_patch_size, setup.dummy_2d, setup.mirror_axes, spec.num_workers,
                "the CPU workers" if where == "cpu" else torch.device(device).type)
    source = _BatchSource(spec, setup, augment=True, deferred=where == "device")
    loader = BatchLoader(source, spec.num_workers, spec.pin_memory)
    return DeviceAugmentedLoader(loader, torch.device(device)) if where == "device" else loader


def make_val_loader(spec: LoaderSpec) -> BatchLoader:
    """Validation batches for pseudo-Dice: patch-sized crops, foreground-oversampled, no augmentation."""
    _check_spec(spec)
    source = _BatchSource(spec, crop_only_setup(spec.config, _masked_channels(spec)), augment=False)
    return BatchLoader(source, spec.num_workers, spec.pin_memory)
