"""autoseg.data stage (see docs/architecture.md): patch sampling, augmentation, batch loaders."""

from autoseg.data.augment import AugmentConfig, training_mirror_axes
from autoseg.data.loader import BatchLoader, LoaderSpec, make_train_loader, make_val_loader

__all__ = ["AugmentConfig", "BatchLoader", "LoaderSpec", "make_train_loader", "make_val_loader",
           "training_mirror_axes"]
