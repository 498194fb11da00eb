"""Atomic writes and strict JSON records for frozen dataclasses.

Every persisted artifact (fingerprint, plan, split, trainer config, job record, summary) is
one dataclass written as JSON that starts with ``"schema"`` and ``"schema_version"``.
Reading is strict: a wrong schema, a newer version, an unknown key or a missing key is an
`AutosegError` naming the file, never a silent guess. Writes go to a unique temporary file
in the same directory followed by ``os.replace``, so a killed process never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import json
import math
import os
import tempfile
import types
import typing
from pathlib import Path
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar, Union

from autoseg.common.errors import AutosegError

T = TypeVar("T")

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
"""``No space left on device`` and ``Disk quota exceeded``: both mean "free space and rerun"."""


def disk_full_cause(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT `OSError` behind ``exc``: itself or one in its ``__cause__``/``__context__`` chain.

    Writers wrap it (``torch.save`` turns it into a RuntimeError "unexpected pos ..."), so the
    errno is looked for along the whole chain; the first one that names a file wins.
    """
    found: list[OSError] = []
    todo, seen = [exc], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            found.append(e)
        todo += [e.__cause__, e.__context__]
    return next((e for e in found if e.filename), found[0] if found else None)


def disk_full_at(path: str | os.PathLike[str], exc: BaseException) -> OSError | None:
    """``exc``'s disk-full error re-made to name ``path`` (the file being written), or None if not disk full."""
    full = disk_full_cause(exc)
    if full is None:
        return None
    return OSError(full.errno, os.strerror(full.errno), str(path))


def atomic_write_with(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Let ``write`` fill a unique temp file in ``path``'s folder, fsync it, then ``os.replace``.

    For writers that stream (``torch.save``, ``np.save``); the temp file is removed on failure,
    so a full disk leaves ``path`` as it was. That failure is re-raised as an `OSError`
    (ENOSPC/EDQUOT) naming ``path``: the errors of streaming writers name no file, or the temp one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = None
        if isinstance(e, Exception):
            full = disk_full_at(path, e)
            if full is None and _short_write_on_a_full_disk(e, path.parent):
                full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        Path(tmp).unlink(missing_ok=True)
        if full is not None:
            raise full from e
        raise
    return path


SHORT_WRITE_FREE_BYTES = 64 * 1024
"""A write that stopped short with this little room left on its filesystem ran out of disk."""


def _short_write_on_a_full_disk(exc: Exception, folder: Path) -> bool:
    """numpy's ``tofile`` reports a full disk as ``OSError("N requested and M written")``, with no errno."""
    if not (isinstance(exc, OSError) and exc.errno is None):
        return False
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < SHORT_WRITE_FREE_BYTES


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (unique temp file in the same dir + os.replace)."""
    return atomic_write_with(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write text (UTF-8) atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write a JSON-able object atomically, indented for people to read."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; a missing or malformed file is an AutosegError naming it."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise AutosegError("file not found", path) from None
    except json.JSONDecodeError as e:
        raise AutosegError(f"not valid JSON ({e.msg} at line {e.lineno})", path) from None
    except OSError as e:
        raise AutosegError(f"cannot read ({e.strerror})", path) from None


# --------------------------------------------------------------------------- dataclass <-> JSON


def to_jsonable(obj: Any) -> Any:
    """Convert dataclasses, tuples, enums, paths and numpy scalars into plain JSON values.

    NaN becomes null (strict JSON has no NaN); a ``float`` field reads null back as NaN.
    """
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "shape", None) == ():
        return to_jsonable(obj.item())  # numpy scalar
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return to_jsonable(obj.tolist())  # numpy array
    return obj


def record_to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a JSON dict, headed by its SCHEMA / VERSION class variables."""
    body = to_jsonable(obj)
    schema = getattr(type(obj), "SCHEMA", None)
    version = getattr(type(obj), "VERSION", None)
    if schema is None or version is None:
        raise TypeError(f"{type(obj).__name__} needs SCHEMA and VERSION class variables")
    return {"schema": schema, "schema_version": version, **body}


def save_record(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write a dataclass record atomically."""
    return atomic_write_json(path, record_to_dict(obj))


def load_record(path: str | os.PathLike[str], cls: type[T]) -> T:
    """Read a record written by `save_record`, strictly (schema, version, keys, types)."""
    return record_from_dict(cls, read_json(path), where=str(path))


def record_from_dict(cls: type[T], data: Any, where: str = "<record>") -> T:
    """Check the schema header, migrate older versions via ``cls.MIGRATIONS``, then build ``cls``."""
    if not isinstance(data, dict):
        raise AutosegError(f"expected a JSON object for {cls.__name__}", where)
    schema, version = getattr(cls, "SCHEMA"), getattr(cls, "VERSION")
    found_schema = data.get("schema")
    found_version = data.get("schema_version")
    if found_schema != schema:
        raise AutosegError(f"schema is {found_schema!r}, expected {schema!r}", where)
    if not isinstance(found_version, int):
        raise AutosegError("missing or non-integer schema_version", where)
    body = {k: v for k, v in data.items() if k not in ("schema", "schema_version")}
    migrations: dict[int, Any] = getattr(cls, "MIGRATIONS", {})
    while found_version < version:
        step = migrations.get(found_version)
        if step is None:
            raise AutosegError(
                f"schema_version {found_version} is too old for this autoseg (needs {version}; "
                "re-create the file)", where)
        body = step(body)
        found_version += 1
    if found_version > version:
        raise AutosegError(
            f"schema_version {found_version} is newer than this autoseg understands ({version}); "
            "upgrade autoseg", where)
    return from_jsonable(cls, body, where)


def from_jsonable(tp: Any, value: Any, where: str = "<record>") -> Any:
    """Build a value of type ``tp`` from plain JSON, strictly (unknown / missing keys fail)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return from_jsonable(arg, value, where)
            except (AutosegError, TypeError, ValueError) as e:
                errors.append(str(e))
        raise AutosegError(f"value {value!r} matches none of {tp}", where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise AutosegError(f"expected an object for {tp.__name__}, got {type(value).__name__}", where)
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise AutosegError(f"unknown key(s) {unknown} for {tp.__name__}", where)
        kwargs = {}
        for name, f in fields.items():
            if name in value:
                kwargs[name] = from_jsonable(hints[name], value[name], f"{where}:{name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise AutosegError(f"missing key {name!r} for {tp.__name__}", where)
        try:
            return tp(**kwargs)
        except AutosegError as e:  # a field check of the record's class (`TrainerConfig`, `JobSpec`)
            e.where = f"{where}:{e.where}" if e.where else where
            raise
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise AutosegError(f"{value!r} is not one of {[m.value for m in tp]}", where) from None
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise AutosegError(f"expected a list, got {type(value).__name__}", where)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_jsonable(args[0], v, where) for v in value)
        if args and len(args) != len(value):
            raise AutosegError(f"expected {len(args)} items, got {len(value)}", where)
        return tuple(from_jsonable(a, v, where) for a, v in zip(args, value)) if args else tuple(value)
    if origin is list:
        if not isinstance(value, list):
            raise AutosegError(f"expected a list, got {type(value).__name__}", where)
        return [from_jsonable(args[0], v, where) for v in value] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise AutosegError(f"expected an object, got {type(value).__name__}", where)
        kt, vt = args if args else (Any, Any)
        def key(k: Any) -> Any:  # JSON object keys are always strings
            if int in (kt, *typing.get_args(kt)) and isinstance(k, str) and k.lstrip("-").isdigit():
                return int(k)
            return from_jsonable(kt, k, where)

        return {key(k): from_jsonable(vt, v, where) for k, v in value.items()}
    if tp is float:
        if value is None:
            return math.nan  # written by to_jsonable for NaN
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise AutosegError(f"expected a number, got {value!r}", where)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise AutosegError(f"expected an integer, got {value!r}", where)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise AutosegError(f"expected true/false, got {value!r}", where)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise AutosegError(f"expected a string, got {value!r}", where)
        return value
    if tp is Path:
        return Path(value)
    if tp is type(None):
        if value is not None:
            raise AutosegError(f"expected null, got {value!r}", where)
        return None
    raise TypeError(f"from_jsonable cannot handle type {tp!r}")
