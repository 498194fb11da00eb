"""Byte sizes as users write them (``8GB``, ``500MiB``, ``1.5G``, ``1048576``) and as messages show them."""

from __future__ import annotations

import re

from autoseg.common.errors import AutosegError

UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2, "G": 1000**3, "GB": 1000**3,
         "T": 1000**4, "TB": 1000**4, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}
"""Decimal (KB, MB, GB, TB; K/M/G/T alone too) and binary (KiB, MiB, GiB, TiB) units, case-insensitive."""
SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str, where: str = "--max-size") -> int:
    """Bytes of ``text`` (``8GB`` = 8e9, ``500MiB`` = 500 * 2**20, a bare number is bytes)."""
    m = SIZE_RE.match(str(text))
    unit = m.group(2).upper() if m else ""
    if m is None or unit not in UNITS:
        raise AutosegError(f"not a size: {text!r} (write e.g. 8GB, 500MiB, 1.5GiB or a number of bytes)", where)
    return int(float(m.group(1)) * UNITS[unit])


def format_size(n: int) -> str:
    """``5.0 GiB``, ``12.3 MiB``, ``512 B``: binary units, one decimal."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} B"
