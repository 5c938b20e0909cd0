"""Read the records of an offline W&B run file (run-<id>.wandb), to check what W&B was given.

The file is W&B's transaction log: a 7-byte header (":W&B", magic, version), then LevelDB-log style
32 KiB blocks of records, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle,
4 last) and a serialised `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32 * 1024


def records(path: Path) -> Iterator:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # padding at a block's end
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def run_record(run_folder: Path) -> tuple:
    """(the `run` record: id, display name, group; the config W&B holds at the end: the run record's
    config updated by every later `config` record) of the one W&B run in a run folder."""
    import json

    (path,) = Path(run_folder).glob("wandb/offline-run-*/run-*.wandb")
    run, config = None, {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({item.key: json.loads(item.value_json) for item in run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    assert run is not None, f"no run record in {path}"
    return run, config


def history(run_folder: Path) -> list[dict]:
    """Every row W&B logged for the one run in a run folder, as {metric: value}."""
    import json

    (path,) = Path(run_folder).glob("wandb/offline-run-*/run-*.wandb")
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    return rows
