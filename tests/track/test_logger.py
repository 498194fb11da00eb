"""`RunLogger` against a scripted backend: it never raises into training, replays what it buffered
while the tracker failed, drops (and counts) what the tracker refuses, and gives up in bounded time."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from autoseg.track import logger as logger_module
from autoseg.track.base import RunRequest, RunStatus
from autoseg.track.logger import RunLogger


class Refused(Exception):
    pass


class ScriptedBackend:
    """Records calls; ``down`` makes every call fail (transient) until cleared, ``refuse`` names kinds refused."""

    name = "scripted"

    def __init__(self, down: bool = False, refuse: tuple[str, ...] = ()) -> None:
        self.calls: list[tuple] = []
        self.down = threading.Event()
        if down:
            self.down.set()
        self.refuse, self.closed, self.attempts = refuse, False, 0

    def _do(self, *call: object) -> None:
        self.attempts += 1
        if self.down.is_set():
            raise ConnectionError("connection refused")
        if call[0] in self.refuse:
            raise Refused(f"{call[0]} is invalid")
        self.calls.append(call)

    def start(self, request: RunRequest) -> str:
        self._do("start", request.name)
        return "run-1"

    def log_params(self, run_id, params) -> None:  # type: ignore[no-untyped-def]
        self._do("params", dict(params))

    def log_metrics(self, run_id, metrics, step) -> None:  # type: ignore[no-untyped-def]
        self._do("metrics", dict(metrics), step)

    def set_tags(self, run_id, tags) -> None:  # type: ignore[no-untyped-def]
        self._do("tags", dict(tags))

    def log_artifact(self, run_id, path, folder="") -> None:  # type: ignore[no-untyped-def]
        self._do("artifact", Path(path).name)

    def end(self, run_id, status) -> None:  # type: ignore[no-untyped-def]
        self._do("end", status)

    def is_transient(self, error: BaseException) -> bool:
        return not isinstance(error, Refused)

    def close(self) -> None:
        self.closed = True


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logger_module, "RETRY_PAUSE_S", 0.01)
    monkeypatch.setattr(logger_module, "MAX_RETRY_PAUSE_S", 0.05)
    monkeypatch.setattr(logger_module, "WARN_AFTER_FAILING_S", 0.0)


def _request(tmp_path: Path) -> RunRequest:
    return RunRequest(name="r", experiment="e", folder=tmp_path)


def test_events_arrive_in_order_and_nan_is_not_sent(tmp_path: Path) -> None:
    backend = ScriptedBackend()
    started: list[str] = []
    run = RunLogger(backend, _request(tmp_path), on_started=started.append)
    run.log_params({"a": 1})
    for epoch in range(3):
        run.log_metrics({"loss": 1.0 / (epoch + 1), "dice": float("nan"), "missing": None}, step=epoch)
    report = run.end(RunStatus.FINISHED)
    assert started == ["run-1"] and report.run_id == "run-1" and report.dropped == 0 and report.sent == 5
    assert backend.calls == [("start", "r"), ("params", {"a": "1"}),
                             *[("metrics", {"loss": 1.0 / (e + 1)}, e) for e in range(3)],
                             ("end", RunStatus.FINISHED)]
    assert backend.closed


def test_a_tracker_that_goes_away_costs_one_warning_and_nothing_is_lost(tmp_path: Path, caplog) -> None:
    backend = ScriptedBackend()
    run = RunLogger(backend, _request(tmp_path))
    assert run.wait_started(5) == "run-1"
    backend.down.set()
    with caplog.at_level(logging.WARNING, logger="autoseg.track.logger"):
        for epoch in range(20):
            run.log_metrics({"loss": float(epoch)}, step=epoch)  # returns at once, tracker or not
        threading.Timer(0.3, backend.down.clear).start()
        report = run.end(RunStatus.FINISHED, timeout_s=20)
    assert report.dropped == 0
    assert [c[2] for c in backend.calls if c[0] == "metrics"] == list(range(20))
    assert backend.calls[-1] == ("end", RunStatus.FINISHED)
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("cannot reach the tracker" in w for w in warnings) == 1
    assert any("answers again" in w and "replaying" in w for w in warnings)


def test_refused_calls_are_dropped_and_counted(tmp_path: Path) -> None:
    backend = ScriptedBackend(refuse=("params",))
    run = RunLogger(backend, _request(tmp_path))
    run.log_params({"bad": "x"})
    run.log_metrics({"loss": 1.0}, step=0)
    report = run.end(RunStatus.FINISHED)
    assert report.dropped == 1 and [c[0] for c in backend.calls] == ["start", "metrics", "end"]


def test_a_dead_tracker_gives_up_after_the_timeout_and_counts_what_it_drops(tmp_path: Path, caplog) -> None:
    backend = ScriptedBackend(down=True)
    run = RunLogger(backend, _request(tmp_path))
    assert run.wait_started(0.1) is None
    for epoch in range(5):
        run.log_metrics({"loss": 1.0}, step=epoch)
    with caplog.at_level(logging.WARNING, logger="autoseg.track.logger"):
        report = run.end(RunStatus.FAILED, error="RuntimeError: boom", timeout_s=0.5)
    assert report.run_id is None and report.dropped == 7  # 5 epochs, the error tag, the end
    assert any("not sent within" in r.getMessage() for r in caplog.records)
    run.log_metrics({"loss": 2.0}, step=9)  # after giving up: still never raises
    assert backend.calls == []


def test_a_tracker_that_refuses_the_run_drops_everything_without_raising(tmp_path: Path) -> None:
    backend = ScriptedBackend(refuse=("start",))
    run = RunLogger(backend, _request(tmp_path))
    run.log_metrics({"loss": 1.0}, step=0)
    report = run.end(RunStatus.FINISHED, timeout_s=5)
    assert report.run_id is None and report.dropped >= 1 and backend.calls == []
