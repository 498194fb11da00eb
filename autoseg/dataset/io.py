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
import zlib
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
    return _from_sitk(read_sitk_image(path), path)


def read_sitk_image(path: str | Path) -> sitk.Image:
    """`sitk.ReadImage` with every failure a one-line `DatasetError`, and incomplete NIfTI refused.

    ITK's NIfTI reader fills the voxels missing from a truncated .nii / .nii.gz with zeros
    and reports success, so a half-written or half-downloaded file would be trained on or
    predicted; `check_nifti_complete` catches that first. (MetaImage and NRRD readers raise.)
    """
    path = Path(path)
    if file_ending(path) in (".nii", ".nii.gz"):
        check_nifti_complete(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise DatasetError(f"unreadable image ({itk_reason(e)})", path) from None


def itk_reason(err: RuntimeError) -> str:
    """The telling line of an ITK exception (its last one, unless that is a stale errno 'Reason:')."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()] or ["unknown ITK error"]
    line = lines[-1]
    if line.startswith("Reason:") and len(lines) > 1:  # MetaImage: errno left over, not the cause
        line = lines[-2].split("): ", 1)[-1]
    return line[:120]


GZIP_MAGIC = b"\x1f\x8b"

READ_CHUNK_BYTES = 1 << 20
"""Compressed bytes read, and decompressed bytes produced, per step (bounded memory for any ratio)."""


@dataclass(frozen=True)
class NiftiHeader:
    """The NIfTI-1/2 header fields that locate the voxel data (fixed offsets of the standard)."""

    byte_order: str
    datatype: int
    vox_offset: int
    data_bytes: int
    """prod(dim[1..dim[0]]) * bitpix / 8; 0 when the header gives no usable size."""


def parse_nifti_header(raw: bytes) -> NiftiHeader | None:
    """The header of the (decompressed) first bytes of a NIfTI file; None when it is not one."""
    for order in "<>":
        size = int(np.frombuffer(raw, f"{order}i4", 1, 0)[0]) if len(raw) >= 4 else 0
        if size in (348, 540) and len(raw) >= size:
            break
    else:
        return None
    if size == 348:  # NIfTI-1: dim int16[8] @40, datatype @70, bitpix @72, vox_offset float32 @108
        dims = np.frombuffer(raw, f"{order}i2", 8, 40).astype(np.int64)
        datatype, bitpix = (int(v) for v in np.frombuffer(raw, f"{order}i2", 2, 70))
        offset = int(np.frombuffer(raw, f"{order}f4", 1, 108)[0])
    else:  # NIfTI-2: datatype int16 @12, bitpix @14, dim int64[8] @16, vox_offset int64 @168
        datatype, bitpix = (int(v) for v in np.frombuffer(raw, f"{order}i2", 2, 12))
        dims = np.frombuffer(raw, f"{order}i8", 8, 16)
        offset = int(np.frombuffer(raw, f"{order}i8", 1, 168)[0])
    n = int(dims[0])
    shape = [int(d) for d in dims[1:1 + n]] if 1 <= n <= 7 else []
    usable = shape and all(d > 0 for d in shape) and bitpix > 0 and bitpix % 8 == 0
    data_bytes = int(np.prod(shape, dtype=object)) * (bitpix // 8) if usable else 0
    return NiftiHeader(order, datatype, max(offset, size), data_bytes)


def check_nifti_complete(path: Path) -> None:
    """Raise `DatasetError` unless the file holds all the bytes its NIfTI header announces.

    Expected size = vox_offset + prod(dim) * bitpix / 8. A plain file is measured by its size; a
    gzip stream is decompressed in chunks and counted (the gzip trailer's size field cannot be
    trusted: in a cut file those 4 bytes are arbitrary compressed data). Decompressing also
    checks the CRC, so corrupt data is refused here too. A file that is not NIfTI at all is
    left to ITK, whose message says why.
    """
    with open(path, "rb") as f:
        gzipped = f.read(2) == GZIP_MAGIC
    try:
        head, actual, complete = _gunzip_count(path) if gzipped else (_read_head(path), path.stat().st_size, True)
    except zlib.error as e:
        raise DatasetError(f"corrupt gzip data ({e})", path) from None
    header = parse_nifti_header(head)
    if header is None:
        if not complete:
            raise DatasetError(f"truncated image: gzip stream ends after {actual} bytes", path)
        return
    expected = header.vox_offset + header.data_bytes
    if not complete or (header.data_bytes and actual < expected):
        raise DatasetError(f"truncated image: {actual} of {expected} bytes", path)


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(540)


def _gunzip_count(path: Path) -> tuple[bytes, int, bool]:
    """(first 540 decompressed bytes, decompressed size, whether every gzip member ended properly)."""
    head, total = b"", 0
    inflater = zlib.decompressobj(wbits=31)  # 31: gzip wrapper, so zlib checks CRC32 and ISIZE
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK_BYTES):
            while chunk:
                if inflater.eof:  # a further gzip member; zero padding after the last one is ignored
                    if not chunk.strip(b"\0"):
                        break
                    inflater = zlib.decompressobj(wbits=31)
                out = inflater.decompress(chunk, READ_CHUNK_BYTES)
                if len(head) < 540:
                    head += out[:540 - len(head)]
                total += len(out)
                chunk = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
    return head, total, inflater.eof


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
        raise DatasetError(f"unreadable DICOM series ({itk_reason(e)})", folder) from None
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
