"""The plan: every number preprocessing, the network and training need, per configuration.

Planned by `autoseg.planning.plan.plan_dataset`; written to ``preprocessed/<dataset>/plans.json``
by `autoseg.planning.store.save_plan`.
Axis order: every per-axis tuple in a `Configuration` is in the *transposed* order
(``Plan.transpose_forward`` applied to the (z, y, x) array axes; the coarse axis first).
2D configurations have 2 entries per axis tuple (the in-plane axes), 3D ones have 3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from autoseg.common.errors import AutosegError
from autoseg.dataset.spec import LabelScheme, LabelValue, ignore_label

PLAIN_ENCODER = "plain"
RESIDUAL_ENCODER = "residual"
ENCODERS = (PLAIN_ENCODER, RESIDUAL_ENCODER)
"""``Configuration.encoder`` values: nnU-Net's PlainConvUNet encoder, or the ResEnc presets'
residual one (`autoseg.planning.presets`); `autoseg.nets.unet.build_unet` builds either."""

NORMALIZATION_SCHEMES = ("zscore", "ct", "none", "rescale_to_0_1", "rgb_to_0_1")
"""Per-channel intensity normalization names (nnU-Net's: ZScore, CT, NoNorm, RescaleTo01, RGBTo01)."""


@dataclass(frozen=True)
class ChannelNormalization:
    """How one input channel is normalized during preprocessing.

    ``zscore``: (x - mean) / std of the image (inside the nonzero mask when ``use_nonzero_mask``).
    ``ct``: clip to [clip_low, clip_high] (foreground 0.5 / 99.5 percentiles), then
    (x - mean) / std with the dataset's foreground mean/std. ``none``: unchanged.
    ``rescale_to_0_1``: min-max to [0, 1] per image. ``rgb_to_0_1``: x / 255.
    """

    scheme: str
    use_nonzero_mask: bool = False
    clip_low: float | None = None
    clip_high: float | None = None
    mean: float | None = None
    std: float | None = None


@dataclass(frozen=True)
class Configuration:
    """One trainable configuration (2d, 3d_fullres, 3d_lowres) of a dataset."""

    name: str
    data_identifier: str
    """Name of the preprocessed data folder; configurations with equal preprocessing share it."""
    spacing: tuple[float, ...]
    """Target spacing in mm (transposed order). 2D: the in-plane spacing only (z is kept as is)."""
    patch_size: tuple[int, ...]
    batch_size: int
    median_shape: tuple[int, ...]
    """Median case shape after crop, at the target spacing (transposed order)."""
    strides: tuple[tuple[int, ...], ...]
    """Per encoder stage; stage 0 is all ones. len(strides) == number of stages."""
    kernel_sizes: tuple[tuple[int, ...], ...]
    """Per encoder stage conv kernel (3, or 1 along axes still too coarse)."""
    features_per_stage: tuple[int, ...]
    n_conv_per_stage: int = 2
    """Convs per stage: encoder and decoder of a plain U-Net, the decoder only of a residual one."""
    encoder: str = PLAIN_ENCODER
    """``plain`` (nnU-Net's PlainConvUNet) or ``residual`` (ResidualEncoderUNet: a stem, then
    ``encoder_blocks_per_stage`` residual basic blocks per stage); set by the plans preset."""
    encoder_blocks_per_stage: tuple[int, ...] = ()
    """Residual blocks per encoder stage (``residual`` only; one entry per stage)."""
    resample_order_data: int = 3
    resample_order_seg: int = 1
    batch_dice: bool = True
    previous_stage: str | None = None
    next_stage: str | None = None
    estimated_vram_gb: float = 0.0
    """The planner's memory estimate for one training process at this patch and batch size."""
    reasons: dict[str, str] = field(default_factory=dict)
    """Why each number is what it is (printed by `autoseg plan`)."""

    @property
    def ndim(self) -> int:
        return len(self.patch_size)

    @property
    def num_pools_per_axis(self) -> tuple[int, ...]:
        """How often each axis is downsampled by 2."""
        return tuple(sum(1 for s in self.strides if s[a] == 2) for a in range(self.ndim))


def migrate_v1_to_v2(body: dict[str, Any]) -> dict[str, Any]:
    """Version 2 added ``transferred_from``; every version-1 plan was planned from its own fingerprint."""
    return {**body, "transferred_from": None}


@dataclass(frozen=True)
class Plan:
    """All configurations of one dataset plus dataset-level decisions."""

    SCHEMA: ClassVar[str] = "autoseg.plan"
    VERSION: ClassVar[int] = 2
    MIGRATIONS: ClassVar[dict[int, Any]] = {1: migrate_v1_to_v2}

    dataset: str
    gpu_memory_gb: float
    channel_names: dict[int, str]
    labels: dict[str, LabelValue]
    transpose_forward: tuple[int, int, int]
    transpose_backward: tuple[int, int, int]
    original_median_spacing: tuple[float, float, float]
    """Median spacing of the raw cases, (z, y, x) before transpose."""
    original_median_shape: tuple[int, int, int]
    """Median shape after crop, raw spacing, (z, y, x) before transpose."""
    normalization: tuple[ChannelNormalization, ...]
    configurations: dict[str, Configuration]
    preset: str = "default"
    """The planner preset (`autoseg.planning.presets`) that made this plan; it names the plans
    file (``plans.json`` or ``plans_<preset>.json``) and the results folders of its trainings."""
    overrides: tuple[str, ...] = ()
    """The ``--set`` overrides applied on top of the rules, as given."""
    reasons: dict[str, str] = field(default_factory=dict)
    regions_class_order: tuple[int, ...] = ()
    """Region-based training only: the label value each region is written as (dataset.json)."""
    transferred_from: str | None = None
    """The dataset whose configurations this plan took (``autoseg plan --from-plans``, to fine-tune a
    network pretrained there); None when planned from this dataset's own fingerprint."""

    @property
    def label_scheme(self) -> LabelScheme:
        """Classes or regions, and the conversions between label maps and network outputs."""
        return LabelScheme.from_labels(self.labels, self.regions_class_order)

    @property
    def num_classes(self) -> int:
        """Network output channels: every class but the ignore label (never predicted), or one per region."""
        return self.label_scheme.num_outputs

    @property
    def ignore_label(self) -> int | None:
        """Value of unannotated voxels in the training labels (dataset.json ``"ignore"``), or None."""
        return ignore_label(self.labels)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    def configuration(self, name: str) -> Configuration:
        """The named configuration, or an error listing the planned ones."""
        try:
            return self.configurations[name]
        except KeyError:
            raise AutosegError(f"configuration {name!r} is not in the plan of {self.dataset} "
                               f"(planned: {', '.join(self.configurations)})") from None
