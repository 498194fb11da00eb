"""The residual-encoder U-Net against dynamic_network_architectures' ResidualEncoderUNet (nnU-Net's ResEnc).

Built from the same plan configuration, both networks must have the same parameters (shape by
shape, in the same order within encoder, upsampling, decoder and heads), give the same logits
with the same weights, and our memory model must count what nnU-Net's planner counts. Skips
without nnunetv2 / dynamic_network_architectures (a test-only reference).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("nnunetv2", reason="nnunetv2 (the parity reference) is not installed; see README")
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet  # noqa: E402

from autoseg.infer.nnunet_keys import autoseg_key  # noqa: E402
from autoseg.nets.unet import build_unet  # noqa: E402
from autoseg.planning import memory  # noqa: E402
from autoseg.planning.plans import Configuration  # noqa: E402

CONFIGS = {
    # Hippocampus 3d_fullres / 2d as nnUNetPlannerResEncM plans them (tests/planning/test_resenc_presets.py)
    "hippocampus_3d": ((40, 56, 40), ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)), ((3, 3, 3),) * 4,
                       (32, 64, 128, 256)),
    "hippocampus_2d": ((56, 40), ((1, 1), (2, 2), (2, 2), (2, 2)), ((3, 3),) * 4, (32, 64, 128, 256)),
    # thick slices: in-plane pooling first, 1-wide kernels along z, a 320 feature cap
    "thick_slice_3d": ((16, 64, 64), ((1, 1, 1), (1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)),
                       ((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)), (32, 64, 128, 256, 320)),
}
BLOCKS = (1, 3, 4, 6, 6)


def _config(name: str) -> Configuration:
    patch, strides, kernels, feats = CONFIGS[name]
    return Configuration(name="3d_fullres" if len(patch) == 3 else "2d", data_identifier="x",
                         spacing=(1.0,) * len(patch), patch_size=patch, batch_size=2, median_shape=patch,
                         strides=strides, kernel_sizes=kernels, features_per_stage=feats, n_conv_per_stage=1,
                         encoder="residual", encoder_blocks_per_stage=BLOCKS[:len(strides)])


def _reference(cfg: Configuration, num_classes: int) -> nn.Module:
    """ResidualEncoderUNet with the arch_kwargs nnUNetPlannerResEnc* writes for ``cfg``."""
    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if cfg.ndim == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    n = len(cfg.strides)
    return ResidualEncoderUNet(
        input_channels=1, n_stages=n, features_per_stage=list(cfg.features_per_stage), conv_op=conv,
        kernel_sizes=[list(k) for k in cfg.kernel_sizes], strides=[list(s) for s in cfg.strides],
        n_blocks_per_stage=list(cfg.encoder_blocks_per_stage), num_classes=num_classes,
        n_conv_per_stage_decoder=[1] * (n - 1), conv_bias=True, norm_op=norm,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None, dropout_op_kwargs=None,
        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)


_GROUPS = (("encoder.", "encoder."), ("upsample.", "decoder.transpconvs."), ("decoder.", "decoder.stages."),
           ("heads.", "decoder.seg_layers."))


def _paired_parameters(ours: nn.Module, ref: nn.Module) -> list[tuple[str, str]]:
    """Our parameter names next to nnU-Net's, group by group in registration order."""
    pairs = []
    ours_named, ref_named = dict(ours.named_parameters()), dict(ref.named_parameters())
    for mine, theirs in _GROUPS:
        a = [k for k in ours_named if k.startswith(mine)]
        b = [k for k in ref_named if k.startswith(theirs)]
        assert len(a) == len(b), (mine, len(a), len(b))
        for ka, kb in zip(a, b):
            assert ours_named[ka].shape == ref_named[kb].shape, (ka, kb)
            pairs.append((ka, kb))
    assert len(pairs) == len(ours_named) == len(ref_named)
    return pairs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_residual_unet_equals_nnunet_resenc(name: str) -> None:
    cfg = _config(name)
    torch.manual_seed(0)
    ours = build_unet(cfg, in_channels=1, num_classes=3, deep_supervision=True)
    ref = _reference(cfg, 3)
    ref.apply(ref.initialize)  # He init + zeroed last norm of every block, as nnU-Net trains it
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    # our init zeroes the same norms as nnU-Net's init_last_bn_before_add_to_0
    zero_ours = sorted(k for k, p in ours.named_parameters() if k.startswith("encoder") and not p.any())
    zero_ref = sorted(k for k, p in ref.named_parameters() if k.startswith("encoder") and not p.any())
    assert len(zero_ours) == len(zero_ref) > 0
    with torch.no_grad():  # random norms too, so every residual branch matters in the comparison
        for p in ref.parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.shape else 0.0))
    pairs = _paired_parameters(ours, ref)
    assert all(autoseg_key(b, residual=True) == a for a, b in pairs)  # the importer's key mapping agrees
    ref_params = dict(ref.named_parameters())
    ours.load_state_dict({a: ref_params[b].detach().clone() for a, b in pairs}, strict=True)
    x = torch.randn((2, 1, *cfg.patch_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert len(a) == len(b) == len(cfg.strides) - 1
    for out_a, out_b in zip(a, b):
        assert out_a.shape == out_b.shape
        torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_residual_memory_count_is_nnunets(name: str) -> None:
    """What nnU-Net's ResEnc planner budgets: ResidualEncoderUNet.compute_conv_feature_map_size."""
    cfg = _config(name)
    ref = _reference(cfg, 3)
    ref.decoder.deep_supervision = False  # nnU-Net's planner counts the network without it
    ours = memory.residual_feature_map_voxels(cfg.patch_size, cfg.strides, cfg.features_per_stage, 3,
                                              cfg.encoder_blocks_per_stage, 1)
    assert ours == int(ref.compute_conv_feature_map_size(cfg.patch_size))
