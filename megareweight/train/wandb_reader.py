"""Read the logged history back from an offline wandb run file (``run-*.wandb``).

wandb has no public reader for offline runs. The file is a LevelDB-style log: a 7-byte header
(``:W&B``, magic, version), then 32 KiB blocks of records, each with a 7-byte header (CRC32,
length, type FULL/FIRST/MIDDLE/LAST) whose payloads are ``wandb_internal_pb2.Record`` messages.
Tests and users use this to check what a dashboard would show without any network.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> Iterator[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a wandb run file (missing ':W&B' header)")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if length == 0 and kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk


def find_run_file(wandb_dir: str | Path) -> Path:
    """The newest ``run-*.wandb`` under ``wandb_dir`` (searched recursively)."""
    files = find_run_files(wandb_dir)
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file under {wandb_dir}")
    return files[-1]


def find_run_files(wandb_dir: str | Path) -> list[Path]:
    """Every ``run-*.wandb`` under ``wandb_dir``, oldest first (a resumed run adds one per start)."""
    return sorted(Path(wandb_dir).rglob("run-*.wandb"), key=lambda p: p.stat().st_mtime)


def read_run_id(run_file: str | Path) -> str:
    """The wandb run id recorded in an offline run file."""
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in _payloads(Path(run_file).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "run":
            return record.run.run_id
    raise ValueError(f"{run_file}: no run record")


def read_history(run_file: str | Path) -> list[dict[str, Any]]:
    """Every ``wandb.log`` row of the run, in order, as plain dicts (nested keys joined by '/')."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for payload in _payloads(Path(run_file).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return rows
