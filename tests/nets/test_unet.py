"""The dynamic U-Net: shapes for 2D/3D and anisotropic topologies, deep supervision, init, checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoseg.common.errors import AutosegError
from autoseg.nets.unet import LEAKY_RELU_SLOPE, PRIOR_FLOOR, build_unet, deep_supervision_scales, init_heads_to_prior
from autoseg.planning.plans import Configuration

torch.set_num_threads(1)


def make_config(patch: tuple[int, ...], strides: tuple[tuple[int, ...], ...], features: tuple[int, ...],
                kernels: tuple[tuple[int, ...], ...] | None = None, n_conv: int = 2) -> Configuration:
    ndim = len(patch)
    kernels = kernels or tuple((3,) * ndim for _ in strides)
    return Configuration(name=f"{ndim}d_test", data_identifier="x", spacing=(1.0,) * ndim, patch_size=patch,
                         batch_size=2, median_shape=patch, strides=strides, kernel_sizes=kernels,
                         features_per_stage=features, n_conv_per_stage=n_conv)


CONFIG_2D = make_config((32, 24), ((1, 1), (2, 2), (2, 2), (2, 2)), (4, 8, 16, 16))
CONFIG_3D_ANISO = make_config((8, 32, 32), ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)), (4, 8, 16, 16),
                              kernels=((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3)))


@pytest.mark.parametrize("config", [CONFIG_2D, CONFIG_3D_ANISO], ids=["2d", "3d_aniso"])
def test_deep_supervision_outputs_match_scales(config: Configuration) -> None:
    net = build_unet(config, in_channels=2, num_classes=3)
    x = torch.randn(2, 2, *config.patch_size)
    outputs = net(x)
    scales = deep_supervision_scales(config)
    assert isinstance(outputs, list) and len(outputs) == len(config.strides) - 1 == len(scales)
    for out, scale in zip(outputs, scales):
        expected = tuple(round(p * s) for p, s in zip(config.patch_size, scale))
        assert out.shape == (2, 3) + expected
    assert scales[0] == (1.0,) * config.ndim


def test_anisotropic_scales_keep_the_coarse_axis_first() -> None:
    assert deep_supervision_scales(CONFIG_3D_ANISO) == [(1.0, 1.0, 1.0), (1.0, 0.5, 0.5), (0.5, 0.25, 0.25)]


def test_deep_supervision_toggle_gives_one_full_resolution_tensor_with_the_same_weights() -> None:
    net = build_unet(CONFIG_3D_ANISO, in_channels=1, num_classes=2).eval()
    x = torch.randn(1, 1, *CONFIG_3D_ANISO.patch_size)
    with torch.no_grad():
        full_ds = net(x)[0]
        net.deep_supervision = False
        single = net(x)
    assert isinstance(single, torch.Tensor) and single.shape == (1, 2, 8, 32, 32)
    torch.testing.assert_close(single, full_ds)
    no_ds = build_unet(CONFIG_3D_ANISO, 1, 2, deep_supervision=False)
    assert no_ds.state_dict().keys() == net.state_dict().keys()


def test_gradients_reach_every_parameter() -> None:
    net = build_unet(CONFIG_2D, in_channels=1, num_classes=2)
    outputs = net(torch.randn(2, 1, *CONFIG_2D.patch_size))
    sum(o.float().pow(2).mean() for o in outputs).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert any(p.grad.abs().sum() > 0 for p in net.parameters())


def test_parameter_count_of_a_two_stage_net_matches_a_hand_count() -> None:
    net = build_unet(make_config((16, 16), ((1, 1), (2, 2)), (4, 8)), in_channels=1, num_classes=3)
    # encoder 0: (1*4*9+4) + 8 + (4*4*9+4) + 8 = 204; encoder 1: (4*8*9+8) + 16 + (8*8*9+8) + 16 = 912
    # up: 8*4*2*2+4 = 132; decoder: (8*4*9+4) + 8 + (4*4*9+4) + 8 = 456; head: 4*3+3 = 15
    assert sum(p.numel() for p in net.parameters()) == 204 + 912 + 132 + 456 + 15


def test_layers_follow_nnunet_conventions() -> None:
    net = build_unet(CONFIG_3D_ANISO, 1, 2)
    first = net.encoder[1][0]
    assert isinstance(first, torch.nn.Conv3d) and first.stride == (1, 2, 2) and first.bias is not None
    norm = net.encoder[1][1]
    assert isinstance(norm, torch.nn.InstanceNorm3d) and norm.affine and norm.eps == 1e-5
    assert net.encoder[0][0].kernel_size == (1, 3, 3) and net.encoder[0][0].padding == (0, 1, 1)
    up = net.upsample[-1]
    assert isinstance(up, torch.nn.ConvTranspose3d) and up.kernel_size == up.stride == (1, 2, 2)
    assert all(float(m.bias.detach().abs().sum()) == 0 for m in net.modules() if isinstance(m, torch.nn.Conv3d))
    # He init: std of a big conv's weights ~ gain / sqrt(fan_in)
    w = net.encoder[3][3].weight
    gain = (2.0 / (1 + LEAKY_RELU_SLOPE**2)) ** 0.5
    assert float(w.detach().std()) == pytest.approx(gain / (w[0].numel() ** 0.5), rel=0.15)


def test_inconsistent_topology_is_a_user_error_naming_the_configuration() -> None:
    bad = make_config((30, 32), ((1, 1), (2, 2), (2, 2)), (4, 8, 16))
    with pytest.raises(AutosegError, match="not divisible") as e:
        build_unet(bad, 1, 2)
    assert e.value.where == "plans.json:configurations.2d_test"
    with pytest.raises(AutosegError, match="one entry per stage"):
        build_unet(make_config((32, 32), ((1, 1), (2, 2)), (4,)), 1, 2)
    with pytest.raises(AutosegError, match="all ones"):
        build_unet(make_config((32, 32), ((2, 2), (2, 2)), (4, 8)), 1, 2)


def test_prior_heads_start_the_softmax_at_the_label_shares() -> None:
    torch.manual_seed(0)
    net = build_unet(CONFIG_3D_ANISO, in_channels=1, num_classes=3)
    he = torch.softmax(net(torch.randn(2, 1, *CONFIG_3D_ANISO.patch_size))[0], 1).mean((0, 2, 3, 4))
    share = init_heads_to_prior(net, np.array([9400, 400, 200]))
    np.testing.assert_allclose(share, [0.94, 0.04, 0.02])
    for head in net.heads:
        np.testing.assert_allclose(head.bias.detach().numpy(), np.log(share), rtol=1e-6)
        assert head.weight.abs().sum() > 0  # He weights kept: symmetry broken, gradient flows
    with torch.no_grad():
        prior = torch.softmax(net(torch.randn(2, 1, *CONFIG_3D_ANISO.patch_size))[0], 1).mean((0, 2, 3, 4))
    assert prior[0] > 0.8 > he.max()  # background dominates from the start, as in the labels
    assert prior[1:].max() < 0.1


def test_prior_heads_floor_absent_classes_and_reject_bad_counts() -> None:
    net = build_unet(CONFIG_2D, in_channels=1, num_classes=3)
    share = init_heads_to_prior(net, np.array([1000, 0, 10]))
    assert share[1] >= PRIOR_FLOOR * 0.99 and np.isfinite(net.heads[0].bias.detach().numpy()).all()
    for bad in (np.array([1, 2]), np.array([0, 0, 0]), np.array([5, -1, 3])):
        with pytest.raises(ValueError, match="voxel counts"):
            init_heads_to_prior(net, bad)
