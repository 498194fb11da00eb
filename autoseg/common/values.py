"""One converter for every configuration value: typed fields of frozen dataclasses, read from text or YAML.

Three sources give values for a dataclass field (`TrainerConfig`, `AugmentConfig`, a plan
`Configuration`): command-line text (``--set epochs=50``, ``--set 3d_fullres.patch_size=48,64,48``,
a job record's override strings), YAML values of a sweep file (already typed: ``epochs: 50``)
and JSON records (`autoseg.common.jsonio.from_jsonable`, which is stricter). `parse_text` and
`check_value` convert against the field's declared type and fail with the same one-line problem,
``expected <type name>, got <value>``, whatever the source; `did_you_mean` is the one hint for a
mistyped name, and `TRUE_WORDS`/`FALSE_WORDS`/`NONE_WORDS` the one table of on/off words.

Dataclasses plus this converter rather than pydantic models: the records already are frozen
dataclasses read by `from_jsonable` with their own schema versions, and this keeps the error text
ours (one line, ``where`` = the key) without a new dependency.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from collections.abc import Iterable
from enum import Enum
from typing import Any, Literal, Union

from autoseg.common.errors import ConfigError

TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
"""Text read as True for a boolean field (``--set augment.mirror=on``)."""
FALSE_WORDS = frozenset({"false", "0", "no", "off"})
"""Text read as False for a boolean field."""
NONE_WORDS = frozenset({"none", "null"})
"""Text read as None for an optional field (``--set batch_size=none``)."""


def did_you_mean(word: str, options: Iterable[str], n: int = 1, cutoff: float = 0.6) -> str:
    """``"; did you mean 'lr'?"`` (up to ``n`` close matches joined by ``or``), or ``""`` when none is close."""
    close = difflib.get_close_matches(word, list(options), n=n, cutoff=cutoff)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def on_off(value: Any) -> bool | None:
    """True/False when ``value`` is a boolean, 0/1 or an on/off word; None otherwise."""
    word = str(value).strip().lower() if isinstance(value, bool | int | str) else None
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    return None


def type_name(tp: Any) -> str:
    """How a field type reads in an error: ``an integer``, ``true/false``, ``2 comma-separated numbers``."""
    names = {int: "an integer", float: "a number", bool: "true/false", str: "a name", type(None): "none"}
    if tp in names:
        return names[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is Literal or (isinstance(tp, type) and issubclass(tp, Enum)):
        return f"one of {[getattr(a, 'value', a) for a in (args or tp)]}"
    if origin is tuple:
        if args and args[-1] is not Ellipsis:
            return f"{len(args)} comma-separated values ({', '.join(type_name(a) for a in args)})"
        inner = args[0] if args else str
        if typing.get_origin(inner) is tuple:
            return "a list of per-axis lists like 1,1,1;2,2,2 or [[1,1,1],[2,2,2]]"
        return f"a comma-separated list of {'integers' if inner is int else 'numbers'} like 48,64,48"
    return getattr(tp, "__name__", str(tp))


def _bad(tp: Any, value: Any, where: str) -> ConfigError:
    return ConfigError(f"expected {type_name(tp)}, got {value!r}", where=where)


def parse_text(text: str, tp: Any, where: str) -> Any:
    """``text`` (the command line, an override string) as a value of field type ``tp``.

    Booleans take `TRUE_WORDS`/`FALSE_WORDS`, optional fields `NONE_WORDS`, tuples ``a,b,c`` or
    ``[a, b, c]`` (nested: ``1,1,1;2,2,2`` or ``[[1,1,1],[2,2,2]]``), Literal and Enum fields their choices.
    """
    text = text.strip()
    low = text.lower()
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if type(None) in args and low in NONE_WORDS:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return parse_text(text, arg, where)
                except ConfigError:
                    pass
        raise _bad(tp, text, where)
    if origin is Literal or (isinstance(tp, type) and issubclass(tp, Enum)):
        return check_value(text, tp, where)
    if origin is tuple:
        return _parse_tuple(text, tp, where)
    if tp is bool:
        flag = on_off(low)
        if flag is None:
            raise _bad(tp, text, where)
        return flag
    if tp is int or tp is float:
        try:
            return tp(text)
        except ValueError:
            raise _bad(tp, text, where) from None
    if tp is str:
        if not text:
            raise _bad(tp, text, where)
        return text
    if tp is type(None) and low in NONE_WORDS:
        return None
    raise ConfigError(f"cannot set a value of type {type_name(tp)} from text", where=where)


def _parse_tuple(text: str, tp: Any, where: str) -> tuple:
    args = typing.get_args(tp)
    variadic = not args or args[-1] is Ellipsis
    nested = variadic and bool(args) and typing.get_origin(args[0]) is tuple
    if text.startswith("["):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError:
            raise _bad(tp, text, where) from None
        if not isinstance(raw, list):
            raise _bad(tp, text, where)
        parts = [json.dumps(p) if isinstance(p, list) else str(p) for p in raw]
    else:
        parts = [p.strip() for p in text.strip("()").split(";" if nested else ",")]
    if not parts or any(p == "" for p in parts) or (not variadic and len(parts) != len(args)):
        raise _bad(tp, text, where)
    items = [args[0] if args else str] * len(parts) if variadic else list(args)
    return tuple(parse_text(p, a, where) for p, a in zip(parts, items))


def check_value(value: Any, tp: Any, where: str) -> Any:
    """An already typed value (YAML: ``epochs: 50``, ``mirror: off``) as a value of field type ``tp``.

    No text is parsed: ``"0.1"`` is not a number and ``1`` not a name. Booleans also take 0 and 1
    (YAML 1.1 reads ``on``/``off``/``yes``/``no`` as booleans already); lists become tuples.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return check_value(value, arg, where)
                except ConfigError:
                    pass
        raise _bad(tp, value, where)
    if origin is Literal:
        for choice in args:
            if choice == value or (isinstance(value, str) and str(choice).lower() == value.strip().lower()):
                return choice
        raise _bad(tp, value, where)
    if isinstance(tp, type) and issubclass(tp, Enum):
        for member in tp:
            if value in (member.value, member.name):
                return member
        raise _bad(tp, value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _bad(tp, value, where)
        variadic = not args or args[-1] is Ellipsis
        if not variadic and len(args) != len(value):
            raise _bad(tp, value, where)
        items = [args[0] if args else Any] * len(value) if variadic else list(args)
        return tuple(check_value(v, a, where) for v, a in zip(value, items))
    if tp is bool:
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        raise _bad(tp, value, where)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _bad(tp, value, where)
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _bad(tp, value, where)
    if tp is str:
        if isinstance(value, str) and value.strip():
            return value.strip()
        raise _bad(tp, value, where)
    if tp is type(None):
        if value is None:
            return None
        raise _bad(tp, value, where)
    raise ConfigError(f"cannot check a value of type {type_name(tp)}", where=where)
