"""How much ``install-model`` may unpack: checked on the declared sizes, before anything is read or written.

A zip names each member's size in its central directory; a manifest names it again. Before a
byte is hashed or written, the two must agree, their total must stay under a cap
(`DEFAULT_MAX_SIZE`, ``--max-size`` to raise it) and under the target's free space with a
margin, and no large member may expand more than `DEFAULT_MAX_RATIO` times (a zip bomb; model
weights hardly compress, ``--allow-high-ratio`` for the odd all-zero tensor). Reading then stops
at the declared size (`read_declared`): a member that holds more fails its CRC instead of
filling the disk.
"""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from autoseg.common.errors import AutosegError
from autoseg.common.sizes import format_size

DEFAULT_MAX_SIZE = 4 * 1024**3
"""4 GiB: five folds of a ResEnc-L 3d_fullres model (weights only) take about 2 GiB."""
DEFAULT_MAX_RATIO = 100.0
"""Deflated float32 weights shrink by ~1.1x, JSON by ~10x; deflate's most is ~1030x (a bomb)."""
RATIO_MIN_SIZE = 1 << 20
"""Members smaller than this may compress as they like: they cannot fill a disk."""
CHUNK = 1 << 20


@dataclass(frozen=True)
class UnpackLimits:
    """What ``install-model`` accepts (the CLI's ``--max-size`` and ``--allow-high-ratio``)."""

    max_size: int = DEFAULT_MAX_SIZE
    max_ratio: float = DEFAULT_MAX_RATIO
    allow_high_ratio: bool = False


def free_bytes(folder: Path) -> int:
    """Free space of the filesystem that holds ``folder`` (its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def space_margin(total: int) -> int:
    """Free space to leave on top of the model: a tenth of it, at least 64 MiB."""
    return max(64 * 1024**2, total // 10)


def check_declared_sizes(zf: zipfile.ZipFile, zip_path: Path, declared: Mapping[str, int], limits: UnpackLimits,
                         space_at: Path | None) -> None:
    """Refuse, from the zip's directory alone, members whose sizes lie, expand absurdly or do not fit."""
    end = "; nothing was installed"
    for name, size in declared.items():
        info = zf.getinfo(name)
        if size < 0 or info.file_size != size:
            raise AutosegError(f"member {name!r}: size mismatch before any checksum (manifest {size} bytes, zip "
                               f"{info.file_size}; the file was changed or damaged){end}", zip_path)
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size >= RATIO_MIN_SIZE and ratio > limits.max_ratio and not limits.allow_high_ratio:
            raise AutosegError(f"member {name!r} expands {ratio:.0f}x ({format_size(info.compress_size)} to "
                               f"{format_size(info.file_size)}), above {limits.max_ratio:.0f}x: a zip bomb or not "
                               f"a model{end} (--allow-high-ratio if you trust it)", zip_path)
    total = sum(info.file_size for info in zf.infolist())
    largest = max(zf.infolist(), key=lambda i: i.file_size).filename
    if total > limits.max_size:
        raise AutosegError(f"unpacks to {format_size(total)} (largest member {largest!r}), above the "
                           f"{format_size(limits.max_size)} limit{end} (raise it with --max-size)", zip_path)
    if space_at is not None:
        free, margin = free_bytes(space_at), space_margin(total)
        if total + margin > free:
            raise AutosegError(f"unpacks to {format_size(total)} (largest member {largest!r}) but {space_at} has "
                               f"{format_size(free)} free (keeping {format_size(margin)} spare){end}", zip_path)


def read_declared(src: IO[bytes], size: int, name: str) -> Iterator[bytes]:
    """The chunks of ``src`` up to ``size`` bytes, never more; an error when it ends before ``size``."""
    left = size
    while left > 0:
        chunk = src.read(min(CHUNK, left))
        if not chunk:
            raise zipfile.BadZipFile(f"{name} ends after {size - left} of its {size} declared bytes")
        left -= len(chunk)
        yield chunk
