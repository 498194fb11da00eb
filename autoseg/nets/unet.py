"""The dynamic U-Net: topology read from a `Configuration`, built like nnU-Net's PlainConvUNet.

Encoder stage ``s`` is ``n_conv_per_stage`` x (Conv(bias) -> InstanceNorm(affine) ->
LeakyReLU(0.01)), its first conv carrying ``strides[s]``. The decoder walks back up: a
transposed conv (kernel = stride = the stride of the stage below the skip) to the skip's
features, concatenation with the skip, then ``n_conv_per_stage`` convs with the skip stage's
kernel, and a 1x1 segmentation head. With deep supervision, `DynamicUNet.forward` returns one
logit map per decoder stage, full resolution first; `deep_supervision_scales` gives their
per-axis scale relative to the patch, in the same order (the data pipeline downsamples the
targets to these scales).

A residual-encoder configuration (``encoder == "residual"``, the ResEnc presets) swaps the
encoder for `autoseg.nets.residual.residual_encoder` (a stem plus residual blocks per stage);
``n_conv_per_stage`` then counts the decoder's convs only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from autoseg.common.errors import AutosegError
from autoseg.nets.residual import residual_encoder, zero_last_norm_of_blocks
from autoseg.planning.plans import ENCODERS, RESIDUAL_ENCODER, Configuration

NORM_EPS = 1e-5
"""InstanceNorm epsilon (nnU-Net's norm_op_kwargs)."""

LEAKY_RELU_SLOPE = 1e-2
"""LeakyReLU negative slope; also the ``a`` of the He init (nnU-Net's InitWeights_He(1e-2))."""

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED_CONV = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def _conv_block(ndim: int, in_ch: int, out_ch: int, kernel: tuple[int, ...], stride: tuple[int, ...],
                n_conv: int) -> nn.Sequential:
    """``n_conv`` x (conv -> instance norm -> leaky ReLU); only the first conv is strided."""
    layers: list[nn.Module] = []
    padding = tuple(k // 2 for k in kernel)
    for i in range(n_conv):
        layers += [
            _CONV[ndim](in_ch if i == 0 else out_ch, out_ch, kernel, stride if i == 0 else 1, padding, bias=True),
            _NORM[ndim](out_ch, eps=NORM_EPS, affine=True),
            nn.LeakyReLU(LEAKY_RELU_SLOPE, inplace=True),
        ]
    return nn.Sequential(*layers)


class DynamicUNet(nn.Module):
    """A plain-conv U-Net whose depth, strides, kernels and widths come from a `Configuration`.

    ``deep_supervision`` is a plain attribute: inference and ONNX export set it to False to get
    one full-resolution tensor; training sets it to True to get the list of decoder outputs.
    The parameters (and so the state dict) are the same either way. ``encoder_blocks`` (one
    count per stage) builds a residual encoder instead of the plain one.
    """

    def __init__(self, ndim: int, in_channels: int, num_classes: int, features: tuple[int, ...],
                 strides: tuple[tuple[int, ...], ...], kernel_sizes: tuple[tuple[int, ...], ...],
                 n_conv_per_stage: int, deep_supervision: bool = True, encoder_blocks: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.ndim = ndim
        self.num_classes = num_classes
        self.deep_supervision = deep_supervision
        n = len(features)
        if encoder_blocks:
            self.encoder = residual_encoder(ndim, in_channels, features, strides, kernel_sizes, encoder_blocks)
        else:
            self.encoder = nn.ModuleList()
            ch = in_channels
            for s in range(n):
                self.encoder.append(_conv_block(ndim, ch, features[s], kernel_sizes[s], strides[s], n_conv_per_stage))
                ch = features[s]
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        # decoder stage d (0 = just above the bottleneck) brings stage n-1-d up to skip stage n-2-d
        for d in range(n - 1):
            below, skip = n - 1 - d, n - 2 - d
            self.upsample.append(_TRANSPOSED_CONV[ndim](features[below], features[skip], strides[below],
                                                         strides[below], bias=True))
            self.decoder.append(_conv_block(ndim, 2 * features[skip], features[skip], kernel_sizes[skip],
                                            (1,) * ndim, n_conv_per_stage))
            self.heads.append(_CONV[ndim](features[skip], num_classes, 1, 1, 0, bias=True))
        self.apply(_he_init)
        if encoder_blocks:
            self.apply(zero_last_norm_of_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits (B, num_classes, *patch); with deep supervision a list, full resolution first."""
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips[-1]
        outputs = []
        last = len(self.decoder) - 1
        for d, (up, block, head) in enumerate(zip(self.upsample, self.decoder, self.heads)):
            x = block(torch.cat((up(x), skips[-(d + 2)]), dim=1))
            if self.deep_supervision or d == last:
                outputs.append(head(x))
        if not self.deep_supervision:
            return outputs[-1]
        return outputs[::-1]


def _he_init(module: nn.Module) -> None:
    """Kaiming-normal weights (a = the LeakyReLU slope) and zero biases for every (transposed) conv."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=LEAKY_RELU_SLOPE)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


PRIOR_FLOOR = 1e-3
"""Smallest class share a head's bias starts from: a class absent from the counted cases still
gets a finite bias (log 0 would leave it unlearnable)."""


def init_heads_to_prior(net: DynamicUNet, class_voxels: np.ndarray) -> np.ndarray:
    """Set every segmentation head's bias to log(class share) so the untrained softmax is the prior.

    With nnU-Net's init (He weights, zero bias) each class gets a random image-wide logit offset
    (the head sums positive post-LeakyReLU features), so the untrained network may predict a
    foreground class on half the patch; Dice + CE with SGD momentum 0.99 then drives that class
    down everywhere and it can stay at Dice 0 for hundreds of iterations (seed-dependent, in
    nnU-Net too: docs/parity.md). Starting at the label prior (the RetinaNet prior-bias init)
    removes that phase; the He weights stay, so the heads still break symmetry and pass gradient.
    ``class_voxels`` holds one voxel count per class; returns the shares used.
    """
    counts = np.asarray(class_voxels, dtype=np.float64)
    if counts.shape != (net.num_classes,) or counts.sum() <= 0 or (counts < 0).any():
        raise ValueError(f"need {net.num_classes} non-negative voxel counts with a positive sum, got {counts}")
    share = np.maximum(counts / counts.sum(), PRIOR_FLOOR)
    share /= share.sum()
    with torch.no_grad():
        for head in net.heads:
            head.bias.copy_(torch.as_tensor(np.log(share), dtype=head.bias.dtype))
    return share


def init_heads_to_region_prior(net: DynamicUNet, region_share: np.ndarray) -> np.ndarray:
    """Sigmoid heads (region-based training): bias = logit of each region's voxel share.

    The untrained network then predicts each region's prior probability everywhere, the
    sigmoid counterpart of `init_heads_to_prior` (the same reason: no random image-wide
    offset that drives a region to Dice 0 first). Shares are clipped to
    [`PRIOR_FLOOR`, 1 - `PRIOR_FLOOR`]; returns the shares used.
    """
    share = np.asarray(region_share, dtype=np.float64)
    if share.shape != (net.num_classes,) or (share < 0).any() or (share > 1).any():
        raise ValueError(f"need {net.num_classes} region shares in [0, 1], got {share}")
    share = np.clip(share, PRIOR_FLOOR, 1 - PRIOR_FLOOR)
    with torch.no_grad():
        for head in net.heads:
            head.bias.copy_(torch.as_tensor(np.log(share / (1 - share)), dtype=head.bias.dtype))
    return share


def _check_topology(config: Configuration) -> None:
    """Fail with a readable error (not a shape mismatch deep in forward) on an inconsistent plan."""
    where = f"plans.json:configurations.{config.name}"
    ndim = config.ndim
    if ndim not in _CONV:
        raise AutosegError(f"patch_size {config.patch_size} must have 2 or 3 axes", where)
    n = len(config.strides)
    if n < 1 or len(config.kernel_sizes) != n or len(config.features_per_stage) != n:
        raise AutosegError(f"strides ({n}), kernel_sizes ({len(config.kernel_sizes)}) and features_per_stage "
                           f"({len(config.features_per_stage)}) need one entry per stage", where)
    for name, per_stage in (("strides", config.strides), ("kernel_sizes", config.kernel_sizes)):
        for s, entry in enumerate(per_stage):
            if len(entry) != ndim or any(int(v) < 1 for v in entry):
                raise AutosegError(f"{name}[{s}] = {entry} must have {ndim} positive entries", where)
    if any(int(v) != 1 for v in config.strides[0]):
        raise AutosegError(f"strides[0] must be all ones, got {config.strides[0]}", where)
    if config.n_conv_per_stage < 1 or any(f < 1 for f in config.features_per_stage):
        raise AutosegError("n_conv_per_stage and features_per_stage must be positive", where)
    if config.encoder not in ENCODERS:
        raise AutosegError(f"unknown encoder {config.encoder!r} (one of {', '.join(ENCODERS)})", where)
    blocks = config.encoder_blocks_per_stage
    if config.encoder == RESIDUAL_ENCODER and (len(blocks) != n or any(int(b) < 1 for b in blocks)):
        raise AutosegError(f"encoder_blocks_per_stage {list(blocks)} needs {n} positive entries", where)
    total = [math.prod(s[a] for s in config.strides) for a in range(ndim)]
    bad = [a for a in range(ndim) if config.patch_size[a] % total[a]]
    if bad:
        raise AutosegError(f"patch_size {config.patch_size} is not divisible by the total stride {tuple(total)} "
                           f"along axis {bad}", where)


def build_unet(config: Configuration, in_channels: int, num_classes: int,
               deep_supervision: bool = True) -> DynamicUNet:
    """The U-Net for one planned configuration (2D or 3D by ``len(config.patch_size)``; plain or
    residual encoder by ``config.encoder``)."""
    _check_topology(config)
    if in_channels < 1 or num_classes < 1:
        raise AutosegError(f"need >= 1 input channel and >= 1 output, got {in_channels} and {num_classes}",
                           f"plans.json:configurations.{config.name}")
    return DynamicUNet(
        ndim=config.ndim, in_channels=in_channels, num_classes=num_classes,
        features=tuple(int(f) for f in config.features_per_stage),
        strides=tuple(tuple(int(v) for v in s) for s in config.strides),
        kernel_sizes=tuple(tuple(int(v) for v in k) for k in config.kernel_sizes),
        n_conv_per_stage=config.n_conv_per_stage, deep_supervision=deep_supervision,
        encoder_blocks=(tuple(int(b) for b in config.encoder_blocks_per_stage)
                        if config.encoder == RESIDUAL_ENCODER else ()))


def deep_supervision_scales(config: Configuration) -> list[tuple[float, ...]]:
    """Per-axis scale of each deep-supervision output relative to the patch, full resolution first.

    Output ``i`` sits at the resolution of encoder stage ``i``: ``1 / prod(strides[:i+1])`` per axis;
    there is one per decoder stage (number of stages - 1), matching `DynamicUNet.forward`.
    """
    scales = []
    cumulative = [1] * config.ndim
    for s in range(len(config.strides) - 1):
        cumulative = [c * int(v) for c, v in zip(cumulative, config.strides[s])]
        scales.append(tuple(1.0 / c for c in cumulative))
    return scales
