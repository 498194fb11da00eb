"""autoseg.nets stage (see docs/architecture.md): the dynamic U-Net built from a Configuration."""

from autoseg.nets.unet import DynamicUNet, build_unet, deep_supervision_scales

__all__ = ["DynamicUNet", "build_unet", "deep_supervision_scales"]
