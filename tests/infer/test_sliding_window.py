"""Tiling, Gaussian weighting and mirroring TTA of the sliding-window predictor."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from autoseg.infer.sliding_window import (
    compute_tiles,
    gaussian_importance_map,
    mirror_combinations,
    pad_to_patch,
    predict_sliding_window,
    unpad,
    window_starts,
)


def _coverage(shape, tiles):
    count = np.zeros(shape, int)
    for t in tiles:
        count[t] += 1
    return count


@pytest.mark.parametrize("shape,patch", [((40, 56, 48), (16, 32, 32)), ((16, 32, 32), (16, 32, 32)),
                                         ((17, 33, 100), (16, 32, 32)), ((64, 64), (32, 48))])
def test_tiles_cover_every_voxel_and_stay_inside(shape, patch):
    tiles = compute_tiles(shape, patch, step=0.5)
    count = _coverage(shape, tiles)
    assert count.min() >= 1
    for t in tiles:
        for s, size, p in zip(t, shape, patch):
            assert 0 <= s.start and s.stop <= size and s.stop - s.start == p


def test_images_smaller_than_the_patch_are_padded_then_covered():
    data = torch.randn(2, 5, 20, 7)
    padded, keep = pad_to_patch(data, (8, 16, 16))
    assert tuple(padded.shape) == (2, 8, 20, 16)
    tiles = compute_tiles(padded.shape[1:], (8, 16, 16))
    assert _coverage(padded.shape[1:], tiles)[keep].min() >= 1
    assert torch.equal(unpad(padded, keep), data)


def test_step_rule_matches_nnunet():
    # (size - patch) / (patch * step) = (100 - 32) / 16 = 4.25 -> 5 + 1 = 6 windows, first and last at the borders
    starts = window_starts(100, 32, 0.5)
    assert len(starts) == math.ceil((100 - 32) / 16) + 1
    assert starts[0] == 0 and starts[-1] == 100 - 32
    assert window_starts(32, 32, 0.5) == [0]
    assert len(window_starts(100, 32, 1.0)) == math.ceil(68 / 32) + 1
    with pytest.raises(ValueError):
        window_starts(10, 32)


def test_gaussian_is_nnunets_definition():
    """Peak 1 at voxel p // 2 (nnU-Net's centre, not (p - 1) / 2), sigma = p / 8, every weight > 0."""
    patch = (9, 16, 12)
    g = gaussian_importance_map(patch)
    assert tuple(g.shape) == patch
    centre = tuple(p // 2 for p in patch)
    assert float(g[centre]) == 1.0 and int(torch.argmax(g)) == int(np.ravel_multi_index(centre, patch))
    x = [np.arange(p) - p // 2 for p in patch]
    expect = np.exp(-0.5 * sum((xi * 8 / p) ** 2 for xi, p in zip(np.meshgrid(*x, indexing="ij"), patch)))
    np.testing.assert_allclose(g.numpy(), expect, rtol=1e-6)
    # symmetric about the peak where both sides exist; an even axis has one extra voxel before it
    assert torch.allclose(g[:, 1:], torch.flip(g[:, 1:], [1]))
    assert float(g.min()) > 0


def test_gaussian_zeros_become_the_smallest_weight():
    """A narrow sigma cuts the tails (at 4 sigma) and float16 underflows the corners: both get the minimum."""
    tiny = gaussian_importance_map((64, 64), sigma_scale=1 / 64)
    positive = tiny[tiny > tiny.min()]
    assert float(tiny.min()) > 0 and float(tiny[0, 0]) == float(tiny.min()) < float(positive.min())
    half = gaussian_importance_map((40, 56, 40), dtype=torch.float16)
    assert float(half.min()) > 0 and float(half[0, 0, 0]) == float(half.min())


def test_mirror_combinations():
    assert mirror_combinations(()) == [()]
    assert set(mirror_combinations((0, 2))) == {(), (0,), (2,), (0, 2)}


class Blur(nn.Module):
    """Mirror-equivariant toy net: a symmetric 3x3x3 mean filter, two output channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1, bias=True)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 27)
            self.conv.weight[1] *= -1
            self.conv.bias.zero_()

    def forward(self, x):
        return self.conv(x)


class Ramp(nn.Module):
    """NOT mirror-equivariant: adds a ramp along the last axis."""

    def forward(self, x):
        ramp = torch.linspace(0, 1, x.shape[-1]).expand_as(x)
        return torch.cat([x + ramp, -x], dim=1)


def test_tta_with_equivariant_net_equals_no_tta():
    torch.manual_seed(0)
    data = torch.randn(1, 20, 24, 18)
    net = Blur().eval()
    plain = predict_sliding_window(net, data, (12, 16, 16), num_classes=2, mirror_axes=())
    tta = predict_sliding_window(net, data, (12, 16, 16), num_classes=2, mirror_axes=(0, 1, 2))
    assert plain.shape == (2, 20, 24, 18)
    assert torch.allclose(plain, tta, atol=1e-5)


def test_tta_averages_mirrored_predictions():
    data = torch.zeros(1, 8, 8, 8)
    out = predict_sliding_window(Ramp(), data, (8, 8, 8), num_classes=2, mirror_axes=(2,))
    # ramp and mirrored ramp average to 0.5 everywhere
    assert torch.allclose(out[0], torch.full((8, 8, 8), 0.5), atol=1e-6)


def test_blending_of_a_constant_net_is_exact_and_shape_is_kept():
    class Const(nn.Module):
        def forward(self, x):
            return torch.stack([torch.full_like(x[:, 0], 3.0), torch.full_like(x[:, 0], -1.0)], 1)

    data = torch.randn(1, 7, 45, 30)  # smaller than the patch on axis 0, larger on the others
    out = predict_sliding_window(Const(), data, (8, 16, 16), num_classes=2, step=0.5, batch_size=3)
    assert out.shape == (2, 7, 45, 30)
    assert torch.allclose(out[0], torch.full_like(out[0], 3.0), atol=1e-5)
    assert torch.allclose(out[1], torch.full_like(out[1], -1.0), atol=1e-5)


def test_2d_windows_and_deep_supervision_lists():
    class DS(nn.Module):
        def forward(self, x):
            return [torch.cat([x, -x], 1), torch.zeros(1)]

    data = torch.randn(1, 40, 33)
    out = predict_sliding_window(DS(), data, (16, 16), num_classes=2)
    assert torch.allclose(out[0], data[0], atol=1e-5)


def _nnunet_fp16_reference(net: nn.Module, image: torch.Tensor, patch, mirror_axes) -> torch.Tensor:
    """Stock nnUNetPredictor's blending written out by hand (CPU, no padding needed)."""
    delta = np.zeros(patch)
    delta[tuple(p // 2 for p in patch)] = 1
    g = gaussian_filter(delta, [p / 8 for p in patch], 0, mode="constant", cval=0)
    gauss = torch.from_numpy(g / (g.max() / 10)).to(torch.float16)
    gauss[gauss == 0] = gauss[gauss != 0].min()
    logits = torch.zeros((3, *image.shape[1:]), dtype=torch.float16)
    counts = torch.zeros(image.shape[1:], dtype=torch.float16)
    flips = [[a + 2 for a in c] for r in range(1, len(mirror_axes) + 1)
             for c in itertools.combinations(mirror_axes, r)]
    for t in compute_tiles(image.shape[1:], patch, 0.5):
        x = image[(slice(None), *t)][None]
        y = net(x)
        for dims in flips:
            y += torch.flip(net(torch.flip(x, dims)), dims)
        y /= len(flips) + 1
        y = y[0]
        y *= gauss  # float32 times float16 weights, in float32
        logits[(slice(None), *t)] += y  # float16 accumulator
        counts[t] += gauss
    torch.div(logits, counts, out=logits)
    return logits


def test_nnunet_fp16_reproduces_nnunets_float16_blending_bit_for_bit():
    """``nnunet_fp16``: the same float16 bits as nnU-Net's arithmetic, and visibly not the float32 path."""
    torch.manual_seed(0)
    net = nn.Conv3d(2, 3, 3, padding=1).eval()
    with torch.no_grad():
        net.weight.mul_(8.0)
    image = torch.randn(2, 13, 12, 17)
    patch = (8, 8, 8)
    with torch.inference_mode():
        ref = _nnunet_fp16_reference(net, image, patch, (0, 2))
    got = predict_sliding_window(net, image, patch, 3, mirror_axes=(0, 2), batch_size=2, nnunet_fp16=True)
    assert got.dtype == torch.float16 and torch.equal(got, ref)
    default = predict_sliding_window(net, image, patch, 3, mirror_axes=(0, 2))
    assert default.dtype == torch.float32 and not torch.equal(default.half(), got)
    # float16 rounding everywhere; near the corners, subnormal weights round the logits coarsely
    close = (default - got.float()).abs() <= 0.02 * default.abs().clamp(min=1.0)
    print(f"\nfp16 vs float32 logits: {float(close.float().mean()):.4f} within 2 %")
    assert float(close.float().mean()) >= 0.9
