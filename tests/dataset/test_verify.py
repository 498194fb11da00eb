"""verify_dataset: every broken-dataset check, all problems reported at once, the CLI's one-line errors."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from autoseg.cli import cli
from autoseg.common.errors import DatasetError, DatasetErrors
from autoseg.common.paths import Paths
from autoseg.dataset.io import Geometry, read_image, write_image
from autoseg.dataset.spec import load_dataset
from autoseg.dataset.verify import verify_dataset
from tests.dataset.conftest import TINY_GEOMETRY, TINY_NAME, TINY_SHAPE, edit_dataset_json, make_tiny_dataset

IMG0 = "imagesTr/case_000_0000.nii.gz"
LAB0 = "labelsTr/case_000.nii.gz"


def _rewrite(root: Path, rel: str, array: np.ndarray | None = None, **geometry: object) -> None:
    """Rewrite one file with a changed array and/or geometry fields."""
    arr, geom = read_image(root / rel)
    fields = {**geom.__dict__, **geometry}
    if array is not None:
        fields["shape"] = array.shape
        arr = array
    write_image(root / rel, arr, Geometry(**fields))


def _nan_image(root: Path) -> None:
    arr, _ = read_image(root / IMG0)
    arr[1, 2, 3] = np.nan
    arr[1, 2, 4] = np.inf
    _rewrite(root, IMG0, arr)


def _float_label(root: Path, values: np.ndarray) -> None:
    arr, _ = read_image(root / LAB0)
    _rewrite(root, LAB0, arr.astype(np.float32) + values)


def _label_4d(root: Path) -> None:
    arr, _ = read_image(root / LAB0)
    img = sitk.JoinSeries([sitk.GetImageFromArray(arr)] * 2)
    sitk.WriteImage(img, str(root / LAB0))


def _undeclared_label(root: Path) -> None:
    arr, _ = read_image(root / LAB0)
    arr[0, 0, 0] = 5
    _rewrite(root, LAB0, arr)


def _second_channel_shifted(root: Path) -> None:
    arr, geom = read_image(root / IMG0)
    write_image(root / "imagesTr/case_000_0001.nii.gz", arr,
                Geometry(**{**geom.__dict__, "origin": (9.0, 9.0, 9.0)}))


BROKEN: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # name: (break the valid tiny dataset, file the error must name, words the message must hold)
    "missing dataset.json": (lambda r: (r / "dataset.json").unlink(), "dataset.json", "missing dataset.json"),
    "unreadable dataset.json": (lambda r: (r / "dataset.json").write_text("{not json"), "dataset.json",
                                "not valid JSON"),
    "missing required key": (lambda r: edit_dataset_json(r, file_ending=None), "dataset.json", "file_ending"),
    "labels not consecutive": (lambda r: edit_dataset_json(r, labels={"background": 0, "liver": 1, "tumour": 2,
                                                                             "cyst": 4}),
                               "dataset.json", "consecutive"),
    "channel_names not consecutive": (lambda r: edit_dataset_json(r, channel_names={"0": "CT", "2": "MR"}),
                                      "dataset.json", "consecutive channel indices"),
    "numTraining disagrees": (lambda r: edit_dataset_json(r, numTraining=4), "dataset.json",
                              "numTraining is 4 but imagesTr/ holds 3"),
    "unsupported file ending": (lambda r: edit_dataset_json(r, file_ending=".jpg"), "dataset.json",
                                "unsupported file_ending '.jpg'"),
    "missing label": (lambda r: (r / LAB0).unlink(), LAB0, "has no label file"),
    "shape mismatch": (lambda r: _rewrite(r, LAB0, np.zeros((8, 16, 15), np.uint8)), LAB0, "shape"),
    "spacing mismatch": (lambda r: _rewrite(r, LAB0, spacing=(2.0, 0.5, 0.6)), LAB0, "spacing"),
    "origin mismatch": (lambda r: _rewrite(r, LAB0, origin=(1.0, -2.0, 4.0)), LAB0, "origin"),
    "direction mismatch": (lambda r: _rewrite(r, LAB0, direction=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)),
                           LAB0, "direction"),
    "undeclared label value": (_undeclared_label, LAB0, "label value(s) 5 not declared"),
    "non-integer label": (lambda r: _float_label(r, np.float32(0.5)), LAB0, "non-integer"),
    "NaN/Inf in image": (_nan_image, IMG0, "2 NaN/Inf voxel(s)"),
    "4D label": (_label_4d, LAB0, "4D"),
    "corrupt image": (lambda r: (r / IMG0).write_bytes(gzip.compress(b"garbage" * 10)), IMG0, "unreadable image"),
    "empty dataset": (lambda r: [p.unlink() for d in ("imagesTr", "labelsTr") for p in (r / d).iterdir()],
                      "imagesTr", "no training cases"),
    "badly named image": (lambda r: (r / "imagesTr/scan.nii.gz").write_bytes((r / IMG0).read_bytes()),
                          "imagesTr/scan.nii.gz", "must end in _XXXX.nii.gz"),
    "truncated image": (lambda r: _cut_in_half(r / IMG0), IMG0, "truncated image: "),
    "truncated label": (lambda r: _cut_in_half(r / LAB0), LAB0, "truncated image: "),
    "gzip CRC error": (lambda r: _flip_last_data_byte(r / IMG0), IMG0, "corrupt gzip data"),
    "no foreground in any label": (lambda r: [_rewrite(r, str(p.relative_to(r)), np.zeros(TINY_SHAPE, np.uint8))
                                              for p in sorted((r / "labelsTr").iterdir())],
                                   "labelsTr", "no training label contains any foreground class"),
}


def _cut_in_half(path: Path) -> None:
    """What an interrupted copy or download leaves: the first half of the file."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_last_data_byte(path: Path) -> None:
    """Corrupt a .gz's CRC32 trailer: the stream is complete, its data check fails."""
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF
    path.write_bytes(bytes(data))


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("problem", sorted(BROKEN))
def test_cli_reports_each_problem_in_one_line_naming_the_file(paths: Paths, problem: str) -> None:
    root = make_tiny_dataset(paths.raw)
    breaker, where, words = BROKEN[problem]
    breaker(root)
    before = _snapshot(paths.raw.parent)
    result = CliRunner().invoke(cli, ["--raw", str(paths.raw), "verify", TINY_NAME])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"error: {root / where}: ")
    assert words in errors[0]
    assert "Traceback" not in result.output
    assert _snapshot(paths.raw.parent) == before  # verify writes nothing


def test_missing_channel_file_of_a_two_channel_dataset(paths: Paths) -> None:
    root = make_tiny_dataset(paths.raw, num_channels=2)
    (root / "imagesTr/case_001_0001.nii.gz").unlink()
    with pytest.raises(DatasetErrors) as info:
        verify_dataset(root, show_progress=False)
    assert [str(e) for e in info.value.errors] == [
        f"{root / 'imagesTr'}: case 'case_001' is missing channel file(s) case_001_0001.nii.gz"]


def test_channels_with_different_geometry(paths: Paths) -> None:
    root = make_tiny_dataset(paths.raw, num_channels=2)
    _second_channel_shifted(root)
    with pytest.raises(DatasetErrors) as info:
        verify_dataset(root, show_progress=False)
    (err,) = info.value.errors
    assert err.where == str(root / "imagesTr/case_000_0001.nii.gz")
    assert "channel geometry differs from case_000_0000.nii.gz: origin" in err.message


def test_all_problems_are_reported_together_and_load_dataset_stops_at_the_first(paths: Paths) -> None:
    root = make_tiny_dataset(paths.raw)
    edit_dataset_json(root, numTraining=7)
    _nan_image(root)
    _undeclared_label(root)
    (root / "labelsTr/case_002.nii.gz").unlink()
    with pytest.raises(DatasetErrors) as info:
        verify_dataset(root, show_progress=False)
    wheres = sorted(e.where for e in info.value.errors)
    assert wheres == sorted([str(root / "dataset.json"), str(root / IMG0), str(root / LAB0),
                             str(root / "labelsTr/case_002.nii.gz")])
    with pytest.raises(DatasetError) as first:
        load_dataset(root)
    assert not isinstance(first.value, DatasetErrors)
    assert first.value.where == str(root / "labelsTr/case_002.nii.gz")


def test_several_dataset_json_problems_are_all_listed(paths: Paths) -> None:
    root = make_tiny_dataset(paths.raw)
    edit_dataset_json(root, numTraining="three", labels={"background": 0, "liver": 1, "tumour": 2, "cyst": 5})
    with pytest.raises(DatasetErrors) as info:
        verify_dataset(root, show_progress=False)
    messages = " | ".join(e.message for e in info.value.errors)
    assert len(info.value.errors) == 2
    assert "'numTraining' must be an integer" in messages and "consecutive" in messages


def test_float_labels_with_integral_values_are_accepted(paths: Paths) -> None:
    root = make_tiny_dataset(paths.raw)
    _float_label(root, np.float32(0.0))
    assert read_image(root / LAB0)[0].dtype == np.float32
    spec = verify_dataset(root, show_progress=False)
    assert [c.case_id for c in spec.cases] == ["case_000", "case_001", "case_002"]


def test_mixed_2d_and_3d_cases_are_reported(paths: Paths) -> None:
    root = make_tiny_dataset(paths.raw)
    g2 = Geometry(shape=(1, 16, 16), spacing=(999.0, 0.5, 0.5), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0),
                  file_ndim=2)
    write_image(root / "imagesTr/case_002_0000.nii.gz", np.ones((1, 16, 16), np.float32), g2)
    write_image(root / "labelsTr/case_002.nii.gz", np.ones((1, 16, 16), np.uint8), g2)
    with pytest.raises(DatasetErrors) as info:
        verify_dataset(root, show_progress=False)
    assert [e.message for e in info.value.errors] == [
        "cases mix 2D and 3D images; 1 case(s) are 2D, e.g. 'case_002'"]


def test_junk_files_are_ignored_and_test_images_are_read(paths: Paths) -> None:
    root = make_tiny_dataset(paths.raw)
    (root / "imagesTr/._case_000_0000.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    write_image(root / "imagesTs/extra_0000.nii.gz", np.zeros(TINY_SHAPE, np.float32), TINY_GEOMETRY)
    spec = verify_dataset(root, show_progress=False)
    assert [c.case_id for c in spec.test_cases] == ["extra"]
    (root / "imagesTs/extra_0000.nii.gz").write_bytes(b"not an image")
    with pytest.raises(DatasetErrors) as info:
        verify_dataset(root, show_progress=False)
    assert [e.where for e in info.value.errors] == [str(root / "imagesTs/extra_0000.nii.gz")]


def test_parallel_verification_finds_the_same_problems(paths: Paths) -> None:
    root = make_tiny_dataset(paths.raw, num_cases=5)
    _nan_image(root)
    _rewrite(root, "labelsTr/case_004.nii.gz", spacing=(3.0, 0.5, 0.5))
    found = []
    for workers in (1, 2):
        with pytest.raises(DatasetErrors) as info:
            verify_dataset(root, num_workers=workers, show_progress=False)
        found.append([str(e) for e in info.value.errors])
    assert found[0] == found[1] and len(found[0]) == 2


def test_cli_ok_summary_by_id(paths: Paths, tiny: Path) -> None:
    result = CliRunner().invoke(cli, ["--raw", str(paths.raw), "verify", "10"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == ("OK Dataset010_Tiny: 3 training case(s), 0 test case(s), 1 channel(s) (CT), "
                                     "3 labels (0=background, 1=liver, 2=tumour)")


def test_cli_unknown_dataset_is_a_one_line_error(paths: Paths, tiny: Path) -> None:
    result = CliRunner().invoke(cli, ["--raw", str(paths.raw), "verify", "11"])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: no dataset with id 011")


def test_real_hippocampus_cases_verify(hippocampus_small: Paths) -> None:
    spec = verify_dataset(hippocampus_small.raw / "Dataset004_Hippocampus", show_progress=False)
    assert (len(spec.cases), spec.num_channels, spec.num_classes) == (12, 1, 3)


def test_nan_in_an_nrrd_dataset_is_reported(paths: Paths) -> None:
    root = make_tiny_dataset(paths.raw, ending=".nrrd")
    rel = "imagesTr/case_001_0000.nrrd"
    arr, geom = read_image(root / rel)
    arr[0, 0, 0] = np.nan
    write_image(root / rel, arr, geom)
    with pytest.raises(DatasetErrors) as info:
        verify_dataset(root, show_progress=False)
    assert [str(e) for e in info.value.errors] == [f"{root / rel}: image holds 1 NaN/Inf voxel(s)"]


def test_truncated_uncompressed_nifti_is_reported(paths: Paths) -> None:
    root = make_tiny_dataset(paths.raw, ending=".nii")
    rel = "imagesTr/case_001_0000.nii"
    size = (root / rel).stat().st_size
    _cut_in_half(root / rel)
    with pytest.raises(DatasetErrors) as info:
        verify_dataset(root, show_progress=False)
    assert [str(e) for e in info.value.errors] == [f"{root / rel}: truncated image: {size // 2} of {size} bytes"]


def test_nifti_check_survives_a_file_cut_after_read_image(paths: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the completeness check, the NaN count's gzip read hits EOF: still one line, not an EOFError."""
    root = make_tiny_dataset(paths.raw)
    _cut_in_half(root / IMG0)
    monkeypatch.setattr("autoseg.dataset.io.check_nifti_complete", lambda path: None)
    with pytest.raises(DatasetErrors) as info:
        verify_dataset(root, show_progress=False)
    (err,) = info.value.errors
    assert err.where == str(root / IMG0) and "EOFError" in err.message


def test_some_cases_without_foreground_are_valid(paths: Paths) -> None:
    root = make_tiny_dataset(paths.raw)
    _rewrite(root, LAB0, np.zeros(TINY_SHAPE, np.uint8))
    _rewrite(root, "labelsTr/case_001.nii.gz", np.zeros(TINY_SHAPE, np.uint8))
    assert len(verify_dataset(root, show_progress=False).cases) == 3


def test_labels_of_only_background_and_ignore_have_no_foreground(paths: Paths) -> None:
    root = make_tiny_dataset(paths.raw)
    edit_dataset_json(root, labels={"background": 0, "liver": 1, "tumour": 2, "ignore": 3})
    for p in sorted((root / "labelsTr").iterdir()):
        lab = np.zeros(TINY_SHAPE, np.uint8)
        lab[:2] = 3
        _rewrite(root, str(p.relative_to(root)), lab)
    with pytest.raises(DatasetErrors) as info:
        verify_dataset(root, show_progress=False)
    assert [str(e) for e in info.value.errors] == [
        f"{root / 'labelsTr'}: no training label contains any foreground class (every voxel is background or "
        "ignore); nothing to train on"]


def test_stray_files_are_ignored_with_one_warning(paths: Paths, caplog: pytest.LogCaptureFixture) -> None:
    root = make_tiny_dataset(paths.raw)
    (root / "labelsTr/case_001.nii.gz.bak").write_bytes((root / LAB0).read_bytes())
    (root / "labelsTr/case_001.nrrd").write_bytes(b"x")
    (root / "imagesTr/README.txt").write_text("scanned in 2019")
    (root / "imagesTr/.DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "labelsTr/notes.txt").write_text("x")
    with caplog.at_level("WARNING"):
        spec = verify_dataset(root, show_progress=False)
        assert load_dataset(root).cases == spec.cases
    assert [c.case_id for c in spec.cases] == ["case_000", "case_001", "case_002"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2  # once per scan (verify, then load_dataset), one line each
    assert warnings[0] == (f"{root}: ignoring 4 file(s) not ending in '.nii.gz' (as nnU-Net does): "
                           "imagesTr/README.txt, labelsTr/case_001.nii.gz.bak, labelsTr/case_001.nrrd and 1 more")
    caplog.clear()
    with caplog.at_level("WARNING"):
        result = CliRunner().invoke(cli, ["--raw", str(paths.raw), "verify", TINY_NAME])
    assert result.exit_code == 0, result.output
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == warnings[:1]


TRUNCATED_CASES = [(".nii.gz", "imagesTr/case_001_0000.nii.gz"), (".nii", "labelsTr/case_002.nii")]


@pytest.mark.parametrize("ending,rel", TRUNCATED_CASES)
@pytest.mark.parametrize("command", ["verify", "plan"])
def test_cli_truncated_nifti_is_one_line_not_aborted(paths: Paths, ending: str, rel: str, command: str) -> None:
    root = make_tiny_dataset(paths.raw, ending=ending)
    _cut_in_half(root / rel)
    args = ["--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed), command, TINY_NAME]
    result = CliRunner().invoke(cli, args + (["--gpu-memory", "8"] if command == "plan" else []))
    assert result.exit_code == 2, result.output
    assert "Aborted" not in result.output and "Traceback" not in result.output
    assert result.stderr.splitlines()[-1].startswith(f"error: {root / rel}: truncated image: ")
    assert not list(paths.preprocessed.rglob("*.json"))


@pytest.mark.parametrize("ending,rel", TRUNCATED_CASES)
def test_fingerprint_refuses_a_truncated_nifti(paths: Paths, ending: str, rel: str) -> None:
    from autoseg.fingerprint import extract_fingerprint

    root = make_tiny_dataset(paths.raw, ending=ending)
    _cut_in_half(root / rel)
    with pytest.raises(DatasetError, match="truncated image") as info:
        extract_fingerprint(load_dataset(root))
    assert info.value.where == str(root / rel)


def test_cli_eof_error_is_one_line_not_aborted(paths: Paths, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An EOFError that escapes a file read must not become click's Ctrl-D message, 'Aborted!'."""
    def cut_short(*args: object, **kwargs: object) -> None:
        raise EOFError("Compressed file ended before the end-of-stream marker was reached")

    monkeypatch.setattr("autoseg.cli.dataset.verify_dataset", cut_short)
    result = CliRunner().invoke(cli, ["--raw", str(paths.raw), "verify", TINY_NAME])
    assert result.exit_code == 2
    assert result.stderr == ("error: a file ended before its end-of-data marker (Compressed file ended before "
                             "the end-of-stream marker was reached)\n")
