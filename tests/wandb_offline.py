"""Read an offline W&B run back (wandb 0.31 has no offline reader): decode ``run-*.wandb``, a log of protobuf
``Record`` messages in 32 KiB blocks (7-byte chunk headers: CRC32, length, type FULL/FIRST/MIDDLE/LAST)."""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7  # b":W&B", magic 0xBEE1, version


def records(path: Path) -> list[Any]:
    """Every ``Record`` of a ``.wandb`` file, in order."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B record file")
    out, pos, pending = [], HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # the rest of a block too short for a chunk header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and n == 0:
            break
        chunk, pos = data[pos : pos + n], pos + n
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
            pending = b""
    parsed = []
    for raw in out:
        rec = pb.Record()
        rec.ParseFromString(raw)
        parsed.append(rec)
    return parsed


def _items(items: Any) -> dict[str, Any]:
    """``{key: value}`` from history / summary items (nested keys of media objects as nested dicts)."""
    row: dict[str, Any] = {}
    for it in items:
        keys = list(it.nested_key) or [it.key]
        value = json.loads(it.value_json)
        node = row
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return row


@dataclass
class OfflineRun:
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    step_metric: dict[str, str] = field(default_factory=dict)  # key → its step axis ("" = the default _step)
    globs: dict[str, str] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # record kinds in order ("history", "artifact", ...)

    def keys(self) -> set[str]:
        return {k for row in self.history for k in row}

    def rows_with(self, key: str) -> list[dict[str, Any]]:
        return [r for r in self.history if key in r]


def read_run(path: Path) -> OfflineRun:
    run = OfflineRun()
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        run.order.append(kind or "")
        if kind == "history":
            run.history.append(_items(rec.history.item))
        elif kind == "summary":
            run.summary.update(_items(rec.summary.update))
        elif kind in ("run", "config"):
            cfg = rec.run.config if kind == "run" else rec.config
            for it in cfg.update:
                keys = list(it.nested_key) or [it.key]
                node = run.config
                for k in keys[:-1]:
                    node = node.setdefault(k, {})
                node[keys[-1]] = json.loads(it.value_json)
        elif kind == "metric":
            m = rec.metric
            if m.name:
                run.step_metric[m.name] = m.step_metric
            else:
                run.globs[m.glob_name] = m.step_metric
        elif kind == "artifact":
            a = rec.artifact
            run.artifacts.append({"name": a.name, "type": a.type, "digest": a.digest,
                                  "use_after_commit": a.use_after_commit,
                                  "metadata": json.loads(a.metadata) if a.metadata else {}})  # fmt: skip
    return run


def offline_run(wandb_dir: Path, timeout: float = 60.0) -> OfflineRun:
    """The one offline run under ``wandb_dir``, read once its record file has its exit record (the W&B service
    writes it asynchronously, even after ``finish()``)."""
    deadline = time.monotonic() + timeout
    while True:
        files = sorted(wandb_dir.glob("offline-run-*/run-*.wandb"))
        if len(files) > 1:
            raise AssertionError(f"expected one offline run under {wandb_dir}, found {files}")
        if files:
            run = read_run(files[0])
            if "exit" in run.order or time.monotonic() > deadline:
                return run
        elif time.monotonic() > deadline:
            raise AssertionError(f"no offline W&B run under {wandb_dir}")
        time.sleep(0.5)
