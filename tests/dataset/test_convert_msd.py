"""MSD -> nnU-Net v2 conversion: the real Hippocampus task, a generated 4D two-channel task, safety rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from autoseg.cli import cli
from autoseg.common.errors import AutosegError, DatasetError
from autoseg.common.paths import Paths
from autoseg.dataset.convert_msd import convert_msd
from autoseg.dataset.io import read_image
from autoseg.dataset.verify import verify_dataset
from tests.helpers import HIPPOCAMPUS_MISSING, HIPPOCAMPUS_MSD, hippocampus_available

SHAPE_XYZ = (12, 10, 6)
SPACING_XYZ = (0.75, 1.25, 2.5)
ORIGIN_XYZ = (-20.0, 15.5, 3.25)
DIRECTION_3X3 = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def _volume(rng: np.random.Generator, dtype: type = np.float32) -> sitk.Image:
    arr = rng.normal(50, 10, SHAPE_XYZ[::-1]).astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING_XYZ)
    img.SetOrigin(ORIGIN_XYZ)
    img.SetDirection(DIRECTION_3X3)
    return img


def make_msd_task(folder: Path, num_training: int = 3, num_test: int = 1, channels: int = 2) -> Path:
    """An MSD-style task: 4D (x, y, z, c) images when ``channels > 1``, macOS junk files included."""
    rng = np.random.default_rng(0)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True)
    for i in range(num_training + num_test):
        case = f"brain_{i:03d}"
        vols = [_volume(rng) for _ in range(channels)]
        img = sitk.JoinSeries(vols) if channels > 1 else vols[0]
        sub = "imagesTr" if i < num_training else "imagesTs"
        sitk.WriteImage(img, str(folder / sub / f"{case}.nii.gz"))
        (folder / sub / f"._{case}.nii.gz").write_bytes(b"\x00\x05\x16\x07Mac OS X")
        if i < num_training:
            lab = sitk.GetImageFromArray(rng.integers(0, 3, SHAPE_XYZ[::-1]).astype(np.uint8))
            lab.CopyInformation(vols[0])
            sitk.WriteImage(lab, str(folder / "labelsTr" / f"{case}.nii.gz"))
    meta = {"name": "BrainTumour", "description": "generated", "tensorImageSize": "4D",
            "modality": {str(c): m for c, m in zip(range(channels), ("FLAIR", "T1w", "T2w"))},
            "labels": {"0": "background", "1": "edema", "2": "tumour"},
            "numTraining": num_training, "numTest": num_test,
            "training": [{"image": f"./imagesTr/brain_{i:03d}.nii.gz", "label": f"./labelsTr/brain_{i:03d}.nii.gz"}
                         for i in range(num_training)],
            "test": [f"./imagesTs/brain_{i:03d}.nii.gz" for i in range(num_training, num_training + num_test)]}
    (folder / "dataset.json").write_text(json.dumps(meta, indent=4))
    return folder


def test_4d_two_channel_task_is_split_with_geometry_kept(tmp_path: Path, paths: Paths) -> None:
    task = make_msd_task(tmp_path / "Task01_BrainTumour")
    out = convert_msd(task, paths.raw, 1, show_progress=False)
    assert out == paths.raw / "Dataset001_BrainTumour"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [
        f"brain_{i:03d}_{c:04d}.nii.gz" for i in range(3) for c in range(2)]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["brain_003_0000.nii.gz", "brain_003_0001.nii.gz"]
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert {k: meta[k] for k in ("channel_names", "labels", "numTraining", "file_ending", "name")} == {
        "channel_names": {"0": "FLAIR", "1": "T1w"}, "labels": {"background": 0, "edema": 1, "tumour": 2},
        "numTraining": 3, "file_ending": ".nii.gz", "name": "BrainTumour"}
    src = sitk.GetArrayFromImage(sitk.ReadImage(str(task / "imagesTr/brain_001.nii.gz")))  # (c, z, y, x)
    for c in range(2):
        arr, geom = read_image(out / f"imagesTr/brain_001_{c:04d}.nii.gz")
        assert np.array_equal(arr, src[c])
        assert geom.spacing == SPACING_XYZ[::-1] and geom.origin == ORIGIN_XYZ
        np.testing.assert_allclose(geom.direction, DIRECTION_3X3, atol=1e-6)
    assert (out / "labelsTr/brain_002.nii.gz").read_bytes() == (task / "labelsTr/brain_002.nii.gz").read_bytes()
    spec = verify_dataset(out, show_progress=False)
    assert (len(spec.cases), spec.num_channels, len(spec.test_cases)) == (3, 2, 1)
    assert sorted(p.name for p in paths.raw.iterdir()) == ["Dataset001_BrainTumour"]


@pytest.mark.skipif(not hippocampus_available(), reason=HIPPOCAMPUS_MISSING)
def test_real_hippocampus_task_converts_and_verifies(paths: Paths) -> None:
    out = convert_msd(HIPPOCAMPUS_MSD, paths.raw, 4, show_progress=False)
    assert out.name == "Dataset004_Hippocampus"
    spec = verify_dataset(out, num_workers=2, show_progress=False)
    assert (len(spec.cases), spec.num_channels, spec.labels) == (
        260, 1, {"background": 0, "Anterior": 1, "Posterior": 2})
    assert spec.cases[0].images[0].name == "hippocampus_001_0000.nii.gz"
    assert spec.cases[0].images[0].read_bytes() == (HIPPOCAMPUS_MSD / "imagesTr/hippocampus_001.nii.gz").read_bytes()
    assert read_image(out / "labelsTr/hippocampus_003.nii.gz")[0].dtype == np.float32  # real float label, accepted


def test_cli_convert_refuses_overwrite_without_force(tmp_path: Path, paths: Paths) -> None:
    task = make_msd_task(tmp_path / "Task01_BrainTumour", num_training=2, num_test=0)
    runner = CliRunner()
    first = runner.invoke(cli, ["--raw", str(paths.raw), "convert-msd", str(task), "--id", "1", "-j", "2"])
    assert first.exit_code == 0, first.output
    out = paths.raw / "Dataset001_BrainTumour"
    assert first.stdout.strip() == f"{out}: 2 training case(s), 0 test case(s)"
    marker = out / "imagesTr/brain_000_0000.nii.gz"
    stamp = marker.stat().st_mtime_ns
    again = runner.invoke(cli, ["--raw", str(paths.raw), "convert-msd", str(task), "--id", "1"])
    assert again.exit_code == 2
    assert again.stderr.strip() == f"error: {out}: dataset already exists; pass --force to replace it"
    assert marker.stat().st_mtime_ns == stamp
    forced = runner.invoke(cli, ["--raw", str(paths.raw), "convert-msd", str(task), "--id", "1", "--force",
                                 "--name", "Brain"])
    assert forced.exit_code == 2 and "already used by Dataset001_BrainTumour" in forced.stderr
    forced = runner.invoke(cli, ["--raw", str(paths.raw), "convert-msd", str(task), "--id", "1", "--force"])
    assert forced.exit_code == 0, forced.output
    assert sorted(p.name for p in paths.raw.iterdir()) == ["Dataset001_BrainTumour"]


def test_failed_conversion_leaves_nothing_behind(tmp_path: Path, paths: Paths) -> None:
    task = make_msd_task(tmp_path / "Task01_BrainTumour")
    meta = json.loads((task / "dataset.json").read_text(encoding="utf-8"))
    meta["modality"] = {"0": "FLAIR", "1": "T1w", "2": "T2w"}  # the files hold 2 channels
    (task / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="2 channels on its 4th axis but dataset.json 'modality' declares 3") as e:
        convert_msd(task, paths.raw, 1, show_progress=False)
    assert e.value.where == str(task / "imagesTr/brain_000.nii.gz")
    assert list(paths.raw.iterdir()) == []


def test_name_defaults_to_folder_without_task_prefix(tmp_path: Path, paths: Paths) -> None:
    task = make_msd_task(tmp_path / "Task09_Spleen", num_training=2, num_test=0, channels=1)
    meta = json.loads((task / "dataset.json").read_text(encoding="utf-8"))
    del meta["name"]
    (task / "dataset.json").write_text(json.dumps(meta))
    out = convert_msd(task, paths.raw, 9, show_progress=False)
    assert out.name == "Dataset009_Spleen"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["brain_000_0000.nii.gz", "brain_001_0000.nii.gz"]


def test_not_an_msd_folder(tmp_path: Path, paths: Paths) -> None:
    (tmp_path / "Task02_Heart").mkdir()
    with pytest.raises(DatasetError, match="file not found"):
        convert_msd(tmp_path / "Task02_Heart", paths.raw, 2)
    (tmp_path / "Task02_Heart/dataset.json").write_text(json.dumps({"name": "Heart", "labels": {"0": "background"}}))
    with pytest.raises(DatasetError, match="missing MSD key"):
        convert_msd(tmp_path / "Task02_Heart", paths.raw, 2)
    with pytest.raises(AutosegError, match="between 1 and 999"):
        convert_msd(tmp_path / "Task02_Heart", paths.raw, 1000, name="Heart")
