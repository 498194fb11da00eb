"""Progress bars (tqdm on stderr) for every long loop: fingerprinting, preprocessing, epochs, prediction."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], *, total: int | None = None, desc: str = "", enabled: bool = True,
             unit: str = "it") -> Iterator[T]:
    """Wrap ``items`` in a bar with rate and ETA; ``enabled=False`` (quiet runs, tests) passes through."""
    if not enabled:
        yield from items
        return
    yield from tqdm(items, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
