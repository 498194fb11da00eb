"""`RunLogger`: one tracker run, fed by training without ever slowing or stopping it.

Training calls `log_metrics` & co., which only append to a queue (microseconds). A worker
thread owned by the logger starts the run and sends the queue in order. A call that fails is
kept and retried with growing pauses (`RETRY_PAUSE_S` up to `MAX_RETRY_PAUSE_S`), so a tracking
server that goes away and comes back, a locked or full database, or a backend exception costs
one warning, and the buffered events are replayed once it answers again. A call the tracker
refuses for good (`Backend.is_transient` says so: an invalid value, a deleted run) is dropped
and counted. `end` waits at most ``timeout_s`` for the queue to drain; what is left is dropped,
and the count is logged: training has finished and must not wait on a dead server.

The tracker's package is imported by `open_backend` in the caller's thread, before the worker
starts: data-loader workers are forked while the worker thread runs, and a fork in the middle
of an import can leave the child with a held import lock.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoseg.track.base import Backend, RunRequest, RunStatus

log = logging.getLogger(__name__)

RETRY_PAUSE_S = 0.5
"""First pause after a failed call; doubled after every further failure..."""

MAX_RETRY_PAUSE_S = 10.0
"""...up to this, so a server that comes back is noticed within seconds."""

MAX_PENDING = 100_000
"""Buffered events beyond this (a tracker down for days of epochs) drop the oldest metrics first."""

END_TIMEOUT_S = 30.0
"""How long a finished run waits for the tracker to take its last events before dropping them."""

WARN_AFTER_FAILING_S = 2.0
"""Failures shorter than this (a sqlite database locked by a concurrent writer) are retried quietly."""

STALL_WARN_S = 30.0
"""A call the tracker has not answered for this long is reported (once) by the next logging call: a
client may retry a dead server for minutes on its own (MLflow: ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``)."""

START_TIMEOUT_S = 60.0
"""How long a caller that needs the run id (a sweep's parent, for its children) waits for it."""


@dataclass(frozen=True)
class _Event:
    kind: str
    """params, metrics, tags, artifact or end."""
    payload: Any
    step: int | None = None


@dataclass(frozen=True)
class EndReport:
    """What a run's logging came to: its id (None if it never started) and what was lost."""

    run_id: str | None
    dropped: int
    sent: int


class RunLogger:
    """One run of one backend, sent from a worker thread; see the module doc. Never raises on logging calls."""

    def __init__(self, backend: Backend, request: RunRequest,
                 on_started: Callable[[str], None] | None = None) -> None:
        self.backend, self.request, self.on_started = backend, request, on_started
        self.run_id: str | None = None
        self._queue: collections.deque[_Event] = collections.deque()
        self._cond = threading.Condition()
        self._started = threading.Event()
        self._finished = threading.Event()
        self._abandon = False
        self._ending = False
        self._warned = False
        self._failing_since: float | None = None
        self._call_started: float | None = None
        self.sent = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._work, name=f"track-{backend.name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the training side
    def log_params(self, params: Mapping[str, str]) -> None:
        self._put(_Event("params", {str(k): str(v) for k, v in params.items()}))

    def log_metrics(self, metrics: Mapping[str, float | None], step: int | None = None) -> None:
        """Finite values only (NaN: a class absent from every case; a tracker has nothing to plot)."""
        values = {k: float(v) for k, v in metrics.items()
                  if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
        if values:
            self._put(_Event("metrics", values, step))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._put(_Event("tags", {str(k): str(v) for k, v in tags.items()}))

    def log_artifact(self, path: Path, folder: str = "") -> None:
        if Path(path).is_file():
            self._put(_Event("artifact", (Path(path), folder)))

    def wait_started(self, timeout_s: float | None = None) -> str | None:
        """The run id once the tracker has created the run; None if it did not within ``timeout_s``
        (default `START_TIMEOUT_S`)."""
        self._started.wait(START_TIMEOUT_S if timeout_s is None else timeout_s)
        return self.run_id

    def end(self, status: RunStatus, error: str | None = None, timeout_s: float | None = None) -> EndReport:
        """Queue the end (with the ``error`` line as a tag), wait for the queue to drain (at most ``timeout_s``,
        default `END_TIMEOUT_S`), report losses."""
        timeout_s = END_TIMEOUT_S if timeout_s is None else timeout_s
        if error:
            self.set_tags({"error": error[:1000]})
        self._put(_Event("end", status))
        with self._cond:
            self._ending = True
            self._cond.notify_all()
        if not self._finished.wait(timeout_s):
            with self._cond:
                self._abandon = True
                left = len(self._queue)
                self.dropped += left
                self._queue.clear()
                self._cond.notify_all()
            log.warning("tracking (%s): %d event(s) of run %s not sent within %.0f s; dropped",
                        self.backend.name, left, self.run_id or self.request.name, timeout_s)
        elif self.dropped:
            log.warning("tracking (%s): %d event(s) of run %s could not be logged and were dropped",
                        self.backend.name, self.dropped, self.run_id or self.request.name)
        return EndReport(self.run_id, self.dropped, self.sent)

    def _put(self, event: _Event) -> None:
        started = self._call_started
        if started is not None and not self._warned and time.monotonic() - started > STALL_WARN_S:
            self._warned = True
            log.warning("tracking (%s): the tracker has not answered for %.0f s; buffering, training goes on",
                        self.backend.name, time.monotonic() - started)
        with self._cond:
            if self._abandon:
                self.dropped += 1
                return
            self._queue.append(event)
            if len(self._queue) > MAX_PENDING:
                self._drop_oldest_metrics()
            self._cond.notify_all()

    def _drop_oldest_metrics(self) -> None:
        for i, e in enumerate(self._queue):
            if e.kind == "metrics":
                del self._queue[i]
                self.dropped += 1
                return

    # ------------------------------------------------------------------ the worker side
    def _work(self) -> None:
        try:
            if self._call(self._start) is not False:
                self._started.set()
                while True:
                    with self._cond:
                        while not self._queue and not self._abandon:
                            self._cond.wait()
                        if self._abandon:
                            return
                        event = self._queue[0]
                    done = self._call(lambda: self._send(event))
                    with self._cond:
                        if self._queue and self._queue[0] is event:
                            self._queue.popleft()
                            if done is False:
                                self.dropped += 1
                            else:
                                self.sent += 1
                    if event.kind == "end":
                        return
            else:
                with self._cond:  # the run could not be created at all: nothing can be sent
                    self.dropped += len(self._queue)
                    self._queue.clear()
                    self._abandon = True
        finally:
            self._started.set()
            self._finished.set()
            try:
                self.backend.close()
            except Exception as e:  # closing a client that lost its server: nothing left to lose
                log.debug("tracking (%s): close failed: %s", self.backend.name, e)

    def _start(self) -> None:
        self.run_id = self.backend.start(self.request)
        if self.on_started is not None:
            self.on_started(self.run_id)

    def _send(self, event: _Event) -> None:
        run_id = str(self.run_id)
        if event.kind == "params":
            self.backend.log_params(run_id, event.payload)
        elif event.kind == "metrics":
            self.backend.log_metrics(run_id, event.payload, event.step)
        elif event.kind == "tags":
            self.backend.set_tags(run_id, event.payload)
        elif event.kind == "artifact":
            self.backend.log_artifact(run_id, *event.payload)
        elif event.kind == "end":
            self.backend.end(run_id, event.payload)

    def _call(self, fn: Callable[[], None]) -> bool | None:
        """Run ``fn`` until it succeeds (True), is refused for good (False) or the logger is abandoned (None)."""
        pause = RETRY_PAUSE_S
        while True:
            self._call_started = time.monotonic()
            try:
                fn()
            except Exception as e:  # any backend failure: tracking must never reach training
                line = error_line(e)
                if not self.backend.is_transient(e):
                    log.warning("tracking (%s): %s refused it: %s; dropped", self.backend.name,
                                self.run_id or self.request.name, line)
                    return False
                self._failing_since = self._failing_since or time.monotonic()
                if not self._warned and time.monotonic() - self._failing_since >= WARN_AFTER_FAILING_S:
                    self._warned = True
                    log.warning("tracking (%s): cannot reach the tracker (%s); buffering, training goes on",
                                self.backend.name, line)
                else:
                    log.debug("tracking (%s): %s; retrying in %.1f s", self.backend.name, line, pause)
                with self._cond:
                    if self._abandon:
                        return None
                    self._cond.wait(pause)
                    if self._abandon:
                        return None
                pause = min(pause * 2, MAX_RETRY_PAUSE_S)
                continue
            finally:
                self._call_started = None
            if self._failing_since is not None:
                (log.warning if self._warned else log.debug)(
                    "tracking (%s): the tracker answers again after %.0f s; replaying %d buffered event(s)",
                    self.backend.name, time.monotonic() - self._failing_since, len(self._queue))
                self._failing_since = None
            return True


def error_line(error: BaseException) -> str:
    """``TypeName: first line of the message`` (cut at 300 characters): a failure in one line."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__
