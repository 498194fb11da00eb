"""autoseg.nets stage (see docs/architecture.md): the dynamic U-Net built from a Configuration
(plain encoder, or the residual encoder of the ResEnc presets: ``residual.py``)."""

from autoseg.nets.unet import DynamicUNet, build_unet, deep_supervision_scales

__all__ = ["DynamicUNet", "build_unet", "deep_supervision_scales"]
