"""Reading and writing images, always as (z, y, x) arrays plus the geometry to write them back.

3D formats (NIfTI, NRRD, MHA/MHD, DICOM series folders) go through SimpleITK; 2D natural
images (PNG, TIFF) through scikit-image / tifffile. A 2D image becomes a (1, y, x) array with
spacing (999, 1, 1) like nnU-Net, so every later stage sees three axes. `Geometry` keeps
origin and direction exactly as SimpleITK reports them (x, y, z order) so that a prediction
written back has the input's geometry to the last bit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autoseg.common.errors import DatasetError

SITK_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
"""File endings read with SimpleITK (3D, or 2D medical formats)."""

NATURAL_2D_ENDINGS = (".png", ".tif", ".tiff", ".bmp")
"""2D natural-image endings read with scikit-image / tifffile."""

SUPPORTED_ENDINGS = SITK_ENDINGS + NATURAL_2D_ENDINGS

DUMMY_2D_SPACING_MM = 999.0
"""The z spacing given to 2D images (nnU-Net's convention): large, so planning never pools or resamples along it."""


@dataclass(frozen=True)
class Geometry:
    """Where an image's voxels sit in the world.

    ``spacing`` is in mm in array order (z, y, x). ``origin`` and ``direction`` are in
    SimpleITK order (x, y, z; direction row-major), of the file's own dimension (2 or 3), so
    they round-trip unchanged. ``shape`` is the (z, y, x) array shape.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    file_ndim: int = 3

    def same_grid(self, other: "Geometry", rtol: float = 1e-4, atol: float = 1e-3) -> bool:
        """Same shape and (within tolerance) spacing, origin and direction."""
        return (self.shape == other.shape
                and np.allclose(self.spacing, other.spacing, rtol=rtol, atol=atol)
                and len(self.origin) == len(other.origin)
                and np.allclose(self.origin, other.origin, rtol=rtol, atol=atol)
                and np.allclose(self.direction, other.direction, rtol=rtol, atol=atol))

    def differences(self, other: "Geometry", rtol: float = 1e-4, atol: float = 1e-3) -> list[str]:
        """Human-readable list of what differs (empty when the grids agree)."""
        out = []
        if self.shape != other.shape:
            out.append(f"shape {self.shape} vs {other.shape}")
        if not np.allclose(self.spacing, other.spacing, rtol=rtol, atol=atol):
            out.append(f"spacing {self.spacing} vs {other.spacing}")
        if len(self.origin) != len(other.origin) or not np.allclose(self.origin, other.origin, rtol=rtol, atol=atol):
            out.append(f"origin {self.origin} vs {other.origin}")
        if len(self.direction) != len(other.direction) or not np.allclose(
                self.direction, other.direction, rtol=rtol, atol=atol):
            out.append("direction differs")
        return out


def file_ending(path: str | Path) -> str:
    """The ending that identifies the format (``.nii.gz`` counts as one)."""
    name = Path(path).name.lower()
    for ending in SUPPORTED_ENDINGS:
        if name.endswith(ending):
            return ending
    return "".join(Path(name).suffixes[-2:]) or Path(name).suffix


def read_image(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read one single-channel image as a (z, y, x) array (dtype as stored) and its geometry.

    A directory is read as a DICOM series. A 4D image or a multi-component (vector) image is
    a `DatasetError`: channels are separate files in the nnU-Net layout.
    """
    path = Path(path)
    if path.is_dir():
        return _read_dicom_series(path)
    if not path.exists():
        raise DatasetError("file not found", path)
    ending = file_ending(path)
    if ending in NATURAL_2D_ENDINGS:
        return _read_natural_2d(path)
    if ending not in SITK_ENDINGS:
        raise DatasetError(f"unsupported file ending {ending!r} (supported: {', '.join(SUPPORTED_ENDINGS)})", path)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise DatasetError(f"unreadable image ({str(e).strip().splitlines()[-1][:120]})", path) from None
    return _from_sitk(img, path)


def _from_sitk(img: sitk.Image, path: Path) -> tuple[np.ndarray, Geometry]:
    dim = img.GetDimension()
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise DatasetError(f"image has {img.GetNumberOfComponentsPerPixel()} components per voxel; "
                           "store one channel per file", path)
    if dim not in (2, 3):
        raise DatasetError(f"image is {dim}D; expected a 2D or 3D single-channel image "
                           "(split 4D MSD images with `autoseg convert-msd`)", path)
    arr = sitk.GetArrayFromImage(img)  # (z, y, x) or (y, x)
    spacing_xyz = tuple(float(s) for s in img.GetSpacing())
    if dim == 2:
        arr = arr[None]
        spacing = (DUMMY_2D_SPACING_MM, spacing_xyz[1], spacing_xyz[0])
    else:
        spacing = (spacing_xyz[2], spacing_xyz[1], spacing_xyz[0])
    geom = Geometry(shape=tuple(int(s) for s in arr.shape), spacing=spacing,  # type: ignore[arg-type]
                    origin=tuple(float(o) for o in img.GetOrigin()),
                    direction=tuple(float(d) for d in img.GetDirection()), file_ndim=dim)
    return arr, geom


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, Geometry]:
    reader = sitk.ImageSeriesReader()
    ids = reader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise DatasetError("folder holds no DICOM series", folder)
    if len(ids) > 1:
        raise DatasetError(f"folder holds {len(ids)} DICOM series; keep one series per folder", folder)
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), ids[0]))
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise DatasetError(f"unreadable DICOM series ({str(e).strip().splitlines()[-1][:120]})", folder) from None
    return _from_sitk(img, folder)


def _read_natural_2d(path: Path) -> tuple[np.ndarray, Geometry]:
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile
            arr = tifffile.imread(str(path))
        else:
            from skimage import io as skio
            arr = skio.imread(str(path))
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file for the user
        raise DatasetError(f"unreadable image ({type(e).__name__}: {e})", path) from None
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        raise DatasetError("colour image; store one channel per file (R, G, B as _0000, _0001, _0002)", path)
    if arr.ndim != 2:
        raise DatasetError(f"expected a 2D single-channel image, got array shape {arr.shape}", path)
    geom = Geometry(shape=(1, *arr.shape), spacing=(DUMMY_2D_SPACING_MM, 1.0, 1.0),  # type: ignore[arg-type]
                    origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0), file_ndim=2)
    return arr[None], geom


HEADER_DATA_ENDINGS = (".mhd", ".nhdr")
"""Formats written as a header plus a separate data file that the header names."""

INTEGER_2D_RANGES = {".png": (0, 65535), ".bmp": (0, 255)}
"""Value ranges the integer-only natural formats can store (PNG: 8 or 16 bit, BMP: 8 bit)."""


def write_image(path: str | Path, array: np.ndarray, geometry: Geometry) -> Path:
    """Write a (z, y, x) array with ``geometry`` in the format given by ``path``'s ending.

    Writes under a temp name in the same folder and renames, so a killed writer never leaves
    a half file under the final name. Values a format cannot hold (a 3D array in PNG,
    fractions or negatives in PNG/BMP) raise instead of being silently changed.
    """
    path = Path(path)
    ending = file_ending(path)
    if ending not in SUPPORTED_ENDINGS:
        raise DatasetError(f"cannot write unsupported file ending {ending!r} "
                           f"(supported: {', '.join(SUPPORTED_ENDINGS)})", path)
    if tuple(array.shape) != tuple(geometry.shape):
        raise ValueError(f"array shape {array.shape} does not match geometry shape {geometry.shape}")
    if ending in NATURAL_2D_ENDINGS:
        data = _natural_2d_data(path, ending, array)
    else:
        data = array[0] if geometry.file_ndim == 2 else array
    path.parent.mkdir(parents=True, exist_ok=True)
    if ending in HEADER_DATA_ENDINGS:
        return _write_header_and_data(path, data, geometry)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=ending, dir=path.parent)
    os.close(fd)
    try:
        if ending in (".tif", ".tiff"):
            import tifffile
            tifffile.imwrite(tmp, data)
        elif ending in NATURAL_2D_ENDINGS:
            from skimage import io as skio
            skio.imsave(tmp, data, check_contrast=False)
        else:
            sitk.WriteImage(_to_sitk(data, geometry), tmp, useCompression=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _to_sitk(data: np.ndarray, geometry: Geometry) -> sitk.Image:
    img = sitk.GetImageFromArray(data)
    sp = geometry.spacing
    img.SetSpacing((sp[2], sp[1]) if geometry.file_ndim == 2 else (sp[2], sp[1], sp[0]))
    img.SetOrigin(geometry.origin)
    img.SetDirection(geometry.direction)
    return img


def _natural_2d_data(path: Path, ending: str, array: np.ndarray) -> np.ndarray:
    """The (y, x) plane to store in a PNG/BMP/TIFF, or a DatasetError if the format cannot hold it."""
    if array.shape[0] != 1:
        raise DatasetError(f"{ending} holds one 2D image; got {array.shape[0]} slices", path)
    data = array[0]
    if ending not in INTEGER_2D_RANGES:
        return data
    lo, hi = INTEGER_2D_RANGES[ending]
    if data.size and (not np.all(np.isfinite(data)) or np.any(data != np.round(data))
                      or data.min() < lo or data.max() > hi):
        raise DatasetError(f"{ending} stores integers {lo}..{hi} only; convert the values or use .tif", path)
    return data.astype(np.uint8 if data.size == 0 or data.max() < 256 else np.uint16)


def _write_header_and_data(path: Path, data: np.ndarray, geometry: Geometry) -> Path:
    """Write .mhd/.nhdr: both files in a temp folder under their final names, data moved first."""
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        sitk.WriteImage(_to_sitk(data, geometry), str(tmp_dir / path.name), useCompression=True)
        header = tmp_dir / path.name
        for f in sorted(tmp_dir.iterdir()):
            if f != header:
                os.replace(f, path.parent / f.name)
        os.replace(header, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def read_case(image_files: tuple[Path, ...] | list[Path]) -> tuple[np.ndarray, Geometry]:
    """Read one case's channel files into a float32 (C, z, y, x) array; channels must share a grid."""
    arrays, geoms = [], []
    for f in image_files:
        a, g = read_image(f)
        arrays.append(a)
        geoms.append(g)
    for f, g in zip(image_files[1:], geoms[1:]):
        diffs = geoms[0].differences(g)
        if diffs:
            raise DatasetError(f"channel geometry differs from {Path(image_files[0]).name}: {'; '.join(diffs)}", f)
    return np.stack([a.astype(np.float32, copy=False) for a in arrays]), geoms[0]
