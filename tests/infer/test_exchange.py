"""export-model / install-model / predict -m: a model trained here predicts the same elsewhere, without raw data."""

from __future__ import annotations

import json
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import autoseg.cli
from autoseg.common.jsonio import load_record
from autoseg.common.paths import Paths
from autoseg.infer.exchange import ModelManifest, sha256_of
from tests.helpers import run_cli_ok
from tests.infer.conftest import link_inputs

DATASET = "Dataset999_Phantom"
TINY = ["epochs=2", "iterations_per_epoch=2", "val_iterations=1", "batch_size=2", "num_workers=0"]


def _cli(paths: Paths, *args: str):
    return CliRunner().invoke(autoseg.cli.cli, ["--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed),
                                                "--results", str(paths.results), *args])


def _fresh(root: Path) -> Paths:
    """Roots with no raw or preprocessed data at all (they do not even exist)."""
    return Paths(raw=root / "no_raw", preprocessed=root / "no_pre", results=root / "results")


def _masks(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.nii.gz"))}


def _probabilities(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for p in sorted(folder.glob("*.npz")):
        with np.load(p) as z:
            out[p.stem] = z["probabilities"]
    return out


@pytest.fixture(scope="module")
def trained(phantom_small: Paths, tmp_path_factory: pytest.TempPathFactory):
    """A phantom 3d_fullres fold trained for 2 tiny epochs, validated, find-best run, and its predictions."""
    root = tmp_path_factory.mktemp("exchange")
    paths = Paths(raw=phantom_small.raw, preprocessed=root / "pre", results=root / "res")
    run_cli_ok(paths, "plan", "999", "--configs", "3d_fullres", "--set", "3d_fullres.patch_size=8,32,32")
    run_cli_ok(paths, "preprocess", "999", "--configs", "3d_fullres")
    run_cli_ok(paths, "train", "999", "3d_fullres", "0", "--quiet", "--device", "cpu",
               *[a for kv in TINY for a in ("--set", kv)])
    run_cli_ok(paths, "find-best", "999")
    inputs = link_inputs(sorted((paths.raw / DATASET / "imagesTs").iterdir()), root / "inputs")
    reference = root / "pred_original"
    run_cli_ok(paths, "predict", "-d", "999", "-c", "3d_fullres", "-f", "0", "-i", str(inputs), "-o", str(reference),
               "--device", "cpu", "--no-tta", "--save-probabilities")
    zip_path = root / "model.zip"
    out = run_cli_ok(paths, "export-model", "999", "-c", "3d_fullres", "-f", "0", "-o", str(zip_path))
    assert "best.json" in out
    return paths, inputs, reference, zip_path


def test_export_manifest_and_weights_only_checkpoints(trained, tmp_path):
    paths, _, _, zip_path = trained
    with zipfile.ZipFile(zip_path) as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read(f"{DATASET}/manifest.json"))
        zf.extractall(tmp_path)
    m = load_record(tmp_path / DATASET / "manifest.json", ModelManifest)
    assert manifest["schema"] == "autoseg.model_manifest" and m.dataset == DATASET
    assert m.configs == ("3d_fullres",) and m.folds == (0,) and m.checkpoint == "final" and m.has_best
    listed = {f.path for f in m.files}
    assert {"dataset.json", "plans.json", "best.json", "3d_fullres/default/fold_0/checkpoint_final.pt",
            "3d_fullres/default/fold_0/trainer_config.json"} <= listed
    assert names == {f"{DATASET}/{p}" for p in listed | {"manifest.json"}}
    for f in m.files:  # sizes and hashes are those of the files
        p = tmp_path / DATASET / f.path
        assert p.stat().st_size == f.size and sha256_of(p) == f.sha256
    raw_json = (paths.raw / DATASET / "dataset.json").read_bytes()
    assert (tmp_path / DATASET / "dataset.json").read_bytes() == raw_json
    # weights only: same weights, no optimizer state; loads with weights_only=True
    ck = "3d_fullres/default/fold_0/checkpoint_final.pt"
    slim = torch.load(tmp_path / DATASET / ck, weights_only=True)
    full = torch.load(paths.results / DATASET / ck, weights_only=True)
    assert slim["optimizer_state"] == {} and full["optimizer_state"]
    assert slim["model_state"].keys() == full["model_state"].keys()
    assert all(torch.equal(slim["model_state"][k], full["model_state"][k]) for k in full["model_state"])
    # an existing zip is not overwritten without --force
    r = _cli(paths, "export-model", "999", "-c", "3d_fullres", "-f", "0", "-o", str(zip_path))
    assert r.exit_code == 2 and "--force" in r.output


def test_export_names_missing_fold_and_config(trained, tmp_path):
    paths = trained[0]
    r = _cli(paths, "export-model", "999", "-c", "3d_fullres", "-f", "0", "3", "-o", str(tmp_path / "m.zip"))
    assert r.exit_code == 2 and "fold_3" in r.output and "fold 3" in r.output
    r = _cli(paths, "export-model", "999", "-c", "2d", "-f", "0", "-o", str(tmp_path / "m.zip"))
    assert r.exit_code == 2 and str(paths.results / DATASET / "2d" / "default") in r.output
    assert not (tmp_path / "m.zip").exists()


def test_install_then_predict_without_raw_data_matches_original(trained, tmp_path):
    _, inputs, reference, zip_path = trained
    fresh = _fresh(tmp_path)
    out = run_cli_ok(fresh, "install-model", str(zip_path))
    installed = fresh.results / DATASET
    assert str(installed) in out and (installed / "3d_fullres/default/fold_0/checkpoint_final.pt").is_file()
    assert not fresh.raw.exists() and not fresh.preprocessed.exists()
    assert [p.name for p in fresh.results.iterdir()] == [DATASET]  # no temp folder left
    expected = _masks(reference)
    assert len(expected) == 2
    for name, args in (("by_d", ["-d", "999", "-c", "3d_fullres", "-f", "0"]),
                       ("by_m", ["-m", str(installed), "-c", "3d_fullres", "-f", "0"])):
        run_cli_ok(fresh, "predict", *args, "-i", str(inputs), "-o", str(tmp_path / name), "--device", "cpu",
                   "--no-tta", "--save-probabilities")
        assert _masks(tmp_path / name) == expected, name
        got, want = _probabilities(tmp_path / name), _probabilities(reference)
        assert got.keys() == want.keys() and len(want) == 2
        assert all(np.array_equal(got[k], want[k]) for k in want), name
    # -m without -c/-f: find-best's choice (and postprocessing) from best.json, same as --best on the original
    run_cli_ok(fresh, "predict", "-m", str(installed), "-i", str(inputs), "-o", str(tmp_path / "m_best"),
               "--device", "cpu", "--no-tta")
    run_cli_ok(trained[0], "predict", "--best", str(trained[0].results / DATASET / "best.json"), "-i", str(inputs),
               "-o", str(tmp_path / "orig_best"), "--device", "cpu", "--no-tta")
    assert _masks(tmp_path / "m_best") == _masks(tmp_path / "orig_best") and _masks(tmp_path / "m_best")


def test_predict_m_with_unzipped_export(trained, tmp_path):
    _, inputs, reference, zip_path = trained
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(tmp_path / "unzipped")
    (tmp_path / "unzipped" / DATASET / "best.json").unlink()  # then the manifest's configs and folds apply
    fresh = _fresh(tmp_path)
    run_cli_ok(fresh, "predict", "-m", str(tmp_path / "unzipped"), "-i", str(inputs), "-o", str(tmp_path / "o"),
               "--device", "cpu", "--no-tta")
    assert _masks(tmp_path / "o") == _masks(reference)


def test_install_twice_needs_force(trained, tmp_path):
    zip_path = trained[3]
    fresh = _fresh(tmp_path)
    run_cli_ok(fresh, "install-model", str(zip_path))
    marker = fresh.results / DATASET / "local_note.txt"
    marker.write_text("mine")
    r = _cli(fresh, "install-model", str(zip_path))
    assert r.exit_code == 2 and "--force" in r.output and marker.is_file()
    run_cli_ok(fresh, "install-model", str(zip_path), "--force")
    assert not marker.exists() and (fresh.results / DATASET / "manifest.json").is_file()
    assert sorted(p.name for p in fresh.results.iterdir()) == [DATASET]


def _rezip(src: Path, dest: Path, change: dict[str, bytes] | None = None, extra: list[zipfile.ZipInfo] | None = None,
           extra_data: bytes = b"x") -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, (change or {}).get(info.filename, zin.read(info.filename)))
        for info in extra or []:
            zout.writestr(info, extra_data)
    return dest


def test_tampered_file_is_named_and_nothing_installed(trained, tmp_path):
    zip_path = trained[3]
    member = f"{DATASET}/3d_fullres/default/fold_0/trainer_config.json"
    with zipfile.ZipFile(zip_path) as zf:
        text = zf.read(member).replace(b'"seed"', b'"seed" ')
    bad = _rezip(zip_path, tmp_path / "bad.zip", {member: text})
    fresh = _fresh(tmp_path)
    r = _cli(fresh, "install-model", str(bad))
    assert r.exit_code == 2 and member in r.output and "checksum" in r.output
    assert not fresh.results.exists() or not any(fresh.results.iterdir())


@pytest.mark.parametrize("name", ["../evil.txt", f"{DATASET}/../../evil.txt", "/tmp/evil_autoseg.txt", "Other/x"])
def test_escaping_members_are_refused(trained, tmp_path, name):
    bad = _rezip(trained[3], tmp_path / "bad.zip", extra=[zipfile.ZipInfo(name)])
    fresh = _fresh(tmp_path / "r")
    r = _cli(fresh, "install-model", str(bad))
    assert r.exit_code == 2 and "refused" in r.output and repr(name) in r.output
    assert not fresh.results.exists() or not any(fresh.results.iterdir())
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "r" / "evil.txt").exists()


def test_symlink_member_is_refused(trained, tmp_path):
    link = zipfile.ZipInfo(f"{DATASET}/link")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    bad = _rezip(trained[3], tmp_path / "bad.zip", extra=[link], extra_data=b"/etc/passwd")
    fresh = _fresh(tmp_path)
    r = _cli(fresh, "install-model", str(bad))
    assert r.exit_code == 2 and "symbolic link" in r.output
    assert not fresh.results.exists() or not any(fresh.results.iterdir())


def test_predict_m_refuses_other_dataset_and_bad_folder(trained, tmp_path):
    _, inputs, _, zip_path = trained
    fresh = _fresh(tmp_path)
    run_cli_ok(fresh, "install-model", str(zip_path))
    r = _cli(fresh, "predict", "-m", str(fresh.results / DATASET), "-d", "Dataset004_Hippocampus", "-i", str(inputs),
             "-o", str(tmp_path / "o"))
    assert r.exit_code == 2 and DATASET in r.output
    (tmp_path / "empty").mkdir()
    r = _cli(fresh, "predict", "-m", str(tmp_path / "empty"), "-i", str(inputs), "-o", str(tmp_path / "o"))
    assert r.exit_code == 2 and "not a model folder" in r.output


def test_install_never_replaces_training_results(trained, tmp_path):
    """A results/<dataset>/ without a manifest is someone's trainings: refused even with --force, left as is."""
    fresh = _fresh(tmp_path)
    fold = fresh.results / DATASET / "3d_fullres" / "default" / "fold_0"
    fold.mkdir(parents=True)
    (fold / "checkpoint_final.pt").write_bytes(b"my own training")
    for extra in ((), ("--force",)):
        r = _cli(fresh, "install-model", str(trained[3]), *extra)
        assert r.exit_code == 2 and "training results" in r.output and str(fresh.results / DATASET) in r.output
    assert (fold / "checkpoint_final.pt").read_bytes() == b"my own training"
    assert sorted(p.name for p in fresh.results.iterdir()) == [DATASET]


def _as_preset(trained_paths: Paths, root: Path, preset: str) -> Paths:
    """The trained fold re-filed as if trained with a plans preset: results/<ds>/<preset>__3d_fullres/ and
    preprocessed/<ds>/plans_<preset>.json (no training needed to test what export carries)."""
    import shutil

    paths = Paths(raw=trained_paths.raw, preprocessed=root / "pre", results=root / "res")
    shutil.copytree(trained_paths.results / DATASET / "3d_fullres",
                    paths.results / DATASET / f"{preset}__3d_fullres")
    paths.plans_file(DATASET, preset).parent.mkdir(parents=True)
    shutil.copyfile(trained_paths.plans_file(DATASET), paths.plans_file(DATASET, preset))
    return paths


def test_preset_model_carries_its_plans_file(trained, tmp_path):
    original, inputs, reference, _ = trained
    paths = _as_preset(original, tmp_path / "src", "resenc-m")
    r = _cli(paths, "export-model", "999", "-c", "3d_fullres", "-f", "0", "-o", str(tmp_path / "m.zip"))
    assert r.exit_code == 2 and str(paths.results / DATASET / "3d_fullres" / "default") in r.output
    zip_path = tmp_path / "preset.zip"
    run_cli_ok(paths, "export-model", "999", "-c", "3d_fullres", "-f", "0", "--plans", "resenc-m", "-o", str(zip_path))
    with zipfile.ZipFile(zip_path) as zf:
        manifest = json.loads(zf.read(f"{DATASET}/manifest.json"))
        plans_bytes = zf.read(f"{DATASET}/plans_resenc-m.json")
        names = set(zf.namelist())
    assert manifest["configs"] == ["resenc-m__3d_fullres"] and plans_bytes == paths.plans_file(
        DATASET, "resenc-m").read_bytes()
    assert f"{DATASET}/plans.json" not in names
    assert f"{DATASET}/resenc-m__3d_fullres/default/fold_0/checkpoint_final.pt" in names
    fresh = _fresh(tmp_path / "dest")
    run_cli_ok(fresh, "install-model", str(zip_path))
    expected = _masks(reference)
    for name, args in (("by_m", ["-m", str(fresh.results / DATASET)]),
                       ("by_d", ["-d", "999", "-c", "3d_fullres", "--plans", "resenc-m", "-f", "0"])):
        run_cli_ok(fresh, "predict", *args, "-i", str(inputs), "-o", str(tmp_path / name), "--device", "cpu",
                   "--no-tta")
        assert _masks(tmp_path / name) == expected, name


def test_manifest_with_escaping_folder_names_is_refused(trained, tmp_path):
    """The manifest's configuration names become paths when predicting: '..' or '/' in them is refused."""
    zip_path = trained[3]
    member = f"{DATASET}/manifest.json"
    with zipfile.ZipFile(zip_path) as zf:
        manifest = json.loads(zf.read(member))
    manifest["configs"] = ["../../elsewhere"]
    bad = _rezip(zip_path, tmp_path / "bad.zip", {member: json.dumps(manifest).encode()})
    fresh = _fresh(tmp_path)
    r = _cli(fresh, "install-model", str(bad))
    assert r.exit_code == 2 and "'../../elsewhere'" in r.output and "manifest.json" in r.output
    assert not fresh.results.exists() or not any(fresh.results.iterdir())


def test_predict_m_applies_the_models_postprocessing(trained, tmp_path):
    """best.json's postprocessing runs on predict -m: masks equal the plain prediction postprocessed."""
    from autoseg.dataset.io import read_image
    from autoseg.evaluate.postprocess import PostprocessingRules, apply_postprocessing

    _, inputs, reference, zip_path = trained
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(tmp_path / "unzipped")
    best_path = tmp_path / "unzipped" / DATASET / "best.json"
    best = json.loads(best_path.read_text())
    best["postprocessing"] = {"keep_largest_foreground": True, "keep_largest_classes": [1, 2]}
    best_path.write_text(json.dumps(best))
    fresh = _fresh(tmp_path)
    run_cli_ok(fresh, "predict", "-m", str(tmp_path / "unzipped" / DATASET), "-i", str(inputs),
               "-o", str(tmp_path / "o"), "--device", "cpu", "--no-tta")
    rules = PostprocessingRules(keep_largest_foreground=True, keep_largest_classes=(1, 2))
    names = sorted(_masks(reference))
    assert names and names == sorted(_masks(tmp_path / "o"))
    changed = 0
    for name in names:
        plain = read_image(reference / name)[0]
        got = read_image(tmp_path / "o" / name)[0]
        assert np.array_equal(got, apply_postprocessing(plain, rules)), name
        changed += not np.array_equal(got, plain)
    assert changed  # two tiny epochs leave stray components, so the rules really ran
