"""What a fold run changes in its own process while it runs, and restores afterwards.

Temp files and the torch.compile cache go into the fold dir (``tmp/``, ``compile_cache/``);
SIGINT/SIGTERM ask the training loop to stop after its current step. Everything is set
in-process and restored on the way out; ``os.environ`` of whoever launched us is not touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

TMP_DIR = "tmp"
COMPILE_CACHE_DIR = "compile_cache"


@contextlib.contextmanager
def isolated_dirs(fold_dir: Path) -> Iterator[None]:
    """Point Python temp files into ``<fold_dir>/tmp`` for the run's duration (and make ``compile_cache/``).

    Set in-process (``tempfile.tempdir``), restored afterwards.
    """
    tmp = fold_dir / TMP_DIR
    tmp.mkdir(exist_ok=True)
    (fold_dir / COMPILE_CACHE_DIR).mkdir(exist_ok=True)
    previous = tempfile.tempdir
    tempfile.tempdir = str(tmp)
    try:
        yield
    finally:
        tempfile.tempdir = previous


def compile_cache(fold_dir: Path, enabled: bool) -> contextlib.AbstractContextManager[object]:
    """torch.compile's inductor cache inside the fold dir while compiling (torch restores it after)."""
    if not enabled:
        return contextlib.nullcontext()
    try:  # a private torch module, absent from some versions: import it only when compiling
        from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
    except ImportError:  # other torch versions: the cache follows tempfile.tempdir (the fold's tmp/)
        return contextlib.nullcontext()
    return temporary_cache_dir(str(fold_dir / COMPILE_CACHE_DIR))


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """SIGINT/SIGTERM set a stop flag (the loop saves and exits after its current step); a second one aborts.

    Except once our parent has died: the scheduler's children get SIGINT as their parent-death
    signal, and Linux sends it again each time the orphan is handed from one of the dead
    scheduler's threads to the next (seen: a second SIGINT 0.34 s after the first, from its
    jemalloc thread), and a new scheduler's clean-up sends one more. None of those is a person
    pressing Ctrl-C twice, so an orphan ignores them and finishes its checkpoint.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    parent = os.getppid()

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            if os.getppid() != parent:
                log.info("%s again after our parent died: still stopping after the current iteration",
                         signal.Signals(signum).name)
                return
            raise KeyboardInterrupt
        log.warning("%s received: stopping after the current iteration (send again to abort)",
                    signal.Signals(signum).name)
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)
