"""Image IO round trips: array, spacing, origin and direction survive every supported format."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.common.errors import DatasetError
from autoseg.dataset.io import Geometry, file_ending, read_case, read_image, write_image

ANGLE = 0.3
C, S = float(np.cos(ANGLE)), float(np.sin(ANGLE))
OBLIQUE = Geometry(shape=(5, 6, 7), spacing=(2.5, 0.75, 0.5), origin=(-10.25, 3.5, 7.125),
                   direction=(C, -S, 0.0, S, C, 0.0, 0.0, 0.0, 1.0))
"""A rotated grid with a non-zero origin: values exactly representable in float32 except the rotation."""

NIFTI_DIRECTION_ATOL = 1e-6
"""NIfTI stores the rotation as a float32 quaternion, so the direction comes back to ~1e-8, not bit-exact."""


def _volume(dtype: type = np.float32) -> np.ndarray:
    rng = np.random.default_rng(1)
    return (rng.normal(size=OBLIQUE.shape) * 100).astype(dtype)


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"])
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
def test_3d_round_trip(tmp_path: Path, ending: str, dtype: type) -> None:
    arr = _volume(dtype)
    path = write_image(tmp_path / f"img{ending}", arr, OBLIQUE)
    back, geom = read_image(path)
    assert back.dtype == arr.dtype and np.array_equal(back, arr)
    assert (geom.shape, geom.spacing, geom.origin, geom.file_ndim) == (
        OBLIQUE.shape, OBLIQUE.spacing, OBLIQUE.origin, 3)
    atol = NIFTI_DIRECTION_ATOL if ending.startswith(".nii") else 1e-15
    np.testing.assert_allclose(geom.direction, OBLIQUE.direction, rtol=0, atol=atol)


@pytest.mark.parametrize("ending,data_file", [(".mhd", "img.zraw"), (".nhdr", "img.raw.gz")])
def test_header_formats_leave_no_temp_files(tmp_path: Path, ending: str, data_file: str) -> None:
    write_image(tmp_path / f"img{ending}", _volume(), OBLIQUE)
    write_image(tmp_path / f"img{ending}", _volume() + 1, OBLIQUE)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"img{ending}", data_file])
    assert np.array_equal(read_image(tmp_path / f"img{ending}")[0], _volume() + 1)


def _write_dicom_series(folder: Path, arr: np.ndarray, geom: Geometry) -> None:
    """One file per slice with the tags a reader needs to rebuild the 3D grid."""
    folder.mkdir()
    d = np.array(geom.direction).reshape(3, 3)
    series_uid = "1.2.826.0.1.3680043.2.1125.1"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(arr.shape[0]):
        sl = sitk.GetImageFromArray(arr[z])
        sl.SetSpacing((geom.spacing[2], geom.spacing[1]))  # the writer takes pixel spacing from the image
        position = np.array(geom.origin) + d[:, 2] * geom.spacing[0] * z
        tags = {
            "0008|0060": "MR", "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
            "0008|0018": f"{series_uid}.{z + 1}", "0020|000d": "1.2.826.0.1.3680043.2.1125.0",
            "0020|000e": series_uid, "0020|0013": str(z + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.10f}" for v in (*d[:, 0], *d[:, 1])),
            "0028|0030": f"{geom.spacing[1]}\\{geom.spacing[2]}",
            "0018|0050": str(geom.spacing[0]),
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice_{z:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_folder_round_trip(tmp_path: Path) -> None:
    arr = _volume(np.int16)
    _write_dicom_series(tmp_path / "series", arr, OBLIQUE)
    back, geom = read_image(tmp_path / "series")
    assert back.dtype == np.int16 and np.array_equal(back, arr)
    assert geom.shape == OBLIQUE.shape
    np.testing.assert_allclose(geom.spacing, OBLIQUE.spacing, atol=1e-5)
    np.testing.assert_allclose(geom.origin, OBLIQUE.origin, atol=1e-5)
    np.testing.assert_allclose(geom.direction, OBLIQUE.direction, atol=1e-6)


def test_folder_without_dicom_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no DICOM series") as info:
        read_image(tmp_path / "empty")
    assert info.value.where == str(tmp_path / "empty")


GEOM_2D = Geometry(shape=(1, 6, 7), spacing=(999.0, 1.0, 1.0), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0),
                   file_ndim=2)


@pytest.mark.parametrize("ending,dtype", [(".png", np.uint8), (".png", np.uint16), (".bmp", np.uint8),
                                          (".tif", np.float32), (".tiff", np.int16)])
def test_2d_natural_round_trip(tmp_path: Path, ending: str, dtype: type) -> None:
    rng = np.random.default_rng(2)
    hi = 255 if dtype == np.uint8 else 3000
    arr = rng.integers(0, hi, size=GEOM_2D.shape).astype(dtype)
    back, geom = read_image(write_image(tmp_path / f"img{ending}", arr, GEOM_2D))
    assert back.dtype == arr.dtype and np.array_equal(back, arr)
    assert geom == GEOM_2D


def test_2d_nifti_keeps_in_plane_spacing(tmp_path: Path) -> None:
    g = Geometry(shape=(1, 6, 7), spacing=(999.0, 0.75, 0.25), origin=(3.0, -1.5), direction=(0.0, 1.0, 1.0, 0.0),
                 file_ndim=2)
    arr = np.arange(42, dtype=np.float32).reshape(1, 6, 7)
    back, geom = read_image(write_image(tmp_path / "img.nii.gz", arr, g))
    assert np.array_equal(back, arr)
    assert geom == g


def test_png_refuses_what_it_cannot_store(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="one 2D image; got 5 slices"):
        write_image(tmp_path / "a.png", _volume(), OBLIQUE)
    with pytest.raises(DatasetError, match="integers 0..65535"):
        write_image(tmp_path / "a.png", np.full(GEOM_2D.shape, 0.5, np.float32), GEOM_2D)
    with pytest.raises(DatasetError, match="integers 0..255"):
        write_image(tmp_path / "a.bmp", np.full(GEOM_2D.shape, 300, np.int32), GEOM_2D)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_ending_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "scan.jpg"
    bad.write_bytes(b"\xff\xd8")
    with pytest.raises(DatasetError, match=r"unsupported file ending '\.jpg'") as info:
        read_image(bad)
    assert info.value.where == str(bad)
    with pytest.raises(DatasetError, match="unsupported file ending"):
        write_image(tmp_path / "out.jpg", _volume(), OBLIQUE)
    assert file_ending("a/B.NII.GZ") == ".nii.gz"


def test_4d_and_vector_images_are_refused(tmp_path: Path) -> None:
    vol = sitk.GetImageFromArray(_volume())
    sitk.WriteImage(sitk.JoinSeries([vol, vol]), str(tmp_path / "four.nii.gz"))
    sitk.WriteImage(sitk.Compose([vol, vol]), str(tmp_path / "vector.mha"))
    with pytest.raises(DatasetError, match="is 4D"):
        read_image(tmp_path / "four.nii.gz")
    with pytest.raises(DatasetError, match="2 components per voxel"):
        read_image(tmp_path / "vector.mha")


def test_read_case_stacks_channels_and_checks_their_grid(tmp_path: Path) -> None:
    a = write_image(tmp_path / "c_0000.nrrd", _volume(), OBLIQUE)
    b = write_image(tmp_path / "c_0001.nrrd", _volume(np.int16), OBLIQUE)
    arr, geom = read_case([a, b])
    assert arr.shape == (2, *OBLIQUE.shape) and arr.dtype == np.float32 and geom.same_grid(OBLIQUE)
    shifted = Geometry(**{**OBLIQUE.__dict__, "origin": (0.0, 0.0, 0.0)})
    c = write_image(tmp_path / "c_0002.nrrd", _volume(), shifted)
    with pytest.raises(DatasetError, match="channel geometry differs.*origin"):
        read_case([a, c])


def test_killed_write_leaves_no_file_under_the_final_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_image(tmp_path / "x.nii.gz", _volume()[:2], OBLIQUE)  # shape disagrees with geometry
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_a_file_cut_in_half_is_a_one_line_error(tmp_path: Path, ending: str) -> None:
    """ITK reads a cut NIfTI without complaint (the missing voxels come back as zeros); we refuse it."""
    path = write_image(tmp_path / f"img{ending}", np.random.default_rng(0).random(OBLIQUE.shape, np.float32), OBLIQUE)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError) as info:
        read_image(path)
    assert info.value.where == str(path) and "\n" not in info.value.message
    if ending.startswith(".nii"):
        size = 352 + int(np.prod(OBLIQUE.shape)) * 4
        done = len(data) // 2 if ending == ".nii" else None
        assert info.value.message.startswith("truncated image: ") and info.value.message.endswith(f" of {size} bytes")
        if done is not None:
            assert info.value.message == f"truncated image: {done} of {size} bytes"


def test_complete_nifti_in_several_gzip_members_or_uncompressed_under_gz_is_read(tmp_path: Path) -> None:
    """The completeness check must not refuse what ITK reads correctly."""
    arr = np.arange(np.prod(OBLIQUE.shape), dtype=np.float32).reshape(OBLIQUE.shape)
    plain = write_image(tmp_path / "a.nii", arr, OBLIQUE).read_bytes()
    (tmp_path / "two.nii.gz").write_bytes(gzip.compress(plain[:1000]) + gzip.compress(plain[1000:]) + b"\0" * 8)
    (tmp_path / "plain.nii.gz").write_bytes(plain)
    for name in ("two.nii.gz", "plain.nii.gz"):
        np.testing.assert_array_equal(read_image(tmp_path / name)[0], arr)
