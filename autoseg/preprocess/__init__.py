"""Preprocessing: raw case -> transposed, cropped, normalized, resampled arrays (and back).

The steps and their order are nnU-Net's (``DefaultPreprocessor``), so a plan gives the same
arrays a nnU-Net user expects:

1. transpose the axes by ``plan.transpose_forward`` (the coarse axis first);
2. crop to the bounding box of the nonzero region (any channel != 0, holes filled);
3. normalize each channel by ``plan.normalization`` (z-score inside the nonzero mask when
   ``use_nonzero_mask``, so the zero background outside it stays 0); when a channel is
   normalized inside the mask, background labels outside it become -1 (`OUTSIDE_MASK_LABEL`),
   so that training can put those voxels back to 0 after intensity augmentation;
4. resample to the configuration's target spacing: images with cubic splines, labels by
   linear interpolation of each class's one-hot mask followed by argmax (a voxel can only
   take a label that was there). When the spacing is anisotropic (max/min > 3, nnU-Net's
   rule) the coarse axis is resampled separately, with nearest neighbour, after an in-plane
   resampling of each slice, so that thick slices are not smeared into each other.
   The ignore label (sparse annotation) is resampled like any other label, so unannotated
   voxels stay unannotated and no annotation is invented.

Cropping commutes with transposing, so the crop box is found and stored in the original
(z, y, x) array coordinates; everything after cropping is in the transposed order.
`revert_preprocessing` undoes steps 4, 2 and 1 for predictions. Files per case (CASE.json
last, so a case is complete exactly when its json exists):

    <data_identifier>/CASE.npy      float32 (C, *spatial)
    <data_identifier>/CASE_seg.npy  int8 (1, *spatial); -1 outside the nonzero mask (masked normalization)
    <data_identifier>/CASE_fg.npz   class_<k> -> (N, 3) int32 sampled voxel coordinates
    <data_identifier>/CASE.json     CaseProperties

A run holds an exclusive lock on the data folder (``.lock``), so two runs never write the same
cases, and every temp file of a case write found under the lock was left by a killed run.

Modules, each importing only those before it: ``steps.py`` the pure array steps; ``case.py``
one case there and back (`preprocess_case`, `revert_preprocessing`); ``store.py`` the files of
a data folder; ``dataset.py`` a whole dataset (`preprocess_dataset`). The names below are the
stage's API: import them from ``autoseg.preprocess``.
"""

from __future__ import annotations

from autoseg.preprocess.case import (FG_SEED, OUTSIDE_MASK_LABEL, CaseProperties, outside_mask_label, preprocess_case,
                                     revert_preprocessing)
from autoseg.preprocess.dataset import LOCK_FILE, STALE_TEMP_RE, load_dataset_plan, preprocess_dataset, settings_for
from autoseg.preprocess.steps import (ANISOTROPY_RATIO, FG_MIN_COVERAGE, FG_SAMPLES_PER_CLASS, NORM_EPS,
                                      crop_to_nonzero, normalize, resample_data, resample_seg, resampled_shape,
                                      sample_foreground, separate_axis, target_spacing)
from autoseg.preprocess.store import (SETTINGS_FILENAME, PreprocessedCase, PreprocessingSettings, case_files,
                                      list_preprocessed_cases, load_preprocessed_case, median_preprocessed_shape,
                                      migrate_v1_to_v2, save_preprocessed_case)

__all__ = ["ANISOTROPY_RATIO", "CaseProperties", "FG_MIN_COVERAGE", "FG_SAMPLES_PER_CLASS", "FG_SEED", "LOCK_FILE",
           "NORM_EPS", "OUTSIDE_MASK_LABEL", "PreprocessedCase", "PreprocessingSettings", "SETTINGS_FILENAME",
           "STALE_TEMP_RE", "case_files", "crop_to_nonzero", "list_preprocessed_cases", "load_dataset_plan",
           "load_preprocessed_case", "median_preprocessed_shape", "migrate_v1_to_v2", "normalize",
           "outside_mask_label", "preprocess_case", "preprocess_dataset", "resample_data", "resample_seg",
           "resampled_shape", "revert_preprocessing", "sample_foreground", "save_preprocessed_case", "separate_axis",
           "settings_for", "target_spacing"]
