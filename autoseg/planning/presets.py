"""Planner presets: the default plain U-Net and nnU-Net's residual-encoder (ResEnc M/L/XL) planners.

nnU-Net 2.4+ recommends its ResEnc presets (Isensee et al. 2024, "nnU-Net Revisited"): the
same planning rules with a residual encoder (1, 3, 4, 6, 6, ... basic blocks per stage, one
conv per decoder stage), a memory reference calibrated for that network at 8 / 24 / 40 GB,
and no 5 % dataset cap on the batch. nnU-Net writes one planner subclass per preset
(``nnUNetPlannerResEncM/L/XL``); here a preset is a `Preset` value handed to the same rules.
Each preset writes its own plans file (`Paths.plans_file`: ``plans_<name>.json``) and its
trainings get their own results folders (`TrainingId.plans`), so they never mix with the
default plan's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from autoseg.common.errors import ConfigError
from autoseg.common.paths import DEFAULT_PLANS
from autoseg.planning import memory
from autoseg.planning.plans import PLAIN_ENCODER, RESIDUAL_ENCODER

DEFAULT_PRESET = DEFAULT_PLANS
"""The plain-conv U-Net planner (nnU-Net's ``ExperimentPlanner``), written to ``plans.json``."""

PLAIN_CONVS_PER_STAGE = 2
"""Convs per encoder and decoder stage of the plain U-Net (nnU-Net ``n_conv_per_stage``)."""

RESENC_BLOCKS_PER_STAGE = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
"""Residual basic blocks per encoder stage of the ResEnc U-Nets, truncated to the stage count
(nnU-Net ``ResEncUNetPlanner.UNet_blocks_per_stage_encoder``; ResNet-34-like)."""

RESENC_DECODER_CONVS_PER_STAGE = 1
"""Convs per decoder stage of the ResEnc U-Nets (nnU-Net ``UNet_blocks_per_stage_decoder``)."""

MAX_DATASET_FRACTION_PER_BATCH = 0.05
"""A batch covers at most 5 % of the dataset's voxels, against overfitting small datasets
(nnU-Net ``max_dataset_covered``)."""

RESENC_MAX_DATASET_FRACTION_PER_BATCH = 1.0
"""The ResEnc presets drop the 5 % cap: a batch may cover the whole dataset (nnU-Net
``max_dataset_covered = 1``), so small datasets get the batch their memory target allows."""


@dataclass(frozen=True)
class Preset:
    """What a planner preset changes; everything else (spacing, topology rules, shrinking) is shared."""

    name: str
    encoder: str
    """`PLAIN_ENCODER` or `RESIDUAL_ENCODER`."""
    encoder_blocks: tuple[int, ...]
    """Per encoder stage: convs (plain) or residual blocks (residual); truncated to the stage count."""
    decoder_convs: int
    reference: memory.MemoryReference
    """The memory calibration of this network family; its GB is also the preset's default budget."""
    max_dataset_fraction_per_batch: float
    shrink_to_reference_batch: bool
    """Shrink the patch until the reference batch (2 in 3D, 12 in 2D) fits, not just `MIN_BATCH_SIZE`
    (nnU-Net's ResEnc planners compare the estimate with the reference directly)."""
    description: str

    @property
    def default_gpu_memory_gb(self) -> float:
        """The budget the preset is planned for when no ``--gpu-memory`` is given."""
        return self.reference.gpu_memory_gb

    def blocks_for(self, num_stages: int) -> tuple[int, ...]:
        """The encoder's per-stage block (or conv) counts for a network of ``num_stages`` stages."""
        if num_stages > len(self.encoder_blocks):
            raise ConfigError(f"preset {self.name!r} knows block counts for at most {len(self.encoder_blocks)} "
                              f"stages, the topology has {num_stages}", "strides")
        return self.encoder_blocks[:num_stages]

    def feature_map_voxels(self, patch_size: Sequence[int], strides: Sequence[Sequence[int]],
                           features_per_stage: Sequence[int], num_classes: int) -> int:
        """The memory model's voxel count of this preset's network for one sample (`memory`)."""
        if self.encoder == RESIDUAL_ENCODER:
            return memory.residual_feature_map_voxels(patch_size, strides, features_per_stage, num_classes,
                                                      self.blocks_for(len(strides)), self.decoder_convs)
        return memory.conv_feature_map_voxels(patch_size, strides, features_per_stage, num_classes,
                                              self.decoder_convs)


def _resenc(name: str, gb: float, voxels_3d: int, voxels_2d: int, gpus: str) -> Preset:
    return Preset(name=name, encoder=RESIDUAL_ENCODER, encoder_blocks=RESENC_BLOCKS_PER_STAGE,
                  decoder_convs=RESENC_DECODER_CONVS_PER_STAGE,
                  reference=memory.MemoryReference(voxels_3d, voxels_2d, gb),
                  max_dataset_fraction_per_batch=RESENC_MAX_DATASET_FRACTION_PER_BATCH,
                  shrink_to_reference_batch=True,
                  description=f"residual encoder U-Net for ~{gb:g} GB ({gpus}); nnU-Net nnUNetPlannerResEnc"
                              f"{name.split('-')[1].upper()}")


PRESETS: dict[str, Preset] = {
    DEFAULT_PRESET: Preset(
        name=DEFAULT_PRESET, encoder=PLAIN_ENCODER, encoder_blocks=(PLAIN_CONVS_PER_STAGE,) * 13,
        decoder_convs=PLAIN_CONVS_PER_STAGE, reference=memory.PLAIN_REFERENCE,
        max_dataset_fraction_per_batch=MAX_DATASET_FRACTION_PER_BATCH, shrink_to_reference_batch=False,
        description="plain-conv U-Net for 8 GB; nnU-Net ExperimentPlanner"),
    # reference voxels: nnU-Net's UNet_reference_val_3d / _2d of each ResEnc planner ("set to
    # reproduce default nnU-Net's configurations as much as possible", i.e. empirical)
    "resenc-m": _resenc("resenc-m", 8.0, 680_000_000, 135_000_000, "RTX 2080 Ti class"),
    "resenc-l": _resenc("resenc-l", 24.0, 2_100_000_000, 380_000_000, "RTX 4090 / A5000 class"),
    "resenc-xl": _resenc("resenc-xl", 40.0, 3_600_000_000, 560_000_000, "A100 40 GB class"),
}
"""Every preset by name; ``autoseg plan --preset NAME`` and ``--plans NAME`` select one."""


def get_preset(name: str) -> Preset:
    """The named preset, or a `ConfigError` listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown plans preset {name!r} (known: {', '.join(PRESETS)})", "--preset") from None
