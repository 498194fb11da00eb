"""install-model's caps (issue 24): refused from the declared sizes, before a byte is written."""

from __future__ import annotations

import hashlib
import json
import struct
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import autoseg.cli
import autoseg.infer.unpack_limits as unpack_limits
from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import record_to_dict
from autoseg.common.paths import Paths
from autoseg.common.sizes import format_size, parse_size
from autoseg.infer.exchange import MANIFEST_FILE, ManifestFile, ModelManifest, install_model
from autoseg.infer.unpack_limits import UnpackLimits

DATASET = "Dataset998_Bomb"
ZEROS = f"{DATASET}/3d_fullres/default/fold_0/checkpoint_final.pt"


def _model_zip(path: Path, members: dict[str, bytes], manifest_sizes: dict[str, int] | None = None) -> Path:
    """A model zip of ``members`` (paths under the dataset folder) whose manifest lists them."""
    files = tuple(ManifestFile(name.split("/", 1)[1], (manifest_sizes or {}).get(name, len(data)),
                               hashlib.sha256(data).hexdigest()) for name, data in members.items())
    manifest = ModelManifest("0", DATASET, ("3d_fullres",), (0,), "default", "final", files)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{DATASET}/{MANIFEST_FILE}", json.dumps(record_to_dict(manifest)))
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _cli(results: Path, *args: str):
    return CliRunner().invoke(autoseg.cli.cli, ["--results", str(results), "install-model", *args])


def _nothing_written(results: Path) -> bool:
    return not results.exists() or not any(results.iterdir())


def test_parse_size():
    assert parse_size("8GB") == 8 * 10**9 and parse_size("500MiB") == 500 * 2**20
    assert parse_size("1.5gib") == 3 * 2**29 and parse_size("123") == 123 and parse_size("2 K") == 2000
    assert format_size(5 * 2**30) == "5.0 GiB" and format_size(10) == "10 B"
    for bad in ("", "GB", "8 parsecs", "-1GB", "1e9"):
        with pytest.raises(AutosegError, match="not a size"):
            parse_size(bad)


def test_high_ratio_member_is_refused_before_anything_is_written(tmp_path):
    bomb = _model_zip(tmp_path / "bomb.zip", {ZEROS: bytes(8 << 20)})  # 8 MiB of zeros deflate to ~8 KiB
    assert bomb.stat().st_size < 100_000
    r = _cli(tmp_path / "results", str(bomb))
    assert r.exit_code == 2 and repr(ZEROS) in r.output and "expands" in r.output and "8.0 MiB" in r.output
    assert len(r.output.strip().splitlines()) == 1 and _nothing_written(tmp_path / "results")
    r = _cli(tmp_path / "results", str(bomb), "--allow-high-ratio")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "results" / ZEROS).stat().st_size == 8 << 20


def test_total_above_max_size_is_refused(tmp_path):
    model = _model_zip(tmp_path / "m.zip", {ZEROS: bytes(range(256)) * 64})
    r = _cli(tmp_path / "results", str(model), "--max-size", "4KiB")
    assert r.exit_code == 2 and "above the 4.0 KiB limit" in r.output and repr(ZEROS) in r.output
    assert _nothing_written(tmp_path / "results")
    r = _cli(tmp_path / "results", str(model), "--max-size", "lots")
    assert r.exit_code == 2 and "--max-size" in r.output and "not a size" in r.output
    assert _cli(tmp_path / "results", str(model), "--max-size", "1MB").exit_code == 0


def test_not_enough_free_space_is_refused(tmp_path, monkeypatch):
    model = _model_zip(tmp_path / "m.zip", {ZEROS: b"w" * 1000})
    monkeypatch.setattr(unpack_limits, "free_bytes", lambda folder: 32 << 20)  # under the 64 MiB margin
    with pytest.raises(AutosegError, match="32.0 MiB free"):
        install_model(Paths(tmp_path / "raw", tmp_path / "pre", tmp_path / "results"), model)
    assert _nothing_written(tmp_path / "results")


def test_manifest_understating_a_member_is_refused_before_hashing(tmp_path):
    data = bytes(range(256)) * 40
    lying = _model_zip(tmp_path / "lie.zip", {ZEROS: data}, manifest_sizes={ZEROS: 100})
    r = _cli(tmp_path / "results", str(lying))
    assert r.exit_code == 2 and repr(ZEROS) in r.output and "manifest 100 bytes" in r.output
    assert f"zip {len(data)}" in r.output and _nothing_written(tmp_path / "results")


def _patch_declared_size(path: Path, member: str, size: int) -> None:
    """Make the zip's local and central headers declare ``size`` bytes for ``member`` (a lying zip)."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        local = zf.getinfo(member).header_offset
    struct.pack_into("<I", raw, local + 22, size)
    central = raw.index(b"PK\x01\x02")  # first central directory entry; walk to ours by name
    while raw[central + 46:central + 46 + len(member)] != member.encode():
        central = raw.index(b"PK\x01\x02", central + 4)
    struct.pack_into("<I", raw, central + 24, size)
    path.write_bytes(bytes(raw))


def test_member_longer_than_its_declared_size_is_never_read_past_it(tmp_path):
    data = bytes(range(256)) * 40
    lying = _model_zip(tmp_path / "lie.zip", {ZEROS: data}, manifest_sizes={ZEROS: 1000})
    _patch_declared_size(lying, ZEROS, 1000)  # zip and manifest agree on 1000; the data holds 10240
    with zipfile.ZipFile(lying) as zf:
        assert zf.getinfo(ZEROS).file_size == 1000
    r = _cli(tmp_path / "results", str(lying))
    assert r.exit_code == 2 and ZEROS in r.output and "Bad CRC" in r.output
    assert _nothing_written(tmp_path / "results")


def test_limits_default():
    assert UnpackLimits().max_size == 4 * 2**30 and UnpackLimits().max_ratio == 100
