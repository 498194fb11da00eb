"""MLflow under load and under failure, against a real ``mlflow server`` started here on 127.0.0.1.

Eight concurrent processes with our tracker client lose no run and no metric, against the server
and against one sqlite store (the store's schema is created by whichever comes first, under our
lock). A server killed in the middle of a real training costs a warning; training finishes, and what
it logged meanwhile is replayed into the server once it is back."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from autoseg.track import logger as logger_module
from autoseg.track.base import RunRequest, RunStatus
from autoseg.track.fold import TRACKING_FILE, TrackingRecord
from autoseg.track.logger import RunLogger
from autoseg.track.mlflow_backend import MlflowBackend
from autoseg.track.readback import MlflowReader
from autoseg.track.spec import TrackSpec
from autoseg.common.jsonio import load_record
from tests.track.conftest import DATASET, fold_dir, log_records, train_tracked

pytest.importorskip("mlflow", reason='needs the track extra: pip install -e ".[track]"')

pytestmark = pytest.mark.slow

WRITERS = 8
EPOCHS = 6
SERVER_START_TIMEOUT_S = 240.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    folder: Path
    port: int
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner processes
        mlflow = shutil.which("mlflow") or "mlflow"
        log = open(self.folder / "server.log", "ab")
        self.proc = subprocess.Popen(
            [mlflow, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", str(self.folder / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.folder / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("mlflow server did not answer /health in time")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("mlflow_server"), _free_port())
    try:
        s.start()
        yield s
    finally:
        s.kill()


def _writer(target: str, index: int, folder: str) -> None:
    """One concurrent child: a run of EPOCHS epochs of metrics, exit 0 only if nothing was dropped."""
    run = RunLogger(MlflowBackend(TrackSpec("mlflow", target)),
                    RunRequest(f"writer-{index}", "concurrency", Path(folder), tags={"writer": str(index)}))
    run.log_params({"index": index, "lr": 0.01 * index})
    for epoch in range(EPOCHS):
        run.log_metrics({"train_loss": 1.0 / (epoch + 1) + index, "pseudo_dice/organ": epoch / EPOCHS}, step=epoch)
    run.log_metrics({"final/dice_mean": index / 10})
    report = run.end(RunStatus.FINISHED, timeout_s=180)
    os._exit(0 if report.run_id and report.dropped == 0 else 1)


def _run_writers(target: str, folder: Path) -> None:
    MlflowBackend(TrackSpec("mlflow", target))  # imports MLflow's store here, once, before forking (as a
    context = multiprocessing.get_context("fork")  # scheduler would have): the children do not import it again
    procs = [context.Process(target=_writer, args=(target, i, str(folder))) for i in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0] * WRITERS
    reader = MlflowReader(TrackSpec("mlflow", target))
    runs = {r.tags["writer"]: r for r in reader.runs("concurrency")}
    assert sorted(runs) == sorted(str(i) for i in range(WRITERS))
    for index, run in runs.items():
        i = int(index)
        assert run.status == "FINISHED" and run.params == {"index": index, "lr": str(0.01 * i)}
        assert reader.history(run.run_id, "train_loss") == [(e, pytest.approx(1.0 / (e + 1) + i)) for e in range(EPOCHS)]
        assert len(reader.history(run.run_id, "pseudo_dice/organ")) == EPOCHS
        assert run.metrics["final/dice_mean"] == pytest.approx(i / 10)


def test_eight_concurrent_writers_to_one_server_lose_nothing(server: Server, tmp_path: Path) -> None:
    _run_writers(server.url, tmp_path)


def test_eight_concurrent_writers_to_one_new_sqlite_store_lose_nothing(tmp_path: Path) -> None:
    _run_writers(f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}", tmp_path)


def test_a_server_killed_mid_training_costs_a_warning_and_the_metrics_are_replayed(
        server: Server, phantom, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast: our logger does the retrying
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setattr(logger_module, "MAX_RETRY_PAUSE_S", 1.0)
    monkeypatch.setattr(logger_module, "END_TIMEOUT_S", SERVER_START_TIMEOUT_S)
    folder = fold_dir(phantom, "server_killed")
    restarted = threading.Event()

    def kill_after_first_epoch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not restarted.is_set():
            log = folder / "training_log.jsonl"
            if log.is_file() and log.read_text(encoding="utf-8").count("\n") >= 1:
                server.kill()
                server.start()  # takes seconds: training goes on meanwhile, its metrics buffered
                restarted.set()
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_after_first_epoch, daemon=True)
    watcher.start()
    with caplog.at_level(logging.WARNING, logger="autoseg.track.logger"):
        train_tracked(phantom, "server_killed", f"mlflow:{server.url}", "--set", "epochs=3")
    watcher.join(SERVER_START_TIMEOUT_S)
    assert restarted.is_set()
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("cannot reach the tracker" in w for w in warnings) == 1, warnings
    assert not any("dropped" in w for w in warnings), warnings
    reader = MlflowReader(TrackSpec("mlflow", server.url))
    record = load_record(folder / TRACKING_FILE, TrackingRecord)
    (run,) = [r for r in reader.runs(DATASET) if r.run_id == record.run_id]
    assert run.status == "FINISHED"
    logged = log_records(folder)
    assert reader.history(run.run_id, "train_loss") == [(r["epoch"], pytest.approx(r["train_loss"])) for r in logged]
    assert len(logged) == 3 and "final/dice_mean" in run.metrics
    assert "validation/summary.json" in reader.artifacts(run.run_id)
