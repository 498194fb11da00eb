"""A generated phantom dataset: the embedded default for the demo and tiny data for tests.

Each case is an anisotropic MRI-like volume with a smooth bias field and noise, holding an
ellipsoidal "organ" (label 1) with a brighter, smaller "lesion" (label 2) inside it, at a
random position, size and orientation. It is easy enough that a short CPU training reaches
a high Dice, and real enough to exercise every stage: anisotropic spacing (transpose,
separate-z resampling), a non-identity direction and non-zero origin (geometry round trips),
two foreground classes, varying case shapes. With ``annotate_every_nth_slice > 1`` the
training labels are sparse (nnU-Net's ignore label), as after slice-wise annotation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.dataset.io import Geometry, write_image


@dataclass(frozen=True)
class PhantomRecipe:
    """Everything that determines the generated dataset; same recipe, same files."""

    num_training: int = 24
    num_test: int = 4
    shape: tuple[int, int, int] = (16, 44, 44)
    """Nominal (z, y, x) shape; each case varies in-plane by up to ``shape_jitter`` voxels."""
    shape_jitter: int = 4
    spacing: tuple[float, float, float] = (3.2, 0.9, 0.9)
    """(z, y, x) mm: the coarse z axis makes the dataset anisotropic (ratio 3.6 > 3)."""
    modality: str = "MRI"
    oblique: bool = True
    """Write a non-identity direction (a rotation about z) and a non-zero origin."""
    noise_std: float = 0.12
    seed: int = 0
    file_ending: str = ".nii.gz"
    annotate_every_nth_slice: int = 1
    """1: dense labels. n > 1: each training label keeps only every n-th z slice (from a random
    offset); the other slices become the ``"ignore"`` label, declared in dataset.json. Test
    labels stay dense, so held-out evaluation sees every voxel."""

    def __post_init__(self) -> None:
        if self.annotate_every_nth_slice < 1:
            raise ValueError(f"annotate_every_nth_slice must be >= 1, got {self.annotate_every_nth_slice}")


LABELS = {"background": 0, "organ": 1, "lesion": 2}

IGNORE_LABEL = len(LABELS)
"""Value of unannotated voxels in sparse phantoms (one above the highest class, nnU-Net's rule)."""


def sparsify_slices(label: np.ndarray, every_nth: int, offset: int) -> np.ndarray:
    """Keep slices ``offset, offset + n, ...`` along z; every other voxel becomes `IGNORE_LABEL`."""
    out = np.full_like(label, IGNORE_LABEL)
    out[offset % every_nth::every_nth] = label[offset % every_nth::every_nth]
    return out


def _rotation_about_z(angle: float) -> tuple[float, ...]:
    c, s = np.cos(angle), np.sin(angle)
    # SimpleITK direction, row-major 3x3 in (x, y, z)
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


def make_phantom_case(rng: np.random.Generator, recipe: PhantomRecipe) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """One (image, label, geometry) triple; image float32 (z, y, x), label uint8."""
    jz = 0
    jy, jx = rng.integers(-recipe.shape_jitter, recipe.shape_jitter + 1, size=2)
    shape = (recipe.shape[0] + jz, recipe.shape[1] + int(jy), recipe.shape[2] + int(jx))
    sz, sy, sx = recipe.spacing
    # physical coordinates in mm, centred
    z, y, x = [np.arange(n, dtype=np.float32) * s for n, s in zip(shape, (sz, sy, sx))]
    Z, Y, X = np.meshgrid(z - z.mean(), y - y.mean(), x - x.mean(), indexing="ij")
    extent = np.array([shape[0] * sz, shape[1] * sy, shape[2] * sx])

    centre = rng.uniform(-0.15, 0.15, 3) * extent
    radii = np.array([rng.uniform(0.22, 0.32) * extent[0], rng.uniform(0.18, 0.28) * extent[1],
                      rng.uniform(0.18, 0.28) * extent[2]])
    theta = rng.uniform(0, np.pi)
    yy, xx = Y - centre[1], X - centre[2]
    yr, xr = np.cos(theta) * yy + np.sin(theta) * xx, -np.sin(theta) * yy + np.cos(theta) * xx
    organ = ((Z - centre[0]) / radii[0]) ** 2 + (yr / radii[1]) ** 2 + (xr / radii[2]) ** 2 <= 1.0

    lesion_radii = rng.uniform(0.45, 0.6) * radii  # an ellipsoid of the organ's proportions
    lc = centre + rng.uniform(-0.25, 0.25, 3) * radii
    lesion = (((Z - lc[0]) / lesion_radii[0]) ** 2 + ((Y - lc[1]) / lesion_radii[1]) ** 2
              + ((X - lc[2]) / lesion_radii[2]) ** 2 <= 1.0) & organ

    label = np.zeros(shape, np.uint8)
    label[organ] = 1
    label[lesion] = 2

    bias = 1.0 + 0.25 * np.sin(X / extent[2] * np.pi + rng.uniform(0, np.pi)) \
        * np.cos(Y / extent[1] * np.pi + rng.uniform(0, np.pi))
    img = np.full(shape, 0.35, np.float32)
    img[organ] = 0.9
    img[lesion] = 1.6
    img = img * bias + rng.normal(0.0, recipe.noise_std, shape)
    img = np.clip(img, 0, None) * rng.uniform(400, 600)  # MRI-like arbitrary units, varying per case

    if recipe.oblique:
        origin = tuple(float(v) for v in rng.uniform(-120, 120, 3))
        direction = _rotation_about_z(rng.uniform(0.1, 0.6))
    else:
        origin, direction = (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    geom = Geometry(shape=shape, spacing=(sz, sy, sx), origin=origin, direction=direction, file_ndim=3)
    return img.astype(np.float32), label, geom


def make_phantom_dataset(root: str | Path, recipe: PhantomRecipe = PhantomRecipe(),
                         dataset_name: str = "Dataset999_Phantom") -> Path:
    """Write an nnU-Net v2 raw dataset (plus imagesTs / labelsTs for held-out evaluation).

    Returns the dataset folder ``root/<dataset_name>``. Deterministic given the recipe.
    """
    out = Path(root) / dataset_name
    rng = np.random.default_rng(recipe.seed)
    ending = recipe.file_ending
    for i in range(recipe.num_training + recipe.num_test):
        img, lab, geom = make_phantom_case(rng, recipe)
        test = i >= recipe.num_training
        if recipe.annotate_every_nth_slice > 1 and not test:
            # drawn only for sparse recipes: dense datasets keep their exact images and labels
            lab = sparsify_slices(lab, recipe.annotate_every_nth_slice,
                                  int(rng.integers(recipe.annotate_every_nth_slice)))
        case = f"phantom_{i:03d}"
        write_image(out / ("imagesTs" if test else "imagesTr") / f"{case}_0000{ending}", img, geom)
        write_image(out / ("labelsTs" if test else "labelsTr") / f"{case}{ending}", lab, geom)
    meta = {
        "name": dataset_name.split("_", 1)[1],
        "description": "Generated phantom: anisotropic MRI-like volumes with an organ and a lesion",
        "channel_names": {"0": recipe.modality},
        "labels": {**LABELS, "ignore": IGNORE_LABEL} if recipe.annotate_every_nth_slice > 1 else LABELS,
        "numTraining": recipe.num_training,
        "file_ending": ending,
        "autoseg_phantom_recipe": {k: (list(v) if isinstance(v, tuple) else v)
                                   for k, v in recipe.__dict__.items()},
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


REGION_LABELS = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}
"""BraTS-style nested regions over the region phantom's labels 1 (oedema), 2 (core), 3 (enhancing)."""

REGIONS_CLASS_ORDER = [1, 2, 3]
"""Where a region is predicted, write its innermost label; later (inner) regions overwrite earlier ones."""


def make_region_phantom_dataset(root: str | Path, recipe: PhantomRecipe = PhantomRecipe(),
                                dataset_name: str = "Dataset997_RegionPhantom") -> Path:
    """A two-channel phantom with nested regions (region-based training, BraTS style).

    Labels: 1 the organ outside the lesion, 2 the lesion's rim, 3 its centre (the lesion eroded
    in-plane), declared as regions whole = {1, 2, 3}, core = {2, 3}, enhancing = {3} with
    ``regions_class_order`` [1, 2, 3]. Channel 0 is the phantom image (organ and lesion bright);
    channel 1 a second contrast in which only the lesion centre stands out, so "enhancing" needs
    both channels. Same recipe, same files.
    """
    from scipy.ndimage import binary_erosion

    out = Path(root) / dataset_name
    rng = np.random.default_rng(recipe.seed)
    ending = recipe.file_ending
    inplane = np.zeros((3, 3, 3), bool)
    inplane[1] = True  # erode within each slice: the coarse z axis keeps the centre from vanishing
    for i in range(recipe.num_training + recipe.num_test):
        img, lab, geom = make_phantom_case(rng, recipe)
        centre = binary_erosion(lab == 2, structure=inplane, iterations=1)
        lab = lab.copy()
        lab[centre] = 3
        second = rng.normal(0.3, recipe.noise_std, lab.shape).astype(np.float32)
        second[lab == 3] += 1.2
        second = np.clip(second, 0, None) * 300.0
        test = i >= recipe.num_training
        case = f"regions_{i:03d}"
        images = "imagesTs" if test else "imagesTr"
        write_image(out / images / f"{case}_0000{ending}", img, geom)
        write_image(out / images / f"{case}_0001{ending}", second.astype(np.float32), geom)
        write_image(out / ("labelsTs" if test else "labelsTr") / f"{case}{ending}", lab, geom)
    meta = {
        "name": dataset_name.split("_", 1)[1],
        "description": "Generated two-channel phantom with nested regions (whole > core > enhancing)",
        "channel_names": {"0": recipe.modality, "1": recipe.modality},
        "labels": REGION_LABELS,
        "regions_class_order": REGIONS_CLASS_ORDER,
        "numTraining": recipe.num_training,
        "file_ending": ending,
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out
