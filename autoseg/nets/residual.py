"""The residual encoder of nnU-Net's ResEnc U-Nets (Isensee et al. 2024), built from a plan.

Same topology as ``dynamic_network_architectures``' ``ResidualEncoder`` with ``BasicBlockD``
blocks (what nnU-Net's ``nnUNetPlannerResEncM/L/XL`` plans): a stem conv (stride 1, the first
stage's kernel and width), then per stage ``blocks[s]`` ResNet-D basic blocks; the first block
carries the stage's stride. A basic block is conv -> norm -> LeakyReLU -> conv -> norm, added to
its skip path, then LeakyReLU. The skip path is the identity, or (ResNet-D) an average pool of
the stride followed by a bias-free 1x1 conv + norm when the block strides or changes width.
The decoder is the plain U-Net's (`autoseg.nets.unet.DynamicUNet`).
"""

from __future__ import annotations

import torch
from torch import nn

NORM_EPS = 1e-5
"""InstanceNorm epsilon (nnU-Net's norm_op_kwargs); the same as the plain U-Net's."""

LEAKY_RELU_SLOPE = 1e-2
"""LeakyReLU negative slope (torch's default, which nnU-Net keeps)."""

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_AVG_POOL = {2: nn.AvgPool2d, 3: nn.AvgPool3d}


def conv_norm(ndim: int, in_ch: int, out_ch: int, kernel: tuple[int, ...], stride: tuple[int, ...],
              bias: bool = True, act: bool = True) -> nn.Sequential:
    """conv -> instance norm (-> LeakyReLU), 'same' padding."""
    layers: list[nn.Module] = [
        _CONV[ndim](in_ch, out_ch, kernel, stride, tuple((k - 1) // 2 for k in kernel), bias=bias),
        _NORM[ndim](out_ch, eps=NORM_EPS, affine=True)]
    if act:
        layers.append(nn.LeakyReLU(LEAKY_RELU_SLOPE, inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """A ResNet-D basic block: two convs on the main path, pooled projection on the skip when needed."""

    def __init__(self, ndim: int, in_ch: int, out_ch: int, kernel: tuple[int, ...], stride: tuple[int, ...]) -> None:
        super().__init__()
        self.conv1 = conv_norm(ndim, in_ch, out_ch, kernel, stride)
        self.conv2 = conv_norm(ndim, out_ch, out_ch, kernel, (1,) * ndim, act=False)
        skip: list[nn.Module] = []
        if any(s != 1 for s in stride):
            skip.append(_AVG_POOL[ndim](stride, stride))
        if in_ch != out_ch:
            skip.append(conv_norm(ndim, in_ch, out_ch, (1,) * ndim, (1,) * ndim, bias=False, act=False))
        self.skip = nn.Sequential(*skip)  # empty Sequential = identity
        self.act = nn.LeakyReLU(LEAKY_RELU_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        out += self.skip(x)
        return self.act(out)


def residual_encoder(ndim: int, in_channels: int, features: tuple[int, ...], strides: tuple[tuple[int, ...], ...],
                     kernel_sizes: tuple[tuple[int, ...], ...], blocks: tuple[int, ...]) -> nn.ModuleList:
    """One module per stage, each returning that stage's skip; stage 0 starts with the stem."""
    stages = nn.ModuleList()
    ch = features[0]
    for s, (feats, stride, kernel, n) in enumerate(zip(features, strides, kernel_sizes, blocks)):
        layers: list[nn.Module] = []
        if s == 0:
            layers.append(conv_norm(ndim, in_channels, features[0], kernel, (1,) * ndim))
        layers += [BasicBlock(ndim, ch if b == 0 else feats, feats, kernel, stride if b == 0 else (1,) * ndim)
                   for b in range(n)]
        stages.append(nn.Sequential(*layers))
        ch = feats
    return stages


def zero_last_norm_of_blocks(module: nn.Module) -> None:
    """Start every block's residual branch at zero (its last norm's weight and bias), so each block
    begins as its skip path: nnU-Net's ``init_last_bn_before_add_to_0`` for ResEnc U-Nets."""
    if isinstance(module, BasicBlock):
        norm = module.conv2[1]
        nn.init.zeros_(norm.weight)
        nn.init.zeros_(norm.bias)
