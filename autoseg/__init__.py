"""autoseg: self-configuring medical image segmentation with a parallel training scheduler."""

__version__ = "0.1.0"
