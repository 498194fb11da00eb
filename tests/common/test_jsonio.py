"""Strict JSON records: round trips, schema/version checks, unknown and missing keys, atomicity."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import atomic_write_text, load_record, save_record


@dataclass(frozen=True)
class Inner:
    a: int
    b: tuple[float, ...]


@dataclass(frozen=True)
class Rec:
    SCHEMA: ClassVar[str] = "autoseg.test"
    VERSION: ClassVar[int] = 2
    MIGRATIONS: ClassVar[dict] = {1: lambda d: {**d, "extra": "migrated"}}
    name: str
    inner: Inner
    by_label: dict[int, str]
    maybe: float | None = None
    extra: str = "x"
    items: tuple[Inner, ...] = field(default_factory=tuple)


def test_round_trip(tmp_path: Path) -> None:
    r = Rec("n", Inner(1, (0.5, 2.0)), {1: "one", 2: "two"}, None, "e", (Inner(2, ()),))
    save_record(tmp_path / "r.json", r)
    data = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert data["schema"] == "autoseg.test" and data["schema_version"] == 2
    assert load_record(tmp_path / "r.json", Rec) == r


def test_nan_is_written_as_null_and_read_back_as_nan(tmp_path: Path) -> None:
    """Strict JSON has no NaN: a float field's NaN is null on disk and NaN again when read;
    an optional float keeps null as None."""
    import math

    import numpy as np

    r = Rec("n", Inner(1, (math.nan, 2.0, np.float32("nan"))), {}, None)
    save_record(tmp_path / "r.json", r)
    text = (tmp_path / "r.json").read_text(encoding="utf-8")
    assert "NaN" not in text
    assert json.loads(text)["inner"]["b"] == [None, 2.0, None]
    back = load_record(tmp_path / "r.json", Rec)
    assert math.isnan(back.inner.b[0]) and back.inner.b[1] == 2.0 and math.isnan(back.inner.b[2])
    assert back.maybe is None


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(schema="autoseg.other"), "schema is 'autoseg.other'"),
    (lambda d: d.update(schema_version=3), "newer than this autoseg"),
    (lambda d: d.update(bogus=1), "unknown key"),
    (lambda d: d.pop("name"), "missing key 'name'"),
    (lambda d: d["inner"].update(a="1"), "expected an integer"),
])
def test_strict_reading(tmp_path: Path, mutate, message) -> None:
    r = Rec("n", Inner(1, (0.5,)), {})
    save_record(tmp_path / "r.json", r)
    d = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    mutate(d)
    (tmp_path / "r.json").write_text(json.dumps(d))
    with pytest.raises(AutosegError, match=message) as e:
        load_record(tmp_path / "r.json", Rec)
    assert "r.json" in str(e.value)


def test_named_migration_from_older_version(tmp_path: Path) -> None:
    d = {"schema": "autoseg.test", "schema_version": 1, "name": "old", "inner": {"a": 1, "b": []},
         "by_label": {}}
    (tmp_path / "old.json").write_text(json.dumps(d))
    assert load_record(tmp_path / "old.json", Rec).extra == "migrated"


def test_malformed_json_names_file(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AutosegError, match="bad.json: not valid JSON"):
        load_record(tmp_path / "bad.json", Rec)


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "f.txt", "one")
    atomic_write_text(tmp_path / "f.txt", "two")
    assert (tmp_path / "f.txt").read_text(encoding="utf-8") == "two"
    assert os.listdir(tmp_path) == ["f.txt"]
