"""Read what the TensorBoard and W&B backends wrote, with those projects' own parsers.

TensorBoard: its `EventAccumulator` and HParams protos. W&B 0.31 has no Python reader of its
offline ``run-<id>.wandb`` file any more (wandb-core, in Go, writes it); the file is a LevelDB-style
log of W&B's own `Record` protobufs (a 7-byte header, then 32 KiB blocks of records, each with a
CRC, a length and a FULL/FIRST/MIDDLE/LAST type), so we split the log here and let W&B's protobuf
classes parse each record.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

WANDB_HEADER_BYTES = 7
"""``:W&B`` + magic 0xBEE1 + version."""
WANDB_BLOCK_BYTES = 32 * 1024
WANDB_RECORD_HEADER = struct.Struct("<IHB")
"""CRC-32 (unchecked here), payload length, type: 1 full, 2 first, 3 middle, 4 last."""


@dataclass
class WandbOfflineRun:
    run_id: str = ""
    group: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    exit_code: int | None = None


def _wandb_records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    pos, out, partial = WANDB_HEADER_BYTES, [], b""
    while pos + WANDB_RECORD_HEADER.size <= len(data):
        left = WANDB_BLOCK_BYTES - pos % WANDB_BLOCK_BYTES
        if left < WANDB_RECORD_HEADER.size:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = WANDB_RECORD_HEADER.unpack_from(data, pos)
        chunk = data[pos + WANDB_RECORD_HEADER.size: pos + WANDB_RECORD_HEADER.size + length]
        pos += WANDB_RECORD_HEADER.size + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            out.append(partial + chunk)
    return out


def _items(items) -> dict:  # type: ignore[no-untyped-def]
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def read_wandb_offline_run(run_dir: Path, timeout_s: float = 60.0) -> WandbOfflineRun:
    """Everything a ``wandb/offline-run-*`` directory's transaction log says about its run.

    ``run.finish()`` returns before W&B's service has written everything (it flushes by the time
    the process exits), so the log is read again until its exit record is there.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        run = _read_wandb_log(run_dir)
        if run.exit_code is not None or time.monotonic() > deadline:
            return run
        time.sleep(0.2)


def _read_wandb_log(run_dir: Path) -> WandbOfflineRun:
    from wandb.proto import wandb_internal_pb2 as pb

    run = WandbOfflineRun()
    for raw in _wandb_records(next(Path(run_dir).glob("run-*.wandb"))):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.group, run.name = record.run.run_id, record.run.run_group, record.run.display_name
            run.tags = list(record.run.tags)
            run.config.update(_items(record.run.config.update))
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "summary":
            run.summary.update(_items(record.summary.update))
        elif kind == "files":
            run.files += [f.path for f in record.files.files]
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


@dataclass
class TensorBoardRun:
    scalars: dict[str, list[tuple[int, float]]]
    hparams: dict[str, object]
    texts: dict[str, list[str]]
    images: list[str]


def read_tensorboard_run(log_dir: Path) -> TensorBoardRun:
    """Scalars (step, value), the HParams session's params, text summaries and image tags of a log dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}
    hparams: dict[str, object] = {}
    for content in acc.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            for key, value in data.session_start_info.hparams.items():
                hparams[key] = value.number_value if value.HasField("number_value") else value.string_value
    texts = {t.removesuffix("/text_summary"): [s.tensor_proto.string_val[0].decode("utf-8") for s in acc.Tensors(t)]
             for t in tags["tensors"] if t.endswith("/text_summary")}
    return TensorBoardRun(scalars, hparams, texts, list(tags["images"]))
